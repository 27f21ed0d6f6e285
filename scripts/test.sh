#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs the whole test suite, offline, on the CPU.
# Arguments go to pytest and choose what runs, e.g.  bash scripts/test.sh tests/test_config.py
#                                                    bash scripts/test.sh -m "not slow" -k resume
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
# the whole suite unless a test file, folder or node id is named (options like -k/-m alone narrow the suite)
named_path=0
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then named_path=1; fi ;;
  esac
done
if [ "$named_path" = 0 ]; then set -- tests "$@"; fi
.venv/bin/python -m pytest -q "$@"
