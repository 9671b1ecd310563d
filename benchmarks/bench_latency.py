#!/usr/bin/env python
"""Latency benchmark of the fused BSConv ops: a thin wrapper of ``python -m bsconv_fused.bench``.

Usage: ``python benchmarks/bench_latency.py [--quick] [--suite full] [--markdown
benchmarks/RESULTS.md] ...``; ``--help`` lists the options, ``bsconv_fused/bench.py`` holds the
code.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from bsconv_fused.bench import main

if __name__ == "__main__":
    sys.exit(main())
