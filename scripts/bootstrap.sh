#!/usr/bin/env bash
# Creates .venv (once), installs the pinned dependencies and builds the extension in place.
# Idempotent: a second run only rebuilds what changed. Sourced by test.sh and bench.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
stamp=.venv/.requirements.sha
want="$(sha256sum requirements-dev.txt | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$py" -m pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
MAX_JOBS="${MAX_JOBS:-2}" "$py" setup.py -q build_ext --inplace
