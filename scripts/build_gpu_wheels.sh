#!/usr/bin/env bash
# Rebuild .whl/nnunetv2_skcdf-*.whl from the working tree (the other wheels in .whl/ are fixed) and print the sizes that travel to the GPU machine (limit 67108864 bytes).
set -euo pipefail; cd "$(dirname "$0")/.."; rm -rf build .whl/nnunetv2_skcdf-*.whl; .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl . ; ls -l .whl; w=$(du -cb .whl/* | tail -1 | cut -f1); t=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1); echo "wheels $w + working tree $t = $((w + t)) bytes (limit 67108864)"
