#!/usr/bin/env bash
# Set up (venv, dependencies, build) and run the latency benchmark (CPU when there is no GPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python benchmarks/bench_latency.py "$@"
