#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in ./.venv with nnunetv2_skcdf and its pinned dependencies.
# Sourced by run_demo.sh and run_tests.sh; safe to run again (pip skips what is installed).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SKCDF_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.skcdf_installed"
if [ ! -f "$stamp" ] || [ "$repo/setup.py" -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  # nnunetv2 (pinned >=2.8,<2.9 in setup.py) pulls torch + torchvision; on this machine kind pip takes
  # torch 2.14.1 / torchvision 0.29.1 from the local disk (CUDA build, runs on the CPU too).
  python -m pip install --quiet -e "$repo[test]"
  touch "$stamp"
fi
