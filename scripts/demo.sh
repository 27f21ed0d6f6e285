#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), then trains a LoRA on the sample dataset and prints where it went.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py" "$@"
