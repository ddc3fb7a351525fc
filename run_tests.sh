#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (CPU, < 15 min). Extra arguments go to pytest,
# e.g. `bash run_tests.sh -m slow` for the long end-to-end runs.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
python -m pytest tests "$@"
