"""Parity of the fused ops with the float64 reference: forward and every gradient, over the
option grid, dtypes, memory formats and odd sizes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from helpers import (
    assert_accurate,
    fused_op_ran,
    grads,
    magnitudes,
    make_problem,
    max_err,
    num_threads,
)

from bsconv_fused import functional as BF

torch.manual_seed(0)

# Double-precision sums here have at most a few hundred terms of magnitude ~1, so both paths
# are within ~1e-13 of the exact value; 1e-11 leaves room without hiding a wrong tap or index.
F64_TOL = 1e-11


def check_f64(p):
    """Forward and all gradients of the fused op against the reference, both in float64."""
    p64 = p.cast(torch.float64)
    y = p64.fused()
    r = p64.reference()
    assert y.shape == r.shape
    assert max_err(y, r) <= F64_TOL * max(1.0, r.abs().max().item())
    gy = torch.randn(r.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(grads(y, p64.inputs(), gy), grads(r, p64.inputs(), gy)):
        assert a.shape == b.shape
        assert max_err(a, b) <= F64_TOL * max(1.0, b.abs().max().item())


GRID = [
    # (K, stride, padding, dilation)
    ((3, 3), 1, 1, 1),
    ((3, 3), 2, 1, 1),
    ((3, 3), 1, "same", 2),
    ((5, 5), 1, 2, 1),
    ((5, 5), 2, 2, 1),
    ((7, 7), 1, 3, 1),
    ((1, 1), 1, 0, 1),
    ((2, 3), 1, "same", 1),  # even kernel: asymmetric 'same'
    ((3, 2), (2, 1), (1, 0), (1, 2)),
    ((4, 4), 3, 2, 1),
    ((3, 3), 1, "valid", 1),
]


@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("K,stride,padding,dilation", GRID)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("act", [None, "relu", "relu6", "hardswish"])
def test_grid_float64(variant, K, stride, padding, dilation, padding_mode, act):
    p = make_problem(variant, K=K, stride=stride, padding=padding, dilation=dilation,
                     padding_mode=padding_mode, mid_activation=act,
                     mid_affine=act is not None, H=9, W=8)
    check_f64(p)


@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("bias,affine", [(False, False), (True, False), (False, True)])
def test_optional_inputs(variant, bias, affine):
    check_f64(make_problem(variant, bias=bias, mid_affine=affine, padding=1))


def test_scale_only_and_shift_only():
    p = make_problem("u", padding=1, mid_affine=True)
    check_f64(p.__class__(p.variant, p.x, p.pws, p.dw_weight, p.dw_bias, p.mid_scale, None,
                          p.kwargs))
    check_f64(p.__class__(p.variant, p.x, p.pws, p.dw_weight, p.dw_bias, None, p.mid_shift,
                          p.kwargs))


@pytest.mark.parametrize("shape", [
    dict(B=1, M=1, N=1, mid=1, H=1, W=1),
    dict(B=3, M=3, N=17, mid=2, H=7, W=5),
    dict(B=1, M=17, N=3, mid=5, H=5, W=7),
    dict(B=2, M=4, N=4, mid=4, H=1, W=9),
    dict(B=1, M=2, N=5, mid=1, H=2, W=1),
])
@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate", "circular"])
def test_odd_sizes(shape, variant, padding_mode):
    check_f64(make_problem(variant, padding=1, padding_mode=padding_mode,
                           mid_activation="relu6", mid_affine=True, **shape))


def test_large_channels_and_image_cross_tiles():
    # Big enough that the CPU kernels split the image and the channels into several tiles.
    for variant in "us":
        check_f64(make_problem(variant, B=2, M=96, N=160, mid=24, H=40, W=36, padding=1,
                               mid_activation="hardswish", mid_affine=True))
        check_f64(make_problem(variant, B=1, M=64, N=200, mid=16, H=23, W=29, K=(5, 5),
                               stride=2, padding=2, padding_mode="reflect"))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant", ["u", "s"])
def test_small_images_projected_in_groups(threads, layout, variant):
    # Images of fewer than 196 pixels are projected several per GEMM (all channel chunks in one
    # task); 7 images make a full and a partial group on two threads, N = 136 two chunks.
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    p = make_problem(variant, B=7, M=72, N=136, mid=20, H=5, W=6, padding=1, stride=(1, 2),
                     padding_mode="reflect", mid_activation="relu", mid_affine=True)
    with num_threads(threads):
        p64 = p.cast(torch.float64, fmt)
        y64, r64 = p64.fused(), p64.reference()
        assert max_err(y64, r64) <= F64_TOL * r64.abs().max().item()
        p32 = p.cast(torch.float32, fmt, requires_grad=False)
        assert_accurate("y", p32.fused(), p32.reference(), r64)
        gy = torch.randn(r64.shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
        for a, b in zip(grads(y64, p64.inputs(), gy), grads(r64, p64.inputs(), gy)):
            assert max_err(a, b) <= F64_TOL * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("B,H,W", [(2, 12, 11), (1, 7, 7)])
def test_float32_1024_channels(layout, B, H, W):
    """1024 channels in and out: the GEMM operands whose rows are 4 KiB apart (channels-last x,
    the recomputed v and gv, the weights; on CPUs with L1 caches of fewer than 12 ways they go
    to the micro-kernel 16 rows at a time, gemm.h kAliasRows, and test_cpu_generic.py checks
    that the other setting gives the same bits); 2 x 12 x 11 pixels (>= 256: packed weights)
    are tasks of rows that are not multiples of 16. One 7x7 image: the NCHW forward projects
    its 49 pixels on the BLAS.
    Forward and every gradient against float64, as check_lowp bounds them."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    p = make_problem("u", B=B, M=1024, N=1024, H=H, W=W, padding=1, seed=5)
    check_lowp(p.cast(torch.float32, fmt), seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("act,mode", [(None, "zeros"), ("relu6", "reflect"),
                                      ("hardswish", "circular")])
def test_low_precision(dtype, variant, act, mode):
    p = make_problem(variant, B=2, M=24, N=40, mid=8, H=12, W=11, padding=1, padding_mode=mode,
                     mid_activation=act, mid_affine=act is not None)
    check_lowp(p.cast(dtype), seed=3)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant,M,N,H,W,B", [("u", 1024, 1024, 7, 7, 1), ("u", 80, 168, 5, 6, 2),
                                               ("u", 37, 45, 9, 11, 2), ("u", 80, 168, 17, 16, 2),
                                               ("s", 128, 128, 17, 16, 3)])
def test_bfloat16_forward_is_the_float32_one_rounded(layout, variant, M, N, H, W, B):
    """The bfloat16 op widens its inputs to float32, runs the float32 kernels and rounds the
    result: bit for bit the float32 op on the same values, rounded by torch (round to nearest
    even; NaN stays NaN). Covers the vector conversions (8 at a time, then the tail; x, weights
    and y) in both layouts, on each projection path: the BLAS (fewer than 256 pixels, more
    than 64 input channels), the register tiles (37 channels) and packed-weight GEMMs.
    Where the bfloat16 GEMM projects x instead (even channel counts into each projection on
    a CPU that runs it, see cpu_bf16_gemm): BSConv-U sums the same exact products in another
    order, so the float results differ by float rounding and the rounded ones by at most one
    bfloat16 step; BSConv-S rounds u to bfloat16 between its GEMMs (as the unfused bfloat16
    path rounds its first convolution), so it is held to check_lowp's accuracy bound against
    float64 instead. test_cpu_generic runs this test again with that GEMM turned off: bit for
    bit in every case."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    p = make_problem(variant, B=B, M=M, N=N, mid=22, H=H, W=W, padding=1,
                     mid_activation="relu6" if variant == "s" else None,
                     mid_affine=variant == "s", seed=7)
    pb = p.cast(torch.bfloat16, fmt, requires_grad=False)
    pb.x[0, 0, 0, :3] = float("nan")
    pf = pb.cast(torch.float32, fmt, requires_grad=False)  # exact: bfloat16 values are floats
    with torch.no_grad():
        yb, yf = pb.fused(), pf.fused().to(torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=fmt)
    nan = yf.isnan()
    assert nan.any() and torch.equal(yb.isnan(), nan)
    gemm = torch.ops.bsconv_fused.cpu_bf16_gemm() and M % 2 == 0  # mid = 22: even
    if gemm and variant == "s":
        pc = p.cast(torch.bfloat16, fmt, requires_grad=False)  # the same values, no NaN
        p64 = pc.cast(torch.float64)
        y64 = p64.reference()
        y_abs, _ = magnitudes(pc, torch.ones_like(y64))
        with torch.no_grad():
            assert_accurate("y", pc.fused(), pc.reference(), y64, y_abs)
    elif gemm:
        b, f = yb[~nan].double(), yf[~nan].double()
        # One bfloat16 step (at most eps * |value|) plus the float sums' reordering, bounded
        # by 64 float ulps of the largest output (unit-scale data, sums of a few hundred terms).
        tol = torch.finfo(torch.bfloat16).eps * torch.maximum(b.abs(), f.abs()) + \
            64 * torch.finfo(torch.float32).eps * f.abs().max()
        assert bool(((b - f).abs() <= tol).all())
        assert (b == f).double().mean() > 0.5  # mostly the very same bits
    else:
        assert torch.equal(yb.view(torch.int16)[~nan], yf.view(torch.int16)[~nan])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bfloat16_output_rounding_bit_for_bit(layout):
    """An identity projection (exact: x plus exact zeros) and a 1 x 2 depthwise kernel of ones
    make y[j] = x[j] + x[j + 1], one float sum rounded once, so the bfloat16 y must be torch's
    rounding of that same float sum, bit for bit, whichever conversion loop ran (AVX-512, AVX2
    or the element loop; test_cpu_generic runs this file again without AVX-512). The pairs
    (even j) pick each case of round to nearest even: exact ties (half a bfloat16 step of
    x[j]) to the even neighbour either way, just above and below a tie, a carry into the
    exponent, sums in float's denormal range (kept, where vcvtneps2bf16 would flush them to
    zero), overflow to infinity; a NaN bias channel. 48 channels (channels-last runs of whole
    pixels) on output rows of 13 pixels (NCHW rows ending in a partial 16-lane block)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(11)
    B, C, H, W = 2, 48, 5, 14
    shape = (B, C, H, W // 2)
    sign = (torch.randint(0, 2, shape, generator=g) * 2 - 1).float()
    frac = 1 + torch.randint(0, 128, shape, generator=g).float() / 128  # 8 significant bits
    p2 = torch.pow(2.0, torch.randint(-100, 100, shape, generator=g).float())
    a = sign * frac * p2
    half = p2 * 2.0 ** -8  # half a bfloat16 step of a
    kind = torch.randint(0, 6, shape, generator=g)
    b = torch.where(kind == 0, half, -half)                      # ties, up and down
    b = torch.where(kind == 2, half * (1 + 2.0 ** -7), b)        # just above a tie
    b = torch.where(kind == 3, -half * (1 - 2.0 ** -7), b)       # just below a tie
    carry = kind == 4                                            # 1.1111111b + half a step
    a = torch.where(carry, sign * (2 - 2.0 ** -7) * p2, a)
    b = torch.where(carry, sign * half, b)
    tiny = kind == 5  # ~2^-125 minus 2^-125: a float denormal
    a = torch.where(tiny, sign * frac * 2.0 ** -125, a)
    b = torch.where(tiny, -sign * 2.0 ** -125, b)
    big = torch.finfo(torch.bfloat16).max
    a[0, :, 0, 0], b[0, :, 0, 0] = big, big  # overflows to infinity
    x = torch.stack([a, b], -1).view(B, C, H, W)
    xb = x.to(torch.bfloat16)
    assert torch.equal(xb.float(), x)  # every value exact in bfloat16
    w = torch.eye(C).view(C, C, 1, 1).to(torch.bfloat16)
    dw = torch.ones(C, 1, 1, 2, dtype=torch.bfloat16)
    bias = torch.zeros(C, dtype=torch.bfloat16)
    bias[5] = float("nan")
    with torch.no_grad():
        y = BF.bsconv_u(xb.contiguous(memory_format=fmt), w, dw, bias)
        assert fused_op_ran(lambda: BF.bsconv_u(xb.contiguous(memory_format=fmt), w, dw, bias))
    ref = (x[..., :-1] + x[..., 1:] + bias.float().view(1, C, 1, 1)).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
    assert y.shape == ref.shape == (B, C, H, W - 1)
    tiny_out = (ref.float().abs() < 2.0 ** -126) & (ref != 0)
    assert ref.isinf().any() and tiny_out.any()
    # NaN: c10's scalar conversion gives 0x7FC0 (torch's vector conversion of the reference
    # keeps other NaN bits), so the NaNs are compared as NaNs, everything else bit for bit.
    nan = ref.isnan()
    assert nan[:, 5].all() and nan.sum() == B * H * (W - 1)
    assert torch.equal(y.isnan(), nan)
    assert bool((y.view(torch.int16)[nan] == 0x7FC0).all())
    assert torch.equal(y.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])


def check_lowp(plo, seed):
    """Forward and all gradients of the fused op in the problem's (low) precision: at most twice
    the reference's own error in that precision, against float64 on the same rounded inputs,
    with a floor of two ulps of the sums of |terms| (see assert_accurate): the reference's error
    depends on its own summation order and layout (gx of an 80 -> 264 layer: 8.7e-7 from
    oneDNN's NCHW path, 2.0e-6 from its channels_last one, on the same values; the fused op's
    2.0-2.3e-6 in both layouts, against sums of |terms| up to 39, i.e. two ulps = 9e-6)."""
    p64 = plo.cast(torch.float64)  # the oracle sees exactly the rounded inputs
    y64, ylo_ref, ylo = p64.reference(), plo.reference(), plo.fused()
    assert ylo.dtype == plo.x.dtype
    gy = torch.randn(y64.shape, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(seed))
    y_abs, g_abs = magnitudes(plo, gy)
    assert_accurate("y", ylo, ylo_ref, y64, y_abs)
    names = ["x"] + [f"pw{i}" for i in range(len(plo.pws))] + ["dw", "bias", "scale", "shift"]
    names = [n for n, t in zip(names, plo.tensors()) if t is not None]
    for name, a, b, c, m in zip(names, grads(ylo, plo.inputs(), gy),
                                grads(ylo_ref, plo.inputs(), gy), grads(y64, p64.inputs(), gy),
                                g_abs):
        assert a.dtype == plo.x.dtype
        assert_accurate(name, a, b, c, m)
    return ylo


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("B,H,W,N", [(1, 17, 16, 168), (2, 17, 16, 168), (1, 17, 16, 264),
                                     (3, 10, 9, 168), (2, 5, 6, 168), (2, 82, 81, 168)])
def test_gemm_projections(dtype, layout, variant, B, H, W, N):
    # More than 64 input channels: the projections and their adjoints run as GEMMs, with N and
    # M' not multiples of the 32-column panels. From 256 pixels per call on weights packed once:
    # one image in bands, or small images in groups; below that (2 x 5 x 6) by the BLAS. A
    # float32 NCHW x is read channels-last (gx transposed back) or, in the forward, per task of
    # whole images transposed once for all chunks (3 x 10 x 9: groups; 2 x 17 x 16 with N = 168,
    # two chunks, on up to two threads, 1 x 17 x 16 on one; see also
    # test_nchw_whole_image_tasks), or read in place by each chunk's GEMM where an image is
    # larger than the kernels transpose whole (2 x 82 x 81, two chunks on up to two threads).
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    p = make_problem(variant, B=B, M=80, N=N, mid=36, H=H, W=W, padding=1, stride=(1, 2),
                     padding_mode="replicate", mid_activation="relu6", mid_affine=True)
    y = check_lowp(p.cast(dtype, fmt), seed=4)
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("M,N,H", [(24, 96, 32), (80, 80, 24), (80, 112, 24)])
def test_channel_chunks_start_on_panels(threads, layout, M, N, H):
    # One image with work for several threads: the forward splits the channels into chunks
    # (96 -> 64 + 32), and a chunk of a projection on packed panels (from 256 pixels) must start
    # on a panel. Chunks of 48, 40 or 56 channels read the wrong columns: y was off by O(1).
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    p = make_problem("u", B=1, M=M, N=N, H=H, W=H, padding=1, padding_mode="reflect")
    with num_threads(threads):
        check_lowp(p.cast(torch.float32, fmt), seed=5)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("B,H,W,N,stride", [(4, 17, 16, 264, 1), (5, 14, 15, 300, 2),
                                            (6, 9, 10, 264, 1)])
def test_nchw_whole_image_tasks(threads, B, H, W, N, stride):
    # float32 NCHW x with more than two channel chunks (N > 256), an image per thread: each task
    # transposes its whole image(s) once into channels-last scratch and runs every chunk on it
    # (9 x 10 images: groups of several images); the last chunk of N = 300 is 44 wide.
    p = make_problem("u", B=B, M=80, N=N, H=H, W=W, padding=1, stride=stride,
                     mid_activation="hardswish", mid_affine=True)
    with num_threads(threads):
        check_lowp(p.cast(torch.float32), seed=6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_groups_images_beyond_the_budget(threads, layout):
    # 9x9 images of 300 -> 400 channels: one image's backward buffers exceed the per-task
    # budget, so tasks take ceil(256 / 81) = 4 images (a group of 4 and a group of 1 at B=5).
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    p = make_problem("u", B=5, M=300, N=400, H=9, W=9, padding=1, mid_affine=True,
                     mid_activation="relu6")
    with num_threads(threads):
        check_lowp(p.cast(torch.float32, fmt), seed=7)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "permuted"])
@pytest.mark.parametrize("variant", ["u", "s"])
def test_memory_formats(layout, variant):
    p = make_problem(variant, B=2, M=6, N=10, mid=3, H=10, W=12, padding=1,
                     mid_activation="relu", mid_affine=True).cast(torch.float64)
    x = p.x.detach()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=3)[:, :, :, ::2]  # non-contiguous, stride 2 along W
    elif layout == "permuted":
        x = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    p.x = x.requires_grad_()
    y, r = p.fused(), p.reference()
    assert max_err(y, r) <= F64_TOL * r.abs().max().item()
    # Output in the memory format nn.Conv2d would give (the reference's).
    cl = torch.channels_last
    assert y.is_contiguous(memory_format=cl) == r.is_contiguous(memory_format=cl)
    assert y.is_contiguous() == r.is_contiguous()
    gy = torch.randn_like(r)
    gf, gr = grads(y, p.inputs(), gy), grads(r, p.inputs(), gy)
    for a, b in zip(gf, gr):
        assert max_err(a, b) <= F64_TOL * max(1.0, b.abs().max().item())
    assert gf[0].stride() == gr[0].stride() or layout in ("sliced", "permuted")


@pytest.mark.parametrize("variant", ["u", "s"])
def test_empty_batch(variant):
    p = make_problem(variant, B=0, padding=1, mid_activation="relu",
                     mid_affine=True).cast(torch.float64)
    y = p.fused()
    assert y.shape == (0, 6, 9, 7)
    y.sum().backward()
    assert p.x.grad.shape == p.x.shape
    for t in p.inputs()[1:]:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_only_requested_gradients():
    p = make_problem("s", padding=1, mid_affine=True).cast(torch.float64)
    p.x.requires_grad_(False)
    p.pws[0].requires_grad_(False)
    y, r = p.fused(), p.reference()
    gy = torch.randn_like(r)
    for a, b in zip(grads(y, p.inputs()[2:], gy), grads(r, p.inputs()[2:], gy)):
        assert max_err(a, b) <= F64_TOL * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("variant", ["u", "s"])
def test_single_small_image_backward(variant):
    # One task: the recompute GEMM in two channel halves, the weight- and input-gradient GEMMs
    # side by side (on two threads when there are two).
    check_f64(make_problem(variant, B=1, M=72, N=84, mid=20, H=6, W=7, padding=1,
                           padding_mode="replicate", mid_activation="relu6", mid_affine=True))


@pytest.mark.parametrize("variant,B,M,N,H,W", [
    ("s", 3, 48, 64, 30, 26),  # several bands and images: weight-gradient partials per group
    ("u", 1, 72, 80, 6, 7),    # one small image, one task: its GEMMs split over two threads
    ("s", 1, 72, 80, 6, 7),
])
def test_backward_is_deterministic_across_runs_and_threads(variant, B, M, N, H, W):
    p = make_problem(variant, B=B, M=M, N=N, mid=12, H=H, W=W, padding=1,
                     mid_activation="hardswish", mid_affine=True).cast(torch.float32)
    gy = torch.randn(B, N, H, W, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            results.append([g.clone() for g in grads(p.fused(), p.inputs(), gy)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("K,stride,padding,dilation,mode", [
    (3, 1, 1, 1, 0), (3, 2, 1, 1, 0), (3, 3, 4, 1, 0),  # padding > K: rows that read no v row
    (5, 2, 7, 2, 0), (3, 1, 1, 1, 1), (3, 2, 2, 1, 3),
])
@pytest.mark.parametrize("mask", ["with_gx", "bias_only"])
def test_bias_gradient_over_bands(layout, K, stride, padding, dilation, mode, mask):
    # Tall images run their backward in many bands; each band sums the gy rows it owns into
    # the bias gradient (rows are shared between neighbouring bands). bias_only: a pass of its
    # own. float64 sums of a few thousand terms ~1: within ~1e-12 of the exact value.
    g = torch.Generator().manual_seed(7)
    B, M, N, H, W = 2, 6, 12, 150, 23
    x = torch.randn(B, M, H, W, dtype=torch.float64, generator=g)
    pw = torch.randn(N, M, 1, 1, dtype=torch.float64, generator=g)
    dw = torch.randn(N, 1, K, K, dtype=torch.float64, generator=g)
    bias = torch.randn(N, dtype=torch.float64, generator=g)
    Ho = (H + 2 * padding - dilation * (K - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (K - 1) - 1) // stride + 1
    gy = torch.randn(B, N, Ho, Wo, dtype=torch.float64, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        gy = gy.contiguous(memory_format=torch.channels_last)
    want = [mask == "with_gx", False, False, False, True, False, False]
    out = torch.ops.bsconv_fused.backward.default(
        gy, x, pw, None, dw, bias, None, None, [stride] * 2, [padding] * 4, [dilation] * 2,
        mode, 0, want)
    expected = gy.sum((0, 2, 3))
    assert max_err(out[4], expected) <= 1e-12 * expected.abs().max().item()


@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("K,stride,padding,dilation,mode", [
    ((3, 3), 1, 1, 1, "zeros"), ((3, 3), 2, 1, 1, "reflect"), ((5, 5), 2, 7, 2, "zeros"),
    ((3, 3), 3, 4, 1, "circular"),
])
def test_all_gradients_over_bands(variant, K, stride, padding, dilation, mode):
    # Tall images: many backward bands, each reading the gy rows it shares with the previous
    # band from the worker's ring instead of converting them again.
    check_f64(make_problem(variant, B=2, M=6, N=12, mid=4, H=140, W=21, K=K, stride=stride,
                           padding=padding, dilation=dilation, padding_mode=mode,
                           mid_activation="relu", mid_affine=True))


def test_fused_path_is_the_one_that_runs():
    p = make_problem("u", padding=1).cast(torch.float32)
    assert fused_op_ran(lambda: p.fused().sum().backward())
    import bsconv_fused

    with bsconv_fused.use_reference():
        assert not fused_op_ran(lambda: p.fused())
    # The backward is the fused backward op, not an unfused graph of convolutions.
    y = p.fused()
    with torch.autograd.profiler.profile() as prof:
        y.sum().backward()
    names = {e.name for e in prof.function_events}
    assert "bsconv_fused::backward" in names
    assert not any("convolution" in n for n in names), names


@pytest.mark.parametrize("variant,act", list(itertools.product("us", ["relu6", "hardswish"])))
def test_nan_propagates(variant, act):
    p = make_problem(variant, padding=1, mid_activation=act, mid_affine=True)
    x = p.x.detach().clone()
    x[0, 0, 4, 3] = float("nan")
    p.x = x
    y = p.fused()
    r = p.reference()
    assert torch.equal(torch.isnan(y), torch.isnan(r))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["u", "s"])
def test_strided_weights(variant, dtype):
    """Weights that are views with other strides (a transposed 1x1 weight, sliced taps, strided
    vectors) are read by value, like nn.Conv2d reads them; their gradients come back dense."""
    p = make_problem(variant, B=2, M=12, N=16, mid=5, H=9, W=11, padding=1,
                     mid_activation="relu6", mid_affine=True).cast(torch.float64)

    def strided(t):
        if t.dim() == 4 and t.shape[2:] == (1, 1):  # [O, I, 1, 1] as the transpose of [I, O]
            return t.detach()[:, :, 0, 0].t().contiguous().t()[:, :, None, None]
        # the same values, every other element of a buffer twice the size
        return torch.stack([t.detach(), t.detach()], dim=-1)[..., 0]

    views = p.cast(dtype)
    views.pws = [strided(w).requires_grad_() for w in views.pws]
    views.dw_weight = strided(views.dw_weight).requires_grad_()
    for name in ("dw_bias", "mid_scale", "mid_shift"):
        setattr(views, name, strided(getattr(views, name)).requires_grad_())
    assert not any(t.is_contiguous() for t in views.inputs()[1:])
    dense = views.cast(dtype)
    for name in ("dw_bias", "mid_scale", "mid_shift"):
        setattr(dense, name, getattr(dense, name).detach().contiguous().requires_grad_())
    assert all(t.is_contiguous() for t in dense.inputs()[1:])
    y, y_dense = views.fused(), dense.fused()
    assert torch.equal(y, y_dense)
    gy = torch.randn_like(y)
    for a, b in zip(grads(y, views.inputs(), gy), grads(y_dense, dense.inputs(), gy)):
        assert torch.equal(a, b)
    if dtype == torch.float64:  # and both match the reference
        assert max_err(y, p.reference()) <= F64_TOL * p.reference().abs().max().item()


def _random_problem(rng: random.Random):
    """A random valid layer: either variant, 8-200 -> 16-300 channels, 4-40 px, K 3 or 5,
    strides, dilation, every padding mode, an optional mid affine (no mid activation: a kink
    flips under any rounding, in the reference too)."""
    while True:
        K, d, pad = rng.choice([3, 3, 5]), rng.choice([1, 1, 2]), rng.choice([0, 1, 2, 3])
        H, W = rng.randint(4, 40), rng.randint(4, 40)
        if min(H, W) + 2 * pad - d * (K - 1) - 1 < 0:
            continue
        mode = rng.choice(["zeros", "reflect", "replicate", "circular"])
        if pad >= min(H, W):
            mode = "zeros"
        M = rng.choice([8, 24, 48, 64, 65, 80, 130, 200])
        return make_problem(rng.choice("uus"), B=rng.choice([1, 1, 2, 3]), M=M,
                            N=rng.choice([16, 40, 80, 96, 136, 168, 264, 300]),
                            mid=max(1, M // 6), H=H, W=W, K=(K, K),
                            stride=(rng.choice([1, 2]), rng.choice([1, 2])), dilation=(d, d),
                            padding=pad, padding_mode=mode, mid_affine=rng.random() < 0.5,
                            seed=rng.randrange(1 << 30))


@pytest.mark.parametrize("threads", [2, 4])
def test_random_shapes_against_float64(threads):
    # Random layers on several threads, where the tiling splits channels, bands and image
    # groups in shape-dependent ways (the panel alignment of the channel chunks was found so).
    rng = random.Random(threads)
    with num_threads(threads):
        for i in range(24):
            p = _random_problem(rng)
            fmt = torch.channels_last if i % 2 else torch.contiguous_format
            check_lowp(p.cast(torch.bfloat16 if i % 3 == 2 else torch.float32, fmt), seed=i)
