#!/usr/bin/env bash
# Sets up a second ComfyUI to test the pack against, beside the 0.3.75 that scripts/setup.sh installs:
#   .runtime/ComfyUI-<version>/        ComfyUI's source, unpacked from $LORA_FOUNDRY_VENDOR/comfyui-<version>.tar.gz
#   .runtime/venv-comfyui-<version>/   a venv layered over .venv: the pack's packages plus that ComfyUI's own pins
# and prints the venv's python on its last line. Exits 3 (and says why on stderr) when the archive is absent.
# Users never need this: it is for the test suite (scripts/test.sh --comfyui <version>).
#   bash scripts/setup_comfyui.sh 0.33.0
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VERSION="${1:?usage: setup_comfyui.sh VERSION (e.g. 0.33.0)}"
# Where the archive is looked for: $LORA_FOUNDRY_VENDOR, else ../shared/vendor beside this checkout, else beside
# the local repository this checkout was cloned from (a clean clone made elsewhere for CI).
vendor_dirs() {
  if [ -n "${LORA_FOUNDRY_VENDOR:-}" ]; then echo "$LORA_FOUNDRY_VENDOR"; return; fi
  echo "$ROOT/../shared/vendor"
  local origin
  origin="$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)"
  origin="${origin#file://}"
  if [ -n "$origin" ] && [ -d "$origin" ]; then echo "$origin/../shared/vendor"; fi
}
ARCHIVE=""
while read -r folder; do
  if [ -f "$folder/comfyui-$VERSION.tar.gz" ]; then ARCHIVE="$(cd "$folder" && pwd)/comfyui-$VERSION.tar.gz"; break; fi
done < <(vendor_dirs)
COMFY="$ROOT/.runtime/ComfyUI-$VERSION"
VENV="$ROOT/.runtime/venv-comfyui-$VERSION"
BASE_VENV="$ROOT/.venv"

log() { printf '[setup %s] %s\n' "$VERSION" "$*" >&2; }

if [ ! -f "$COMFY/main.py" ]; then
  if [ -z "$ARCHIVE" ]; then
    echo "ComfyUI $VERSION: its source archive comfyui-$VERSION.tar.gz is in none of $(vendor_dirs | paste -sd ' ')" >&2
    exit 3
  fi
  log "unpacking $ARCHIVE"
  mkdir -p "$ROOT/.runtime"
  tmp="$(mktemp -d "$ROOT/.runtime/unpack.XXXXXX")"
  tar -xzf "$ARCHIVE" -C "$tmp"
  top="$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
  [ -f "$top/main.py" ] || { echo "$ARCHIVE holds no ComfyUI (no main.py in its top folder)" >&2; exit 1; }
  mv "$top" "$COMFY"
  rm -rf "$tmp"
fi

[ -x "$BASE_VENV/bin/python" ] || { echo "$BASE_VENV is missing: run scripts/setup.sh first" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV on top of $BASE_VENV"
  "$(readlink -f "$BASE_VENV/bin/python")" -m venv "$VENV"
fi
# Layering: a .pth file puts the base venv's site-packages after this venv's own, so the pack's packages (torch
# among them) are shared and only what this ComfyUI pins differently is installed here, shadowing the base's.
site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
base_site="$(site_of "$BASE_VENV/bin/python")"
printf '%s\n' "$base_site" > "$(site_of "$VENV/bin/python")/lora-foundry-base-venv.pth"

stamp="$VENV/.comfyui-reqs"
want="$(sha256sum < "$COMFY/requirements.txt" | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the requirements of ComfyUI $VERSION into $VENV (torch left as the base venv has it)"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY/requirements.txt" > "$VENV/.requirements.txt"
  (cd "$COMFY" && "$VENV/bin/python" -m pip install -q -r "$VENV/.requirements.txt")
  # torchaudio: newer ComfyUI imports it at start; 2.11.1 runs beside torch 2.14.1 (no torch pin pulled in)
  if ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --no-deps "torchaudio==2.11.1"
  fi
  echo "$want" > "$stamp"
fi

log "ready: ComfyUI $COMFY, python $VENV/bin/python"
echo "$VENV/bin/python"
