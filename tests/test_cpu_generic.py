"""The CPU kernels' generic (non-AVX2) inner loops: float64 always runs them; float32 runs them
on CPUs without AVX2/FMA. BSCONV_CPU_GENERIC=1 forces them, so the float32 / low-precision
parity tests run again through them in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import bsconv_fused  # noqa: F401  (loads the ops)

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], generic: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["BSCONV_CPU_GENERIC"] = "1" if generic else "0"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_isa_switch() -> None:
    probe = ["-c", "import torch, bsconv_fused; print(torch.ops.bsconv_fused.cpu_isa())"]
    assert _run(probe, generic=True).stdout.strip() == "generic"
    assert _run(probe, generic=False).stdout.strip() in ("avx2", "generic")
    assert torch.ops.bsconv_fused.cpu_isa() in ("avx2", "generic")


def test_generic_loops_pass_the_parity_tests() -> None:
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:logging",
              "tests/test_forward_backward.py", "-k", "not grid_float64"], generic=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
