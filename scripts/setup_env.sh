#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in ./.venv with nnunetv2_skcdf and its pinned dependencies.
# Sourced by run_demo.sh and run_tests.sh; safe to run again (pip skips what is installed).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SKCDF_VENV:-$repo/.venv}"
_skcdf_fail() {  # a message and a failure, which set -e (above) turns into the end of the script sourcing this one
  echo "setup_env.sh: $1" >&2
  return 1
}
# bin/activate, not bin/python: an earlier 'python3 -m venv' that stopped half-way (no ensurepip) leaves bin/python
# without activate; venv then completes the folder in place
if [ ! -f "$venv/bin/activate" ]; then
  command -v python3 >/dev/null \
    || _skcdf_fail "python3 not found: install Python >= 3.10 (3.11 recommended) as python3 on PATH, then rerun."
  python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || _skcdf_fail "Python >= 3.10 is needed, python3 is $(python3 --version 2>&1): install Python >= 3.10 (3.11 recommended) as python3 on PATH, then rerun."
  created=0
  [ -e "$venv" ] || created=1
  if ! python3 -m venv "$venv"; then
    [ "$created" = 1 ] && rm -rf "$venv"  # only what this script made
    _skcdf_fail "'python3 -m venv $venv' failed. On Debian/Ubuntu install the venv module first (sudo apt install python3-venv, or python3.11-venv for Python 3.11), then rerun."
  fi
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
