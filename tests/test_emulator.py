"""Tests of the CUDA emulator (csrc/cuda/emu), which runs the project's CUDA kernels on the CPU.

Each test compiles a small C++ program from tests/emulator/ with g++ against the emulator (with
-Wall -Wextra -Werror, so the headers must stay warning-free) and checks what it prints. Binaries
are cached in pytest's cache directory under a hash of the compiler, flags and every source they
depend on, so reruns skip compilation. The kernel headers the programs run are also compiled by
nvcc (when present) to show the same source builds as real CUDA.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU_DIR = CSRC / "cuda" / "emu"
PROGRAM_DIR = Path(__file__).resolve().parent / "emulator"
CXX = os.environ.get("CXX", "g++")
# torch's extension build disables the implicit half/bf16 conversions and operators; the test
# programs are built the same way so kernels that pass here also compile there.
TORCH_CUDA_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
CXXFLAGS = [
    "-std=c++17",
    "-O1",
    "-pthread",
    "-Wall",
    "-Wextra",
    "-Werror",
    *TORCH_CUDA_DEFINES,
    f"-I{CSRC}",
]
# Build name -> (source in tests/emulator, extra flags). reduce_tsan: ThreadSanitizer understands
# the emulator's synchronization, so it reports a missing barrier as a data race independent of
# the schedule.
PROGRAMS = {
    **{
        name: (name, [])
        for name in ["reduce", "guards", "warp", "wmma", "atomics", "smem", "errors", "numerics"]
    },
    "reduce_tsan": ("reduce", ["-fsanitize=thread", "-g"]),
}


def _tool_version(tool: str) -> str:
    try:
        return subprocess.run(
            [tool, "--version"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return ""


def _content_hash(*parts: str | bytes, files: list[Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    for f in sorted(files):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _dependencies() -> list[Path]:
    """Every header a test program can include: the emulator and the shared test headers."""
    return [*EMU_DIR.glob("*.h"), *PROGRAM_DIR.glob("*.h"), *PROGRAM_DIR.glob("*.cuh")]


class _Builder:
    """Compiles test programs once per content hash, in parallel, into a persistent cache."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.version = _tool_version(CXX)
        self.lock = threading.Lock()
        self.results: dict[str, tuple[Path | None, str]] = {}

    def build(self, name: str) -> tuple[Path | None, str]:
        source_name, extra_flags = PROGRAMS[name]
        source = PROGRAM_DIR / f"{source_name}.cpp"
        flags = [*CXXFLAGS, *extra_flags]
        key = _content_hash(self.version, " ".join(flags), files=[source, *_dependencies()])
        binary = self.cache_dir / f"{name}-{key}"
        if binary.exists():
            return binary, ""
        tmp = self.cache_dir / f".tmp-{os.getpid()}-{binary.name}"  # outside the stale-build glob
        proc = subprocess.run(
            [CXX, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            return None, proc.stderr
        for stale in self.cache_dir.glob(f"{name}-*"):  # older builds of the same program
            stale.unlink(missing_ok=True)
        os.replace(tmp, binary)
        return binary, ""

    def build_all(self, names: list[str]) -> None:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for name, result in zip(names, pool.map(self.build, names)):
                self.results[name] = result


@pytest.fixture(scope="session")
def emu_cache_dir(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)
    return (
        Path(cache.mkdir("bsconv_emu"))
        if cache is not None
        else tmp_path_factory.mktemp("bsconv_emu")
    )


@pytest.fixture(scope="session")
def programs(emu_cache_dir):
    if shutil.which(CXX) is None:
        pytest.skip(f"{CXX} not found")
    builder = _Builder(emu_cache_dir)
    builder.build_all(list(PROGRAMS))
    return builder.results


def _clean_env() -> dict[str, str]:
    """The emulator reads BSCONV_EMU_* settings; tests must not depend on the caller's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BSCONV_EMU_")}


def run_process(
    programs, name: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    binary, errors = programs[name]
    if binary is None:
        pytest.fail(f"compiling tests/emulator/{PROGRAMS[name][0]}.cpp ({name}) failed:\n{errors}")
    return subprocess.run(
        [str(binary), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_clean_env(), **(env or {})},
    )


def run(programs, name: str, *args: str, timeout: float = 60) -> str:
    proc = run_process(programs, name, *args, timeout=timeout)
    assert proc.returncode == 0, (
        f"{name} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


# --- 1, 2: barriers -------------------------------------------------------------------------------


def test_block_reduction_is_exact(programs):
    out = run(programs, "reduce", "correct")
    rows = re.findall(r"block (\d+) grid (\d+) wrong (\d+)", out)
    assert {(int(b), int(g)) for b, g, _ in rows} == {
        (b, g) for b in (32, 128, 256, 1024) for g in (1, 3, 8)
    }
    assert all(int(w) == 0 for _, _, w in rows), out


@pytest.mark.parametrize(
    "variant", [1, 2], ids=["missing_sync_after_store", "missing_sync_in_loop"]
)
def test_missing_syncthreads_gives_wrong_result_for_every_seed(programs, variant):
    # 20 seeds = 20 different block orders and hold-back sets: the race must show in every one.
    out = run(programs, "reduce", "racy", str(variant), "20")
    rows = [tuple(map(int, r)) for r in re.findall(r"seed (\d+) wrong (\d+) nan (\d+)", out)]
    assert [r[0] for r in rows] == list(range(1, 21))
    assert all(wrong > 0 for _, wrong, _ in rows), out
    if variant == 1:  # reading a partner's slot before it is written sees the shared-memory poison
        assert all(nan > 0 for _, _, nan in rows), out


def test_thread_sanitizer_sees_emulator_barriers(programs):
    """Under -fsanitize=thread the correct kernel is race-free (so the emulator's barriers create
    real happens-before edges) and each planted missing barrier is reported at the kernel line."""
    binary, errors = programs["reduce_tsan"]
    if binary is None and re.search(r"tsan|sanitize", errors):
        pytest.skip(f"ThreadSanitizer unavailable: {errors.strip().splitlines()[-1]}")
    clean = run_process(programs, "reduce_tsan", "correct_small")
    assert clean.returncode == 0 and "ThreadSanitizer" not in clean.stderr, clean.stderr
    assert re.findall(r"wrong (\d+)", clean.stdout) == ["0", "0"]
    for variant in ("1", "2"):
        racy = run_process(
            programs, "reduce_tsan", "racy", variant, "1", env={"TSAN_OPTIONS": "halt_on_error=1"}
        )
        assert racy.returncode != 0, racy.stdout
        assert re.search(
            r"SUMMARY: ThreadSanitizer: data race .*reduce_kernels\.cuh:\d+", racy.stderr
        ), racy.stderr


# --- 3, 4: global memory guards -------------------------------------------------------------------


def test_out_of_bounds_write_fails_the_launch(programs):
    out = run(programs, "guards", "write_after")
    assert re.search(
        r"write_after: CAUGHT emu::launch\(.*\): out-of-bounds global memory write:\s+"
        r"GuardedBuffer 'out' \(100 elements of 4 bytes\): out-of-bounds write: "
        r"4 guard byte\(s\) modified after the end \(element indices 100 to 100\)",
        out,
    ), out
    assert "after_report_guards_restored: NO ERROR" in out  # reported once, then repaired


def test_out_of_bounds_write_found_by_check(programs):
    out = run(programs, "guards", "write_before")
    assert "launch: NO ERROR" in out  # automatic checking switched off in this mode
    assert "check_in: NO ERROR" in out
    assert re.search(
        r"check_out: CAUGHT GuardedBuffer 'out' .*modified before the start "
        r"\(element indices -1 to -1\)",
        out,
    ), out


def test_in_bounds_kernel_passes_guard_checks(programs):
    out = run(programs, "guards", "clean")
    assert "clean: NO ERROR" in out and "copy exact" in out


def test_out_of_bounds_read_poisons_output(programs):
    out = run(programs, "guards", "read")
    assert "float shift -1 nan_at 0\n" in out  # out[0] = in[-1]
    assert "float shift 1 nan_at 99\n" in out  # out[99] = in[100]
    assert "int shift 1 last -1 first 7" in out  # integer guards read as all-ones


# --- 5: warp intrinsics ---------------------------------------------------------------------------


def test_warp_shuffles_and_votes(programs):
    out = run(programs, "warp")
    assert re.search(r"checks (\d+) mismatches 0", out), out
    assert int(re.search(r"checks (\d+)", out).group(1)) == 2 * 64 * 18 + 48 * 4


# --- 6: tensor cores ------------------------------------------------------------------------------


def test_wmma_gemm_within_input_precision_bounds(programs):
    out = run(programs, "wmma")
    cases = {
        m[0]: (float(m[1]), float(m[2]), int(m[3]))
        for m in re.findall(r"case (\S+) ratio (\S+) fp32_ratio (\S+) nan (\d+)", out)
    }
    assert set(cases) == {
        "half_16x16x16",
        "half_k64_4tiles_colC",
        "bf16_16x16x16",
        "bf16_k64_4tiles_colC",
        "tf32_16x16x8",
        "tf32_k64_4tiles_colC",
    }
    for name, (ratio, fp32_ratio, nans) in cases.items():
        assert nans == 0, name
        assert ratio <= 1.0, (
            f"{name}: error {ratio:.3f} x the bound justified by the input precision"
        )
        if name.startswith("tf32"):
            # Errors far beyond fp32 accumulation show the inputs were rounded to 10 mantissa bits.
            assert fp32_ratio > 4.0, name


# --- 7: atomics -----------------------------------------------------------------------------------


def test_atomic_add_counts_exactly(programs):
    out = run(programs, "atomics")
    values = dict(re.findall(r"^(\w+) (\S+)$", out, re.M))
    total = int(values["expected"])
    assert total == 8 * 256 * 50
    assert int(values["int"]) == total
    assert int(values["unsigned"]) == 2 * total
    assert int(values["ull"]) == 3 * total
    assert float(values["float"]) == total
    assert float(values["double"]) == total / 2
    assert int(values["histogram"]) == total
    assert int(values["max"]) == 8 * 256 - 1
    assert int(values["cas_winners"]) == 2  # set to 1 by the single CAS winner, +1 by it


# --- 8: shared memory -----------------------------------------------------------------------------


def test_shared_memory_is_poisoned_at_every_block_start(programs):
    out = run(programs, "smem", "poison")
    values = {k: int(v) for k, v in re.findall(r"^(\w+) (\d+)$", out, re.M)}
    n = values.pop("values")
    assert n == 4 * 256
    assert values == {
        "static_float_nan": n,
        "dynamic_float_nan": n,
        "static_half_nan": n,
        "static_2d_nan": n,
        "static_int_minus1": n,
    }, out


def test_shared_memory_limits(programs):
    out = run(programs, "smem", "limits")
    assert "static_40k: NO ERROR" in out and "static_40k value 41" in out
    assert re.search(
        r"static_40k_dynamic_16k: CAUGHT .*40960 bytes of static \+ 16384 bytes of dynamic shared "
        r"memory = 57344, over the per-block limit of 49152 bytes",
        out,
    ), out
    assert re.search(
        r"static_52k: CAUGHT .*static shared memory .* 53248 bytes, over the 49152-byte limit", out
    )
    assert re.search(
        r"dynamic_64k_no_optin: CAUGHT .*65536 bytes exceeds the kernel's maximum of 49152", out
    )
    assert (
        "optin_64k ok" in out
        and "dynamic_64k_optin: NO ERROR" in out
        and "dynamic_64k value 2" in out
    )
    assert re.search(
        r"dynamic_80k_over_attribute: CAUGHT .*81920 bytes exceeds the kernel's maximum of 65536",
        out,
    )
    assert "optin_228k refused" in out  # over sm_90's 227 KiB
    assert "optin_227k ok" in out and "dynamic_227k_optin: NO ERROR" in out


def test_shared_memory_overrun_is_reported(programs):
    out = run(programs, "smem", "overrun")
    assert "in_bounds: NO ERROR" in out
    assert re.search(
        r"overrun: CAUGHT .*shared memory out-of-bounds write: the byte 0 past the end of 'a'", out
    )


# --- 9: misuse is an error, not a hang ------------------------------------------------------------

ERROR_CASES = {
    # Reported by whichever comes second: an exit under waiting threads, or an arrival after exits.
    "early_exit": r"__syncthreads: divergent barrier: thread \(\d+,0,0\) "
    r"(exited while \d+ of 64 threads.*errors\.cpp:\d+"
    r"|reached __syncthreads at .*errors\.cpp:\d+ but \d+ of 64 threads have already exited)",
    "two_barriers": r"__syncthreads: divergent barrier: thread .* reached __syncthreads at "
    r".*errors\.cpp:(\d+) while .* wait at __syncthreads at .*errors\.cpp:(?!\1)\d+",
    # Reported by whichever comes second: a lane exiting under waiting lanes, or a shuffle naming
    # lanes that already exited. Both warps of the block do the same, so either may report first.
    "shuffle_after_exit": r"__shfl_sync: thread \(\d+,0,0\) "
    r"\((lane \d+\) exited while lanes 0x[0-9a-f]+ wait for it"
    r"|warp [01], lane \d+\) names lanes 0x[0-9a-f]+ in mask 0xffffffff that have already exited)",
    "deadlock": r"deadlock: every thread of the block is waiting and none can proceed\s+"
    r"48 of 64 threads wait at __syncthreads .*\s+"
    r"warp 1: lanes 0x0000ffff of mask 0xffffffff wait in __shfl_sync",
    "timeout": r"timeout: threads waited more than 1\.0 s at barriers or warp collectives "
    r"without progress",
    "bad_width": r"__shfl_sync: width must be a power of two in \[1, 32\], got 12",
    "bad_config": r"invalid configuration: at most 1024 threads per block",
    "host_call": r"__syncthreads called outside an emulated kernel",
}


@pytest.mark.parametrize("mode", list(ERROR_CASES))
def test_misuse_raises_clear_error(programs, mode):
    start = time.monotonic()
    out = run(programs, "errors", mode, timeout=30)
    elapsed = time.monotonic() - start
    assert re.search(rf"{mode}: CAUGHT .*{ERROR_CASES[mode]}", out, re.S), out
    assert "recovery: NO ERROR" in out and "recovery result correct" in out  # emulator still usable
    assert elapsed < (10 if mode == "timeout" else 5), f"{mode} took {elapsed:.1f} s"


# --- conversions ----------------------------------------------------------------------------------


def _nearest_of_two(
    x: np.ndarray, lo_bits: np.ndarray, step: int, ties_away: bool, shift: int
) -> np.ndarray:
    """Rounds |x| (float32 bits, finite, non-negative) to the nearest of the representable values
    lo (truncated) and lo + step, exactly in float64. Overflow rounds to inf like IEEE (inf counts
    as 2^128 in the comparison). Returns the chosen bits (as float32 bits)."""
    hi_bits = lo_bits + step
    lo = lo_bits.astype(np.uint32).view(np.float32).astype(np.float64)
    hi_is_inf = hi_bits >= 0x7F800000
    hi = np.where(
        hi_is_inf, 2.0**128, hi_bits.astype(np.uint32).view(np.float32).astype(np.float64)
    )
    xv = x.astype(np.float64)
    d_lo, d_hi = xv - lo, hi - xv
    lsb_even = ((lo_bits >> shift) & 1) == 0
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (True if ties_away else ~lsb_even))
    return np.where(pick_hi, np.where(hi_is_inf, 0x7F800000, hi_bits), lo_bits)


def test_conversions_round_correctly(programs, tmp_path):
    rng = np.random.default_rng(0)
    special = np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.99,
            65520.0,
            1e6,
            2.0**-24,
            2.0**-25,
            2.0**-26,
            3 * 2.0**-25,
            6.1e-5,
            1 + 2.0**-11,
            1 + 3 * 2.0**-11,
            1 + 2.0**-8,
            1 + 3 * 2.0**-8,
            np.inf,
            -np.inf,
            np.nan,
            3.4e38,
        ],
        dtype=np.float32,
    )
    random_bits = (
        rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    )
    # Exact halfway points between neighbouring half values (ties) and their float neighbours.
    halves = (
        rng.integers(0, 0x7C00, size=20_000).astype(np.uint16).view(np.float16).astype(np.float64)
    )
    ties = (
        (halves + np.nextafter(halves.astype(np.float16), np.float16(np.inf)).astype(np.float64))
        / 2
    ).astype(np.float32)
    x = np.concatenate([special, random_bits, ties, np.nextafter(ties, np.float32(np.inf)), -ties])
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    x.tofile(src)
    run(programs, "numerics", str(src), str(dst))
    raw = dst.read_bytes()
    n = x.size
    half_bits = np.frombuffer(raw, np.uint16, n, 0)
    bf16_bits = np.frombuffer(raw, np.uint16, n, 2 * n)
    tf32 = np.frombuffer(raw, np.float32, n, 4 * n)
    half_to_float = np.frombuffer(raw, np.float32, 65536, 8 * n)
    bf16_to_float = np.frombuffer(raw, np.float32, 65536, 8 * n + 4 * 65536)

    nan = np.isnan(x)
    # float -> half: numpy's float32 -> float16 cast is IEEE round-to-nearest-even.
    with np.errstate(over="ignore"):
        want_half = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(half_bits[~nan], want_half[~nan])
    assert np.all(np.isnan(half_bits[nan].view(np.float16)))

    bits = x.view(np.uint32).astype(np.int64)
    finite = (bits & 0x7FFFFFFF) < 0x7F800000
    inf = ~finite & ~nan
    sign, mag = bits[finite] & 0x80000000, bits[finite] & 0x7FFFFFFF
    absx = mag.astype(np.uint32).view(np.float32)
    # float -> bf16: nearest, ties to even, on the top 16 bits.
    want_bf16 = (
        sign | _nearest_of_two(absx, mag & ~0xFFFF, 0x10000, ties_away=False, shift=16)
    ) >> 16
    assert np.array_equal(bf16_bits[finite], want_bf16.astype(np.uint16))
    assert np.array_equal(bf16_bits[inf], (bits[inf] >> 16).astype(np.uint16))
    assert np.all(np.isnan((bf16_bits[nan].astype(np.uint32) << 16).view(np.float32)))
    # float -> tf32: nearest, ties away from zero, keeping 10 mantissa bits.
    want_tf32 = sign | _nearest_of_two(absx, mag & ~0x1FFF, 0x2000, ties_away=True, shift=13)
    assert np.array_equal(tf32.view(np.uint32)[finite], want_tf32.astype(np.uint32))
    assert np.array_equal(tf32[inf], x[inf]) and np.all(np.isnan(tf32[nan]))

    # half -> float and bf16 -> float for every bit pattern.
    all16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref_half = all16.view(np.float16).astype(np.float32)
    h_nan = np.isnan(ref_half)
    assert np.array_equal(half_to_float[~h_nan].view(np.uint32), ref_half[~h_nan].view(np.uint32))
    assert np.all(np.isnan(half_to_float[h_nan]))
    assert np.array_equal(bf16_to_float.view(np.uint32), all16.astype(np.uint32) << 16)


# --- portability ----------------------------------------------------------------------------------


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def test_kernel_headers_compile_with_nvcc(emu_cache_dir):
    """The kernels the emulator runs above are real CUDA: nvcc compiles them for sm_80 (which has
    bf16 and tf32 tensor cores) with torch's flags, without warnings."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    source = PROGRAM_DIR / "portable_kernels.cu"
    flags = [
        "-std=c++17",
        "-arch=sm_80",
        *TORCH_CUDA_DEFINES,
        "-Xcompiler",
        "-Wall,-Wextra",
        f"-I{CSRC}",
    ]
    key = _content_hash(_tool_version(nvcc), " ".join(flags), files=[source, *_dependencies()])
    marker = emu_cache_dir / f"nvcc-ok-{key}"
    if marker.exists():
        return
    obj = emu_cache_dir / f"portable_kernels-{os.getpid()}.o"
    proc = subprocess.run(
        [nvcc, *flags, "-c", str(source), "-o", str(obj)], capture_output=True, text=True
    )
    obj.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr
    for stale in emu_cache_dir.glob("nvcc-ok-*"):
        stale.unlink()
    marker.touch()
