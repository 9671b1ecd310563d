"""The emulator catches bugs in the real kernel: the forward kernel built with a planted missing
barrier, an out-of-bounds write and an out-of-bounds read (BSCONV_PLANT in
csrc/cuda/bsconv_kernels.cuh) fails, while the unmodified kernel is exact."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).resolve().parent / "emulator_kernels" / "planted.cpp"
FLAGS = ["-std=c++17", "-O1", "-pthread", "-Wall", f"-I{ROOT / 'csrc'}",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def build(plant: int, cache: Path) -> Path:
    deps = [SOURCE, *sorted((ROOT / "csrc" / "cuda").rglob("*.h")),
            *sorted((ROOT / "csrc" / "cuda").rglob("*.cuh")),
            *sorted((ROOT / "csrc" / "common").glob("*.h"))]
    h = hashlib.sha256(" ".join(FLAGS).encode() + bytes([plant]))
    for d in deps:
        h.update(d.read_bytes())
    exe = cache / f"planted{plant}_{h.hexdigest()[:16]}"
    if not exe.exists():
        tmp = exe.with_suffix(".tmp")
        subprocess.run([os.environ.get("CXX", "g++"), *FLAGS, f"-DBSCONV_PLANT={plant}",
                        str(SOURCE), "-o", str(tmp)], check=True)
        tmp.rename(exe)
    return exe


def run(exe: Path, seed: int) -> dict:
    out = subprocess.run([str(exe), str(seed)], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    m = re.match(r"maxerr=(\S+) nan=(\d+) error=(\d) ?(.*)", out.strip())
    assert m, out
    return {"maxerr": float(m[1]), "nan": int(m[2]), "error": int(m[3]), "message": m[4]}


@pytest.fixture(scope="module")
def cache(request) -> Path:
    d = Path(request.config.cache.mkdir("bsconv_planted"))
    return d


def test_unmodified_kernel_is_exact(cache):
    for seed in (1, 2):
        r = run(build(0, cache), seed)
        assert r == {"maxerr": r["maxerr"], "nan": 0, "error": 0, "message": ""}
        assert r["maxerr"] < 1e-12


def test_missing_barrier_is_caught(cache):
    exe = build(1, cache)
    for seed in (1, 2, 3):
        r = run(exe, seed)
        assert r["nan"] > 0 or r["maxerr"] > 1e-6 or r["error"], r


def test_out_of_bounds_write_is_caught(cache):
    r = run(build(2, cache), 1)
    assert r["error"] == 1 and "y" in r["message"] and "after the end" in r["message"], r


def test_out_of_bounds_read_is_caught(cache):
    r = run(build(3, cache), 1)
    assert r["nan"] > 0, r
