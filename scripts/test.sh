#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs the test suite, offline, on the CPU.
#   bash scripts/test.sh                          the whole suite on ComfyUI 0.3.75, then the server-side tests on
#                                                 ComfyUI 0.33.0 (from ../shared/vendor/; skipped, with the reason,
#                                                 when that archive is not there)
#   bash scripts/test.sh tests/test_config.py     only what is named (pytest arguments), on 0.3.75
#   bash scripts/test.sh -m "not slow" -k resume  options alone narrow the whole suite
#   bash scripts/test.sh --comfyui 0.33.0 [ARGS]  the suite (or what ARGS name) against one chosen ComfyUI: a version
#                                                 (0.3.75, or one whose archive is in ../shared/vendor/) or a folder
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEFAULT_VERSION="0.3.75"
SECOND_VERSION="0.33.0"
# what runs again on the second ComfyUI: every test that talks to a server or runs ComfyUI's loaders, the
# browser's slow runs and the long runs marked first_comfyui_only left out
SERVER_SIDE="(comfy_server or comfy_code) and not (browser and slow) and not first_comfyui_only"

chosen=""
if [ "${1:-}" = "--comfyui" ]; then
  chosen="${2:?--comfyui needs a version or a ComfyUI folder}"
  shift 2
fi
if [ -n "$chosen" ] && [ "$chosen" != "$DEFAULT_VERSION" ] && [ -d "$chosen" ]; then
  export COMFYUI_DIR="$(cd "$chosen" && pwd)"   # setup.sh installs that ComfyUI's requirements into .venv
fi
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .

# the whole suite unless a test file, folder or node id is named (options like -k/-m alone narrow the suite)
with_default_paths() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      -*) ;;
      *) if [ -e "${arg%%::*}" ]; then printf '%s\0' "$@"; return; fi ;;
    esac
  done
  printf '%s\0' tests "$@"
}

# run_on WHICH ARGS...: pytest with the python and ComfyUI folder of WHICH (the default version, a ComfyUI folder
# whose requirements setup.sh put into .venv, or a version unpacked from ../shared/vendor/)
run_on() {
  local which="$1" python=.venv/bin/python
  shift
  mapfile -d '' -t args < <(with_default_paths "$@")
  if [ "$which" != "$DEFAULT_VERSION" ] && [ ! -d "$which" ]; then
    python="$(bash scripts/setup_comfyui.sh "$which" | tail -n 1)"
    export COMFYUI_DIR="$ROOT/.runtime/ComfyUI-$which"
  fi
  echo "[test] ComfyUI ${COMFYUI_DIR:-$ROOT/.runtime/ComfyUI}: pytest ${args[*]}"
  "$python" -m pytest -q "${args[@]}"
}

if [ -n "$chosen" ]; then
  run_on "$chosen" "$@"
  exit
fi
run_on "$DEFAULT_VERSION" "$@"
if [ "$#" -gt 0 ]; then
  exit  # what was named ran on the default ComfyUI
fi
if absent="$(bash scripts/setup_comfyui.sh "$SECOND_VERSION" 2>&1 >/dev/null)"; then
  run_on "$SECOND_VERSION" -m "$SERVER_SIDE"
elif [ "$?" = 3 ]; then
  # the same tests, each skipped with the reason (tests/conftest.py reads it)
  export LORA_FOUNDRY_COMFYUI_ABSENT="$(printf '%s' "$absent" | tail -n 1)"
  .venv/bin/python -m pytest -q -rs tests -m "$SERVER_SIDE"
else
  printf '%s\n' "$absent" >&2
  exit 1
fi
