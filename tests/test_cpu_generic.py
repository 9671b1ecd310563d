"""The CPU kernels' inner loops by ISA. The generic (non-AVX2) loops: float64 always runs them;
float32 runs them on CPUs without AVX2/FMA. BSCONV_CPU_GENERIC=1 forces them, so the float32 /
low-precision parity tests run again through them in a fresh process. On CPUs with AVX-512 the
stride-1 depthwise, transposed depthwise and blueprint correlation run AVX-512 loops;
BSCONV_CPU_NO_AVX512=1 leaves the AVX2 ones, which must give the same bits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import bsconv_fused  # noqa: F401  (loads the ops)

ROOT = Path(__file__).resolve().parents[1]


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return all(f in words for f in flags)


# The three-state switches of _run: keyword -> (environment variable, the value that turns the
# feature on). None leaves the variable unset (the default rule); True / False set it.
_SWITCHES = {
    "alias_split": ("BSCONV_CPU_ALIAS_SPLIT", "1"),
    "stream_stores": ("BSCONV_CPU_STREAM_STORES", "1"),
    "dw_cl": ("BSCONV_CPU_NO_DW_CL", "0"),
    "bf16_cm": ("BSCONV_CPU_NO_BF16_CM", "0"),
    "bwd_cs": ("BSCONV_CPU_BWD_CS", "1"),
    "wgrad_t": ("BSCONV_CPU_NO_WGRAD_T", "0"),
}


def _run(args: list[str], generic: bool, avx512: bool = True, bf16_gemm: bool = True,
         **switches: bool | None) -> subprocess.CompletedProcess:
    unknown = set(switches) - set(_SWITCHES)
    assert not unknown, unknown
    env = dict(os.environ)
    env["BSCONV_CPU_GENERIC"] = "1" if generic else "0"
    env["BSCONV_CPU_NO_AVX512"] = "0" if avx512 else "1"
    env["BSCONV_CPU_NO_BF16_GEMM"] = "0" if bf16_gemm else "1"
    for key, (var, on) in _SWITCHES.items():
        env.pop(var, None)
        value = switches.get(key)
        if value is not None:
            env[var] = on if value else str(1 - int(on))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_isa_switch() -> None:
    probe = ["-c", "import torch, bsconv_fused; print(torch.ops.bsconv_fused.cpu_isa())"]
    assert _run(probe, generic=True).stdout.strip() == "generic"
    assert _run(probe, generic=False, avx512=False).stdout.strip() in ("avx2", "generic")
    isa = _run(probe, generic=False).stdout.strip()
    assert isa in ("avx512", "avx2", "generic")
    if _cpu_has("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"):
        assert isa == "avx512"
    elif _cpu_has("avx2", "fma"):
        assert isa == "avx2"
    assert torch.ops.bsconv_fused.cpu_isa() in ("avx512", "avx2", "generic")


def test_generic_loops_pass_the_parity_tests() -> None:
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:logging",
              "tests/test_forward_backward.py", "-k", "not grid_float64"], generic=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_avx2_loops_pass_the_parity_tests() -> None:
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:logging",
              "tests/test_forward_backward.py", "-k", "not grid_float64"], generic=False,
             avx512=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


# Forward and every gradient, float32, for stride-1 layers the AVX-512 loops take (odd and even
# widths: pairs of pixels plus a single last one; K = 1..7 for the correlation's unrolled
# cases, a 9-wide kernel through the generic-K loops, dilation, both layouts, NCHW y from the
# channel-major store; 7 x 7, 5 x 3 and 3 x 5 kernels at dilation 1 on rows of 16 columns plus
# 3, 6 and 5 pairs) and one stride-2 layer (AVX2 in both runs), saved for comparison.
_BITS_SCRIPT = r"""
import sys, torch, bsconv_fused
sys.path.insert(0, "tests")
from helpers import make_problem
out = {"isa": torch.ops.bsconv_fused.cpu_isa()}
cases = [("u", 2, 12, 16, 13, 17, (3, 3), 1, 1), ("u", 1, 8, 24, 9, 32, (5, 5), 1, 1),
         ("s", 2, 16, 40, 11, 14, (3, 3), 1, 1), ("u", 1, 7, 9, 15, 21, (7, 7), 1, 2),
         ("u", 2, 6, 16, 12, 19, (9, 9), 1, 1), ("u", 1, 5, 16, 8, 25, (1, 4), 1, 1),
         ("u", 2, 9, 24, 12, 12, (2, 6), 1, 1), ("u", 2, 10, 16, 14, 15, (3, 3), 2, 1),
         ("u", 1, 8, 24, 9, 23, (7, 7), 1, 1), ("u", 2, 6, 16, 10, 13, (5, 3), 1, 1),
         ("s", 1, 12, 16, 9, 10, (3, 5), 1, 1)]
for i, (v, B, M, N, H, W, K, s, d) in enumerate(cases):
    for fmt in (torch.contiguous_format, torch.channels_last):
        p = make_problem(v, B=B, M=M, N=N, mid=5, H=H, W=W, K=K, stride=s, dilation=d,
                         padding="same" if s == 1 else 1, mid_activation="relu",
                         mid_affine=v == "s", seed=i)
        if s != 1 or d != 1:
            p.kwargs["padding"] = (K[0] // 2 * d, K[1] // 2 * d)
        p = p.cast(torch.float32, fmt)
        y = p.fused()
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(i))
        out[(i, str(fmt))] = [y.detach()] + list(torch.autograd.grad(y, p.inputs(), gy))
torch.save(out, sys.argv[1])
"""


def test_avx512_loops_equal_avx2_bit_for_bit(tmp_path) -> None:
    """Both runs sum every element's terms in the same order, so the results must be identical
    (on a CPU without AVX-512 both runs take the AVX2 loops and the test is an identity)."""
    files = []
    for avx512 in (True, False):
        f = tmp_path / f"bits_{int(avx512)}.pt"
        r = _run(["-c", _BITS_SCRIPT, str(f)], generic=False, avx512=avx512)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        files.append(torch.load(f))
    a, b = files
    assert b["isa"] in ("avx2", "generic")
    if _cpu_has("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"):
        assert a["isa"] == "avx512"
    assert a.keys() == b.keys() and len(a) == 23
    for key in a:
        if key == "isa":
            continue
        for ta, tb in zip(a[key], b[key]):
            assert torch.equal(ta, tb), key


def test_bf16_gemm_switch_and_float_path_bits() -> None:
    """BSCONV_CPU_NO_BF16_GEMM=1 turns the bfloat16 GEMM off (cpu_bf16_gemm says so); the
    bfloat16 forward then widens x and runs the float32 kernels, bit for bit the float32 op
    rounded (the test's exact branch). With the GEMM on, where the CPU runs it (AMX or
    AVX-512 BF16), the same test takes its GEMM branches (BSConv-U: one bfloat16 step;
    BSConv-S: accuracy)."""
    probe = ["-c", "import torch, bsconv_fused; print(torch.ops.bsconv_fused.cpu_bf16_gemm())"]
    assert _run(probe, generic=False, bf16_gemm=False).stdout.strip() == "False"
    on = _run(probe, generic=False).stdout.strip()
    assert on in ("True", "False")
    if _cpu_has("amx_bf16", "amx_tile") or _cpu_has("avx512_bf16"):
        assert on == "True"  # oneDNN's micro-kernel runs bfloat16 on AMX tiles or AVX512-BF16
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:logging",
              "tests/test_forward_backward.py", "-k", "bfloat16_forward_is_the_float32"],
             generic=False, bf16_gemm=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "10 passed" in r.stdout


def _l1_data_ways() -> int | None:
    """Ways of the L1 data cache of CPU 0, from sysfs (None where it says nothing)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "1" and \
                    (index / "type").read_text().strip() == "Data":
                return int((index / "ways_of_associativity").read_text())
        except (OSError, ValueError):
            return None
    return None


def _runs_off_and_on(tmp_path: Path, script: str, switch: str) -> list[list[torch.Tensor]]:
    """The tensors `script` saves to its argv[1], run with the _run switch `switch` off, then
    on."""
    results = []
    for on in (False, True):
        path = tmp_path / f"{switch}{int(on)}.pt"
        r = _run(["-c", script, str(path)], generic=False, **{switch: on})
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(torch.load(path))
    return results


# Forward and all gradients of a 1024 -> 1024 layer (rows 4 KiB apart in the GEMM operands:
# channels-last x, NCHW x gathered channels-last, gv) on 2 x 12 x 11 pixels (packed weights,
# tasks of rows that are not multiples of 16), both layouts, saved to argv[1].
_ALIASED_ROWS = """
import sys, torch, bsconv_fused
from bsconv_fused import functional as BF
torch.manual_seed(0)
out = []
for fmt in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(2, 1024, 12, 11).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(1024, 1024, 1, 1) / 32).requires_grad_()
    dw = torch.randn(1024, 1, 3, 3).requires_grad_()
    b = torch.randn(1024).requires_grad_()
    y = BF.bsconv_u(x, w, dw, b, padding=1)
    y.backward(torch.randn_like(y))
    out += [y.detach(), x.grad, w.grad, dw.grad, b.grad]
torch.save(out, sys.argv[1])
"""


def test_alias_split_switch_and_bits(tmp_path: Path) -> None:
    """GEMM operands whose rows are 4 KiB apart go to the micro-kernel 16 rows at a time on
    CPUs whose L1 data cache has fewer than 12 ways (gemm.h, alias_split_enabled; the
    cpu_alias_split op says which); BSCONV_CPU_ALIAS_SPLIT=0/1 forces either. Both must give
    the same bits (each output element sums the same products in the same order), so the
    float64-checked 1024-channel test covers the path this CPU does not take by default."""
    probe = ["-c", "import torch, bsconv_fused; print(torch.ops.bsconv_fused.cpu_alias_split())"]
    assert _run(probe, generic=False, alias_split=True).stdout.strip() == "True"
    assert _run(probe, generic=False, alias_split=False).stdout.strip() == "False"
    default = _run(probe, generic=False).stdout.strip()
    assert default in ("True", "False")
    ways = _l1_data_ways()
    if ways:
        assert default == str(ways < 12)
    results = _runs_off_and_on(tmp_path, _ALIASED_ROWS, "alias_split")
    assert len(results[0]) == len(results[1]) == 10
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _largest_cache_bytes() -> int | None:
    """The largest of the L2 and L3 sizes glibc reports (what the extension's sysconf calls
    see), None if it reports neither."""
    sizes = []
    for name in ("LEVEL2_CACHE_SIZE", "LEVEL3_CACHE_SIZE"):
        try:
            out = subprocess.run(["getconf", name], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
            sizes.append(int(out))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return max(sizes) if sizes and max(sizes) > 0 else None


# Forwards with channels-last y, saved to argv[1] with a float64 reference each: one chunk of
# all channels (one run of y per block), chunks of 128 + 72 channels (a run per pixel that
# starts mid-line), 12 channels (padded to 16 in the scratch rows), odd widths, stride 2, a
# mid transform, and BSConv-S.
_STREAMED = """
import sys, torch, bsconv_fused
from bsconv_fused import functional as BF
torch.manual_seed(0)
conv = torch.nn.functional.conv2d
out = []
cases = [(2, 64, 64, 17, 23, 3, 1, 0), (3, 96, 200, 9, 13, 3, 1, 0), (2, 5, 12, 11, 7, 5, 1, 0),
         (2, 48, 80, 15, 15, 3, 2, 0), (2, 40, 56, 10, 9, 3, 1, 8)]
for B, M, N, H, W, K, s, mid in cases:
    x = torch.randn(B, M, H, W).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(N, 1, K, K)
    b = torch.randn(N)
    if mid:
        w1 = torch.randn(mid, M, 1, 1) / M ** 0.5
        w2 = torch.randn(N, mid, 1, 1) / mid ** 0.5
        y = BF.bsconv_s(x, w1, w2, dw, b, stride=s, padding=K // 2)
        v = conv(conv(x.double(), w1.double()), w2.double())
    else:
        w = torch.randn(N, M, 1, 1) / M ** 0.5
        sc, sh = torch.rand(N) + 0.5, torch.randn(N)
        y = BF.bsconv_u(x, w, dw, b, stride=s, padding=K // 2, mid_scale=sc, mid_shift=sh,
                        mid_activation="relu")
        v = conv(x.double(), w.double())
        v = torch.relu(v * sc.double().view(1, -1, 1, 1) + sh.double().view(1, -1, 1, 1))
    ref = conv(v, dw.double(), b.double(), s, K // 2, groups=N)
    out += [y, ref, torch.tensor(y.is_contiguous(memory_format=torch.channels_last))]
torch.save(out, sys.argv[1])
"""


_RESIDENT = """
import mmap, torch, bsconv_fused
resident = torch.ops.bsconv_fused.cpu_pages_resident
fresh = mmap.mmap(-1, 16 << 20)  # an anonymous mapping no page of which was touched yet
t = torch.frombuffer(fresh, dtype=torch.uint8)
before = resident(t)
t.fill_(1)
print(before, resident(t), resident(t[: 1 << 20]), resident(torch.ones(1000)))
"""


def test_pages_resident() -> None:
    """A streamed output must already be backed by pages (simd.h, pages_resident): a fresh
    16 MB anonymous mapping is not, until written; written memory and a small heap tensor
    are. On non-Linux builds the predicate is always False (no streaming)."""
    r = _run(["-c", _RESIDENT], generic=False)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = "False True True True" if sys.platform.startswith("linux") else \
        "False False False False"
    assert r.stdout.strip() == expected


def test_stream_store_switch_and_bits(tmp_path: Path) -> None:
    """A float forward whose channels-last output is at least the last-level cache's size, on
    resident pages, writes it from scratch rows by streaming stores (simd.h, stream_output; the
    cpu_stream_threshold op says from how many bytes, -1 never, 0 always, resident or not);
    BSCONV_CPU_STREAM_STORES=0/1 forces either. The
    copies move the same values, so both runs must give the same bits; with the streaming
    forced on, every output here (a few KB to a few hundred) goes through it, runs that start
    and end mid-line included, and each must match its float64 reference."""
    probe = ["-c", "import torch, bsconv_fused; "
                   "print(torch.ops.bsconv_fused.cpu_stream_threshold())"]
    assert _run(probe, generic=False, stream_stores=True).stdout.strip() == "0"
    assert _run(probe, generic=False, stream_stores=False).stdout.strip() == "-1"
    default = int(_run(probe, generic=False).stdout.strip())
    llc = _largest_cache_bytes()
    assert default == (llc if llc else 32 << 20)
    results = _runs_off_and_on(tmp_path, _STREAMED, "stream_stores")
    assert len(results[0]) == len(results[1]) == 15
    for i in range(0, 15, 3):
        (y0, ref, cl0), (y1, _, cl1) = results[0][i:i + 3], results[1][i:i + 3]
        assert bool(cl0) and bool(cl1)
        assert torch.equal(y0, y1)
        # float32 sums of at most 200 products plus 25 taps, |terms| ~ 1: 1e-4 relative to
        # the output's scale is ~100x float32 rounding, far below any misplaced value.
        scale = ref.abs().max().item()
        assert (y1.double() - ref).abs().max().item() <= 1e-4 * scale


# Forward of layers the channels-last (B16) depthwise takes (AVX-512, stride 1 or 2, dilation
# 1, zero padding, Kw 3 / 5 / 7, channel counts in multiples of 16, no mid transform): every
# tail of R = 1..15 columns after tiles of 16 (NCHW and float channels-last y: one tile of R;
# bfloat16 channels-last y: tiles of 8, 4, 2 and 1), and none, Kh != Kw, asymmetric
# and no padding, stride 2, two channel chunks (160 = 128 + 32), small images grouped per
# task, NCHW x projected channel-major (U) and through u (S), float32, bfloat16 and float16
# (channels-last only: float16 NCHW y stays on the B8 loops), both layouts; calls of at least
# 256 pixels (fewer, and small projections of NCHW x run proj_b8's B8 register tiles). Saves
# per case the output, the float64 reference and how many forwards took the B16 loops.
_DW_CL = r"""
import os, sys
# NCHW bfloat16 layers through the B16 loops too (test_bf16_nchw_channel_major_switch_and_bits
# covers their channel-major path).
os.environ["BSCONV_CPU_NO_BF16_CM"] = "1"
import torch, bsconv_fused
sys.path.insert(0, "tests")
from helpers import make_problem
out = []
cases = [("u", 2, 12, 16, 9, 37, (3, 3), 1), ("u", 1, 24, 48, 9, 31, (5, 5), 2),
         ("u", 8, 20, 32, 6, 6, (7, 7), 3), ("u", 1, 40, 160, 12, 23, (3, 5), (1, 2)),
         ("u", 1, 64, 64, 12, 40, (3, 3), 1), ("s", 2, 32, 32, 11, 18, (5, 3), (2, 1)),
         ("u", 2, 48, 32, 8, 19, (3, 7), (0, 0)), ("u", 1, 32, 16, 5, 62, (1, 3), (0, 1)),
         ("u", 2, 24, 32, 15, 29, (3, 3), 1, 2), ("s", 1, 32, 48, 20, 40, (5, 5), 2, 2),
         ("u", 1, 16, 16, 9, 64, (3, 7), (1, 3), 2)]
# The tails the layers above leave out: R = 1, 3, 9, 10, 11, 12.
cases += [("u", 1, 16, 16, 16, W, (3, 3), 1) for W in (17, 19, 25, 26, 27, 28)]
ops = torch.ops.bsconv_fused
for i, (v, B, M, N, H, W, K, pad, *stride) in enumerate(cases):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            p = make_problem(v, B=B, M=M, N=N, mid=8, H=H, W=W, K=K, padding=pad,
                             stride=stride[0] if stride else 1, seed=i)
            ref = p.reference().detach()
            q = p.cast(dtype, fmt)
            before = ops.cpu_depthwise_cl_forwards()
            with torch.no_grad():
                y = q.fused()
            taken = ops.cpu_depthwise_cl_forwards() - before
            out += [y, ref, torch.tensor(taken)]
torch.save(out, sys.argv[1])
"""


def test_channels_last_depthwise_switch_and_bits(tmp_path: Path) -> None:
    """BSCONV_CPU_NO_DW_CL=1 keeps the B8 depthwise loops; on an AVX-512 CPU the default runs
    the B16 ones for these layers (cpu_depthwise_cl_forwards counts them). Both sum each
    output's terms in the same order and round bfloat16 outputs the same way, so the two runs
    must give the same bits; and the float32 outputs must match their float64 references. A
    third run streams the channels-last float32 outputs (BSCONV_CPU_STREAM_STORES=1: from the
    B16 loops through scratch rows) and must give the same bits too."""
    results = _runs_off_and_on(tmp_path, _DW_CL, "dw_cl")
    path = tmp_path / "dw_cl_streamed.pt"
    r = _run(["-c", _DW_CL, str(path)], generic=False, dw_cl=True, stream_stores=True)
    assert r.returncode == 0, r.stderr[-2000:]
    results.append(torch.load(path))
    n = 17 * 3 * 2
    assert len(results[0]) == len(results[1]) == len(results[2]) == 3 * n
    avx512 = _cpu_has("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl")
    for k in range(n):
        y0, ref, taken0 = results[0][3 * k:3 * k + 3]
        y1, _, taken1 = results[1][3 * k:3 * k + 3]
        y2, _, taken2 = results[2][3 * k:3 * k + 3]
        half_nchw = y1.dtype == torch.float16 and not y1.is_contiguous(
            memory_format=torch.channels_last)
        assert int(taken0) == 0, k
        assert int(taken1) == int(taken2) == (1 if avx512 and not half_nchw else 0), k
        assert y1.shape == ref.shape
        assert torch.equal(y0, y1), k
        assert torch.equal(y0, y2), k
        if y1.dtype == torch.float32:
            # float32 sums of at most 64 products plus 25 taps, |terms| ~ 1: 1e-4 relative to
            # the output's scale is ~100x float32 rounding, far below any misplaced value.
            scale = ref.abs().max().item()
            assert (y1.double() - ref).abs().max().item() <= 1e-4 * scale, k


# Backward of layers the B16 backward loops take (AVX-512, float32, stride 1 or 2 per axis,
# dilation 1, zero padding, Kw 3 / 5 / 7, channel counts in multiples of 16, no mid transform:
# gv_rows_cl, gb_rows_cl in simd.h): gv tiles of 16 with every tail (W % 16 = 1..15 over the
# cases), gb tiles of 8 with every tail (Wo % 8), both phases of stride-2 columns with 1 to 4
# taps each, images one pixel wide or high, Kh != Kw, asymmetric ('same' with Kh = 4), large
# and no padding, several images per task, BSConv-S, both layouts of x and gy, and gradients
# of subsets of the inputs (only x: no blueprint correlation; only the depthwise weight: no
# transposed depthwise). The B8 run projects v the same way except in calls of fewer than 256
# pixels with NCHW x of at most 64 channels (proj_b8: other roundings of v), where only the
# blueprint gradient (the one gradient that reads v) may differ in its last bits. Two layers
# the loops do not take (a mid transform, dilation 2) check the condition. Saves per case the
# gradients, the float64 reference's, their magnitudes, how many backwards took the B16
# loops, and per gradient whether the two runs must agree bit for bit.
_DW_CL_BWD = r"""
import sys, torch, bsconv_fused
sys.path.insert(0, "tests")
from helpers import backward_case
out = []
# (variant, B, M, N, H, W, K, padding, stride, options, which inputs need gradients)
cases = [("u", 1, 32, 64, 12, 40, (3, 3), 1, 1, {}, "all"),
         ("u", 2, 24, 32, 9, 37, (5, 5), 2, 1, {}, "all"),
         ("u", 3, 16, 16, 6, 19, (7, 7), 3, 1, {}, "all"),
         ("u", 1, 40, 160, 7, 23, (3, 5), (1, 2), 1, {}, "all"),
         ("u", 2, 48, 32, 8, 29, (5, 3), (0, 0), 1, {}, "all"),
         ("u", 1, 16, 48, 5, 30, (1, 3), (0, 1), 1, {}, "all"),
         ("u", 2, 16, 16, 1, 27, (3, 7), (1, 4), 1, {}, "all"),
         ("u", 1, 96, 32, 11, 21, (4, 5), "same", 1, {}, "all"),
         ("s", 2, 32, 48, 10, 26, (3, 3), 1, 1, {}, "all"),
         ("s", 1, 24, 32, 9, 31, (5, 5), 2, 1, {}, "all"),
         ("u", 1, 32, 32, 12, 25, (3, 3), 1, 1, {}, "x"),
         ("u", 2, 32, 32, 10, 28, (5, 5), 2, 1, {}, "dw"),
         ("u", 1, 16, 32, 6, 17, (3, 3), 1, 1, {}, "all"),
         ("u", 2, 24, 32, 15, 29, (3, 3), 1, 2, {}, "all"),
         ("u", 1, 16, 48, 12, 35, (7, 7), 3, 2, {}, "all"),
         ("u", 2, 16, 32, 13, 21, (5, 5), 2, (2, 1), {}, "all"),
         ("u", 1, 32, 16, 9, 26, (3, 3), 0, (1, 2), {}, "all"),
         ("s", 2, 32, 32, 11, 17, (5, 3), (2, 1), 2, {}, "all"),
         ("u", 1, 32, 16, 6, 3, (3, 3), 1, 2, {}, "all"),
         ("u", 2, 16, 16, 10, 1, (3, 7), (1, 3), 2, {}, "all"),
         ("u", 1, 80, 32, 14, 33, (3, 7), (1, 3), 2, {}, "dw"),
         ("u", 1, 32, 32, 12, 20, (3, 3), 1, 1, {"mid_affine": True}, "all"),
         ("u", 1, 16, 32, 12, 20, (3, 3), 2, 1, {"dilation": 2}, "all")]
ops = torch.ops.bsconv_fused
for i, case in enumerate(cases):
    _, B, M, _, H, W = case[:6]
    for fmt in (torch.contiguous_format, torch.channels_last):
        c = backward_case(case, i, fmt, mid=8)
        p = c.p
        before = ops.cpu_depthwise_cl_backwards()
        g = torch.autograd.grad(c.q.fused(), c.want, c.gy.float())
        taken = ops.cpu_depthwise_cl_backwards() - before
        idx, gref, mags = c.reference_grads()
        small_nchw = fmt == torch.contiguous_format and B * H * W < 256 and M <= 64
        dw_index = 1 + len(p.pws)
        exact = [not (small_nchw and k == dw_index) for k in idx]
        out.append([list(g), gref, mags, torch.tensor(taken), torch.tensor(exact)])
torch.save(out, sys.argv[1])
"""


def test_channels_last_backward_switch_and_bits(tmp_path: Path) -> None:
    """BSCONV_CPU_NO_DW_CL=1 keeps the backward's B8 loops too; on an AVX-512 CPU the default
    runs the B16 ones for these layers (cpu_depthwise_cl_backwards counts them). Both sum each
    gradient's terms in the same order, so the two runs must give the same bits (where both
    project v the same way), and every gradient must match its float64 reference."""
    results = _runs_off_and_on(tmp_path, _DW_CL_BWD, "dw_cl")
    n = 23 * 2
    assert len(results[0]) == len(results[1]) == n
    avx512 = _cpu_has("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl")
    for k in range(n):
        g0, ref, mags, taken0, exact = results[0][k]
        g1, _, _, taken1, _ = results[1][k]
        takes = k // 2 < 21  # the last two: a mid transform, dilation 2
        assert int(taken0) == 0, k
        assert int(taken1) == (1 if avx512 and takes else 0), k
        assert len(g1) == len(ref) == len(mags) == len(exact) > 0, k
        for a, b, r, m, e in zip(g0, g1, ref, mags, exact.tolist()):
            assert b.shape == r.shape, k
            if e:
                assert torch.equal(a, b), k
            # Rounding of float32 sums of up to ~3000 terms stays far below 2^-14 of the sum of
            # |terms| (m: 2^-22 in these runs); a missing or misplaced term moves a result by
            # ~m / 3000 or more.
            assert ((b.double() - r).abs() <= 2.0 ** -14 * m + 1e-30).all(), k


# bfloat16 NCHW forwards (BSConv-U and -S, square and other kernels, paddings up to larger than
# the kernel, channel counts that are not multiples of 16, tasks of several bands (the 120-wide
# layer) and of channel chunks (B = 1)), their outputs, float64 references of the same bfloat16
# inputs and whether forward_bf16_cm took them, saved to argv[1].
_BF16_CM = r"""
import sys, torch, bsconv_fused
sys.path.insert(0, "tests")
from helpers import assert_accurate, magnitudes, make_problem
out = []
cases = [("u", 2, 12, 16, 9, 37, (3, 3), 1), ("u", 1, 24, 48, 9, 31, (5, 5), 2),
         ("u", 3, 20, 32, 6, 6, (7, 7), 3), ("u", 1, 40, 160, 12, 23, (3, 5), (1, 2)),
         ("s", 2, 32, 32, 11, 18, (5, 3), (2, 1)), ("u", 2, 48, 34, 8, 19, (3, 7), (0, 0)),
         ("u", 1, 32, 16, 5, 62, (1, 3), (0, 1)), ("u", 2, 30, 10, 7, 7, (3, 3), (4, 4)),
         ("u", 1, 64, 96, 40, 120, (3, 3), 1), ("s", 1, 64, 96, 40, 120, (3, 3), 1),
         ("u", 1, 256, 256, 14, 14, (3, 3), 1), ("s", 2, 128, 64, 14, 14, (5, 5), 2)]
# Stride 2 (square kernels; taken where the channels-last path would copy x): small images in
# groups, a layer of several channel chunks, one of several bands, a kernel that is not square.
cases += [("u", 3, 20, 32, 6, 6, (7, 7), 3, 2), ("u", 2, 256, 512, 28, 28, (3, 3), 1, 2),
          ("s", 4, 64, 96, 9, 10, (5, 5), 2, 2), ("u", 1, 64, 96, 40, 120, (3, 3), 1, 2),
          ("u", 1, 16, 16, 16, 16, (3, 5), 1, 2)]
ops = torch.ops.bsconv_fused
for i, (v, B, M, N, H, W, K, pad, *st) in enumerate(cases):
    p = make_problem(v, B=B, M=M, N=N, mid=22, H=H, W=W, K=K, padding=pad,
                     stride=st[0] if st else 1, seed=i)
    q = p.cast(torch.bfloat16, torch.contiguous_format, requires_grad=False)
    if i == 0:
        # Denormal outputs (tiny taps, no bias; the AMX GEMM flushes denormal inputs, so v is
        # normal) and a NaN: rounded in the slow way (bf16x16_round_avx512)
        q.x[1, :, 2:6, 4:20] *= 1e-20
        q.dw_weight.mul_(1e-19)
        q.dw_bias.zero_()
        q.x[0, 3, 4, 5] = float("nan")
    before = ops.cpu_bf16_cm_forwards()
    with torch.no_grad():
        y = q.fused()
    taken = ops.cpu_bf16_cm_forwards() - before
    ref = q.cast(torch.float64, requires_grad=False).reference().detach()
    if v == "s":
        # u rounded to bfloat16 between the GEMMs (the second padded to a depth of 32 with
        # zeros): as accurate as the unfused bfloat16 path, which rounds u too.
        y_abs, _ = magnitudes(q, torch.ones_like(ref))
        with torch.no_grad():
            assert_accurate("y", y, q.reference(), ref, y_abs)
    out += [y, ref, torch.tensor(taken)]
torch.save(out, sys.argv[1])
"""


def test_bf16_nchw_channel_major_switch_and_bits(tmp_path: Path) -> None:
    """BSCONV_CPU_NO_BF16_CM=1 sends bfloat16 NCHW x through the channels-last path; on an
    AVX-512 CPU with the bfloat16 GEMM the default projects NCHW x in VNNI panels as it lies
    and runs the depthwise by channel planes (cpu_bf16_cm_forwards counts those calls; stride
    2 only where the channels-last path would copy x, at least two of these layers). The
    micro-kernel sums each v value's products in the same order either way and both
    depthwise loops sum bias, kh, kw in the same order with the same rounding, so the two runs
    must give the same bits, NaNs and denormal outputs included (which vcvtneps2bf16 would
    round otherwise than c10). BSConv-U outputs must also be within a bfloat16 rounding of
    their float64 references (the inputs' exact products summed in float); BSConv-S outputs
    as accurate as the unfused bfloat16 path (checked in the script)."""
    results = _runs_off_and_on(tmp_path, _BF16_CM, "bf16_cm")
    n = 17
    assert len(results[0]) == len(results[1]) == 3 * n
    avx512 = _cpu_has("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl")
    gemm = torch.ops.bsconv_fused.cpu_bf16_gemm()
    stride2_taken = 0
    for k in range(n):
        y0, ref, taken0 = results[0][3 * k:3 * k + 3]
        y1, _, taken1 = results[1][3 * k:3 * k + 3]
        assert int(taken0) == 0, k
        if k < 12:
            assert int(taken1) == (1 if avx512 and gemm else 0), k
        elif k < 16:
            stride2_taken += int(taken1)
        else:
            assert int(taken1) == 0, k  # stride 2 with a kernel that is not square
        assert y1.dtype == torch.bfloat16 and y1.shape == ref.shape and y1.is_contiguous()
        assert torch.equal(y0.view(torch.int16), y1.view(torch.int16)), k
        if k == 0:  # NaNs and denormals where the first layer has them
            assert bool(y1.isnan().any()) and bool(((y1 != 0) & (y1.abs() < 1e-37)).any())
        if k not in (0, 4, 9, 11, 14):  # BSConv-S rounds u to bfloat16 between its GEMMs
            # One bfloat16 rounding (eps / 2 relative) of the float sum, whose own error
            # (products exact, at most a few hundred terms) is ~1e-6 of the output's scale.
            err = (y1.double() - ref).abs()
            tol = torch.finfo(torch.bfloat16).eps / 2 * ref.abs() + 1e-5 * ref.abs().max()
            assert bool((err <= tol).all()), k
    assert stride2_taken >= (2 if avx512 and gemm else 0)


# Backward of BSConv-U layers by channel chunks (backward_channel_split: float32, the B16
# loops' shapes, packed weights, i.e. at least 256 pixels per call): output-channel chunks of
# 128 with a 16-wide tail (N = 144), input-channel chunks with a tail of 72 (M = 200), channel
# counts below a chunk that are not multiples of 32, stride 2, Kh = 1 with stride 2 (v rows no
# output reads: zero gv), K = 5 and 7, three 64x64 images in two groups (the weight, blueprint
# and bias gradients accumulated across groups), gradients of subsets of the inputs, both
# layouts; then three layers it does not take (a mid transform, BSConv-S, an image whose
# buffers exceed a group's budget) and two for the default rule (1 MiB of weights: two images
# taken, one image not). Saves per case the gradients, the float64 reference's, their
# magnitudes, how many backwards ran backward_channel_split, and whether one thread gave the
# same bits as the default thread count.
_CS_BWD = r"""
import sys, torch, bsconv_fused
sys.path.insert(0, "tests")
from helpers import backward_case_runs
# (variant, B, M, N, H, W, K, padding, stride, options, which inputs need gradients)
cases = [("u", 2, 64, 48, 12, 13, (3, 3), 1, 1, {}, "all"),
         ("u", 3, 72, 144, 9, 11, (5, 5), 2, 1, {}, "all"),
         ("u", 2, 200, 96, 10, 14, (3, 3), 1, 2, {}, "all"),
         ("u", 2, 32, 48, 9, 20, (1, 3), (0, 1), 2, {}, "all"),
         ("u", 2, 32, 32, 6, 30, (7, 7), 3, 1, {}, "all"),
         ("u", 3, 64, 64, 64, 64, (3, 3), 1, 1, {}, "all"),
         ("u", 2, 48, 64, 12, 16, (3, 3), 1, 1, {}, "x"),
         ("u", 2, 48, 64, 12, 16, (3, 3), 1, 1, {}, "dw"),
         ("u", 2, 48, 64, 12, 16, (3, 3), 1, 1, {}, "w"),
         ("u", 2, 32, 32, 12, 20, (3, 3), 1, 1, {"mid_affine": True}, "all"),
         ("s", 2, 64, 64, 12, 20, (3, 3), 1, 1, {}, "all"),
         ("u", 2, 256, 256, 54, 54, (3, 3), 1, 1, {}, "x"),
         ("u", 2, 512, 512, 12, 12, (3, 3), 1, 1, {}, "all"),
         ("u", 1, 512, 512, 16, 16, (3, 3), 1, 1, {}, "all")]
torch.save(backward_case_runs(cases, torch.ops.bsconv_fused.cpu_channel_split_backwards),
           sys.argv[1])
"""


def test_channel_split_backward_switch_and_accuracy(tmp_path: Path) -> None:
    """BSCONV_CPU_BWD_CS=0 keeps every backward on backward_kernel, =1 sends every layer the
    channel-split loops can run there (on an AVX-512 CPU, images whose buffers fit a group's
    budget), unset leaves it to the rule (BSConv-U, M x N >= 512 x 512, two images or more).
    Every gradient of every run must match its float64 reference, and one thread must give the
    same bits as the default count (the chunks, groups and sums are fixed by the geometry)."""
    runs = []
    for setting in (False, True, None):
        path = tmp_path / f"cs{setting}.pt"
        r = _run(["-c", _CS_BWD, str(path)], generic=False, bwd_cs=setting)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(torch.load(path))
    n = 14 * 2
    assert all(len(res) == n for res in runs)
    avx512 = _cpu_has("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl")

    def expect(setting: bool | None, k: int) -> int:
        if setting is False:
            return 0
        if setting is True:
            return int(avx512 and k // 2 not in (9, 10, 11))
        return int(avx512 and k // 2 == 12)

    # float32 sums of up to 12288 terms (three 64x64 images): these runs pass at 2^-17.
    _assert_backward_runs((False, True, None), runs, expect)


def _assert_backward_runs(settings: tuple, runs: list, expect) -> None:
    """Checks backward_case_runs results, one list per switch setting: the counter moved by
    expect(setting, k) in result k, one thread gave the default count's bits, and each
    gradient is within 2^-15 of the sum of |terms| of its float64 reference. The sums run in
    float32 over at most ~12288 terms, blocked (GEMM depth in chunks of 512, then images, tasks
    and groups): their rounding stays below that; a missing or misplaced term moves a result by
    ~m / 12288 = 2^-13.6 m on average."""
    for setting, res in zip(settings, runs):
        for k, (g, ref, mags, taken, same) in enumerate(res):
            assert int(taken) == expect(setting, k), (setting, k)
            assert bool(same), (setting, k)
            assert len(g) == len(ref) == len(mags) > 0, (setting, k)
            for a, r, m in zip(g, ref, mags):
                assert a.shape == r.shape, (setting, k)
                assert ((a.double() - r).abs() <= 2.0 ** -15 * m + 1e-30).all(), (setting, k)


# The projection's weight gradient as its transpose, gW^T = x^T gv (backward_kernel's wgrad_t:
# float32 with packed weights, i.e. at least 256 pixels per call: BSConv-U with NCHW x, whose
# rows it reads in place, one GEMM per image of a task, or channels-last x with fewer input
# than output channels; BSConv-S's second projection, gW2^T = u^T gv). Layers: two images in
# two tasks, a channel count that is not a multiple of 16 (the B8 loops), one image in bands
# of rows with stride 2, sixteen small images four to a task, reflect padding, a mid
# transform, two 64x64 images in many tasks and groups (the transposed partials accumulated
# within a group and summed across groups), gradient subsets, BSConv-S with few and with many
# tasks; two layers it does not take (BSConv-U's weight gradient not asked for, 64 pixels: no
# packed weights); and a one-row image of 300 pixels, a single task (gW^T is the only
# partial). Saves per case and layout the gradients, the float64 reference's, their
# magnitudes, how many backwards took it and whether one thread gave the same bits as the
# default thread count.
_WGRAD_T = r"""
import sys, torch, bsconv_fused
sys.path.insert(0, "tests")
from helpers import backward_case_runs
# (variant, B, M, N, H, W, K, padding, stride, options, which inputs need gradients)
cases = [("u", 2, 32, 48, 12, 13, (3, 3), 1, 1, {}, "all"),
         ("u", 3, 72, 40, 20, 22, (5, 5), 2, 1, {}, "all"),
         ("u", 1, 96, 64, 40, 40, (3, 3), 1, 2, {}, "all"),
         ("u", 16, 48, 64, 10, 10, (3, 3), 1, 1, {}, "all"),
         ("u", 2, 24, 32, 15, 17, (3, 3), 1, 1, {"padding_mode": "reflect"}, "all"),
         ("u", 2, 32, 48, 12, 20, (3, 3), 1, 1, {"mid_affine": True}, "all"),
         ("u", 2, 64, 96, 64, 64, (3, 3), 1, 1, {}, "all"),
         ("u", 2, 48, 64, 12, 16, (3, 3), 1, 1, {}, "w"),
         ("u", 2, 48, 64, 12, 16, (3, 3), 1, 1, {}, "x"),
         ("s", 2, 64, 96, 12, 20, (3, 3), 1, 1, {}, "all"),
         ("s", 2, 48, 80, 64, 64, (3, 3), 1, 1, {}, "all"),
         ("u", 1, 16, 32, 8, 8, (3, 3), 1, 1, {}, "all"),
         ("u", 1, 16, 32, 1, 300, (1, 3), (0, 1), 1, {}, "all")]
torch.save(backward_case_runs(cases, torch.ops.bsconv_fused.cpu_wgrad_t_backwards), sys.argv[1])
"""


def test_transposed_weight_gradient_switch_and_accuracy(tmp_path: Path) -> None:
    """BSCONV_CPU_NO_WGRAD_T=1 keeps gW = gv^T x; unset, the layers the rule names compute gW^T.
    Every gradient of both runs must match its float64 reference, and one thread must give
    the same bits as the default count (tasks, groups and sums fixed by the geometry)."""
    runs = []
    for setting in (False, None):
        path = tmp_path / f"wt{setting}.pt"
        r = _run(["-c", _WGRAD_T, str(path)], generic=False, wgrad_t=setting)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(torch.load(path))
    n = 13 * 2
    assert all(len(res) == n for res in runs)
    # (M < N) per case: BSConv-U's channels-last x takes it only then.
    fewer_in = [True, False, False, True, True, True, True, True]

    def expect(setting: bool | None, k: int) -> int:
        case, nchw = k // 2, k % 2 == 0
        if case in (9, 10, 12):  # BSConv-S (Mmid < N), and M < N: either layout
            return int(setting is None)
        return int(setting is None and case <= 7 and (nchw or fewer_in[case]))

    # float32 sums of up to 8192 terms (two 64x64 images).
    _assert_backward_runs((False, None), runs, expect)
