"""The CUDA kernels, run on the CPU under the CUDA emulator (bsconv_fused._emu: the same kernel
source, launch configuration and launch code as the GPU build), against the float64 reference.

Every instantiation the GPU build uses runs here: each dtype with its projection mode (float64 /
float32 exact SIMT, float32 TF32, float16 and bfloat16 tensor cores), each compile-time kernel
shape (3/5/7 x stride 1/2) and the general path, BSConv-U and -S, all padding modes and mid
activations, deterministic and atomic weight-gradient reduction.
"""

from __future__ import annotations

import zlib

import bsconv_fused._emu  # noqa: F401  (registers bsconv_fused_emu::*)
import pytest
import torch
from helpers import assert_accurate, magnitudes, make_problem, max_err

from bsconv_fused._args import normalize

SIMT, WMMA_HALF, WMMA_BF16, WMMA_TF32 = 0, 1, 2, 3
PROJ_OF = {torch.float64: [SIMT], torch.float32: [SIMT, WMMA_TF32],
           torch.float16: [WMMA_HALF], torch.bfloat16: [WMMA_BF16]}
SMEM = 48 * 1024
emu = torch.ops.bsconv_fused_emu


def op_args(p):
    names = ["pw_weight"] if len(p.pws) == 1 else ["pw1_weight", "pw2_weight"]
    o = normalize("t", p.x, list(zip(names, p.pws)), p.dw_weight, p.dw_bias,
                  p.kwargs.get("stride", 1), p.kwargs.get("padding", 0),
                  p.kwargs.get("dilation", 1), p.kwargs.get("padding_mode", "zeros"),
                  p.mid_scale, p.mid_shift, p.kwargs.get("mid_activation"))
    pw2 = p.pws[1] if len(p.pws) > 1 else None
    return (p.x.detach(), p.pws[0].detach(), None if pw2 is None else pw2.detach(),
            p.dw_weight.detach(), *(None if t is None else t.detach()
                                    for t in (p.dw_bias, p.mid_scale, p.mid_shift)),
            list(o.stride), list(o.padding), list(o.dilation), o.padding_mode_code,
            o.activation_code)


def run_emulated(p, gy, proj, deterministic=True, seed=1, smem=SMEM):
    args = op_args(p)
    y = emu.forward(*args, proj, smem, seed)
    mask = [t is not None for t in (args[0], args[1], args[2], args[3], args[4], args[5],
                                    args[6])]
    grads = emu.backward(gy.to(p.x.dtype), *args, mask, deterministic, proj, smem, seed)
    return y, [g for g, m in zip(grads, mask) if m]


def oracle(p, gy):
    """Reference output and gradients, computed in float64 from exactly the given inputs."""
    p64 = p.cast(torch.float64)
    y = p64.reference()
    return y, list(torch.autograd.grad(y, p64.inputs(), gy))


def ref_shape(p):
    with torch.no_grad():
        return p.cast(torch.float64, requires_grad=False).reference().shape


KERNEL_SHAPES = [
    # (K, stride, padding, dilation): the 6 specializations and the general path
    ((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((5, 5), 1, 2, 1), ((5, 5), 2, 2, 1),
    ((7, 7), 1, 3, 1), ((7, 7), 2, 3, 1), ((2, 3), (1, 2), (1, 0), (2, 1)),
]


@pytest.mark.parametrize("dtype,proj", [(d, p) for d, ps in PROJ_OF.items() for p in ps],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("K,stride,padding,dilation", KERNEL_SHAPES,
                         ids=[f"K{k[0]}x{k[1]}s{s}" for k, s, _, _ in KERNEL_SHAPES])
@pytest.mark.parametrize("variant", ["u", "s"])
def test_every_instantiation(dtype, proj, K, stride, padding, dilation, variant):
    p = make_problem(variant, B=2, M=20, N=24, mid=6, H=11, W=10, K=K, stride=stride,
                     padding=padding, dilation=dilation, padding_mode="reflect",
                     # Activations run in float64 below (test_options_float64): in low precision
                     # a pre-activation within rounding of a kink (hardswish' jumps by 0.5 at +-3)
                     # flips the derivative arbitrarily in both the fused and the unfused path.
                     mid_activation="hardswish" if dtype == torch.float64 else None,
                     mid_affine=True,
                     # A stable seed (hash() of a str varies per process: PYTHONHASHSEED).
                     seed=zlib.crc32(repr((K, stride, variant)).encode()) % 1000).cast(dtype)
    gy = torch.randn(ref_shape(p), dtype=torch.float64,
                     generator=torch.Generator().manual_seed(7))
    # Each instantiation serves both variants, so alternating the weight-gradient reduction by
    # variant runs both reductions (atomics and per-block partials) through every kernel.
    y, grads = run_emulated(p, gy, proj, deterministic=variant == "s")
    y64, g64 = oracle(p, gy)
    assert y.dtype == dtype and y.shape == y64.shape
    if dtype == torch.float64:
        tol = 1e-11
        assert max_err(y, y64) <= tol * y64.abs().max().item()
        for g, r in zip(grads, g64):
            assert max_err(g, r) <= tol * max(1.0, r.abs().max().item())
        return
    p_lo = p.cast(dtype)
    y_lo = p_lo.reference()
    g_lo = torch.autograd.grad(y_lo, p_lo.inputs(), gy.to(dtype))
    names = ["x"] + [f"pw{i + 1}" for i in range(len(p.pws))] + ["dw", "bias", "scale", "shift"]
    if proj == WMMA_TF32:
        # No activation here (a kink can flip under any rounding); the bound is linear.
        y_abs, g_abs = magnitudes(p, gy)
        assert ((y.double() - y64).abs() <= 2.0 ** -9 * y_abs + 2 * (y_lo.double() - y64).abs()
                + 1e-6).all()
        for name, a, b, c, m in zip(names, grads, g_lo, g64, g_abs):
            err = (a.double() - c).abs()
            assert (err <= 2.0 ** -9 * m + 2 * (b.double() - c).abs() + 1e-5 * (1 + m)).all(), name
        return
    # The weight gradients are long reductions (the U variant's through atomics, in a varying
    # order): their floor is two ulps of the sum of |terms| (magnitudes), see assert_accurate.
    y_abs, g_abs = magnitudes(p, gy)
    assert_accurate("y", y, y_lo, y64, y_abs)
    for name, a, b, c, m in zip(names, grads, g_lo, g64, g_abs):
        assert_accurate(name, a, b, c, m)


@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("act", [None, "relu", "relu6", "hardswish"])
def test_options_float64(variant, mode, act):
    p = make_problem(variant, B=2, M=7, N=9, mid=3, H=8, W=9, padding=2, K=(3, 5),
                     padding_mode=mode, mid_activation=act, mid_affine=act is not None,
                     bias=act != "relu").cast(torch.float64)
    gy = torch.randn(ref_shape(p), dtype=torch.float64,
                     generator=torch.Generator().manual_seed(3))
    y, grads = run_emulated(p, gy, SIMT, deterministic=mode != "zeros")
    y64, g64 = oracle(p, gy)
    assert max_err(y, y64) <= 1e-11 * y64.abs().max().item()
    for g, r in zip(grads, g64):
        assert max_err(g, r) <= 1e-11 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("shape", [dict(B=1, M=1, N=1, mid=1, H=1, W=1),
                                   dict(B=3, M=17, N=3, mid=2, H=7, W=5),
                                   dict(B=1, M=3, N=40, mid=5, H=2, W=23)])
@pytest.mark.parametrize("variant", ["u", "s"])
def test_odd_sizes_and_channels_last(shape, variant):
    p = make_problem(variant, padding=1, mid_activation="relu6", mid_affine=True,
                     **shape).cast(torch.float64, memory_format=torch.channels_last)
    gy = torch.randn(ref_shape(p), dtype=torch.float64,
                     generator=torch.Generator().manual_seed(4))
    y, grads = run_emulated(p, gy.contiguous(memory_format=torch.channels_last), SIMT)
    y64, g64 = oracle(p, gy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert max_err(y, y64) <= 1e-11 * max(1.0, y64.abs().max().item())
    for g, r in zip(grads, g64):
        assert max_err(g, r) <= 1e-11 * max(1.0, r.abs().max().item())


def test_deterministic_mode_is_bitwise_stable_across_block_orders():
    p = make_problem("s", B=3, M=24, N=32, mid=8, H=12, W=13, padding=1,
                     mid_activation="relu", mid_affine=True).cast(torch.float32)
    gy = torch.randn(3, 32, 12, 13, generator=torch.Generator().manual_seed(5))
    runs = [run_emulated(p, gy, SIMT, deterministic=True, seed=s)[1] for s in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    # Atomic mode sums in a schedule-dependent order: equal within float32 rounding only.
    atomic = run_emulated(p, gy, SIMT, deterministic=False, seed=4)[1]
    for a, b in zip(runs[0], atomic):
        assert max_err(a, b) <= 1e-5 * max(1.0, b.abs().max().item())


def test_only_requested_gradients():
    p = make_problem("u", padding=1, mid_affine=True).cast(torch.float64)
    args = op_args(p)
    gy = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    mask = [False, True, False, False, True, False, True]
    g = emu.backward(gy, *args, mask, True, SIMT, SMEM, 1)
    _, g64 = oracle(p, gy)
    assert g[0].numel() == 0 and g[3].numel() == 0 and g[5].numel() == 0
    for i, j in ((1, 1), (4, 3), (6, 5)):
        assert max_err(g[i], g64[j]) <= 1e-11 * max(1.0, g64[j].abs().max().item())


def test_large_shared_memory_configs_and_grid_stride():
    # A small shared-memory budget forces small tiles and many tasks per block (grid-stride).
    p = make_problem("u", B=2, M=40, N=48, H=15, W=17, padding=1).cast(torch.float64)
    gy = torch.randn(2, 48, 15, 17, dtype=torch.float64)
    y, grads = run_emulated(p, gy, SIMT, smem=16 * 1024)
    y64, g64 = oracle(p, gy)
    assert max_err(y, y64) <= 1e-11 * y64.abs().max().item()
    for g, r in zip(grads, g64):
        assert max_err(g, r) <= 1e-11 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("B,M,N,H,W,K", [
    (1, 3, 8, 7, 7, 3), (256, 1024, 1024, 7, 7, 3), (4096, 32, 64, 224, 224, 3),
    (100000, 16, 16, 64, 64, 7), (1, 2048, 2048, 7, 7, 5), (70000, 8, 8, 3, 3, 1)])
@pytest.mark.parametrize("proj", [SIMT, WMMA_HALF])
def test_launch_config_respects_limits(B, M, N, H, W, K, proj):
    """Grid, block and shared memory stay within CUDA's limits for any size (no allocation:
    the sizes come from an expanded view)."""
    dtype = torch.float16 if proj == WMMA_HALF else torch.float32
    x = torch.empty(1, 1, 1, 1, dtype=dtype).expand(B, M, H, W)
    pw = torch.empty(1, 1, 1, 1, dtype=dtype).expand(N, M, 1, 1)
    dw = torch.empty(1, 1, 1, 1, dtype=dtype).expand(N, 1, K, K)
    for smem in (48 * 1024, 163 * 1024, 227 * 1024):
        for det in (False, True):
            f_ok, f_grid, f_block, f_smem, f_tasks, b_ok, b_grid, b_block, b_smem, b_tasks = (
                emu.config(x, pw, None, dw, [1, 1], [K // 2] * 4, [1, 1], 0, proj, smem,
                           det)[:10])
            assert f_ok == 1
            assert 1 <= f_grid <= 2**31 - 1 and f_block <= 1024 and f_smem <= smem
            assert f_tasks >= f_grid
            if b_ok:
                assert 1 <= b_grid <= 2**31 - 1 and b_block <= 1024 and b_smem <= smem
            else:
                # Only channel counts whose one-pixel backward tile cannot fit may be refused.
                assert N * 16 * 4 > smem // 2


def test_config_refusal_is_a_clear_error():
    x = torch.randn(1, 4, 5, 5)
    pw = torch.randn(4096, 4, 1, 1)
    dw = torch.randn(4096, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"bsconv_fused::backward: the backward keeps all 4096 "
                                           r"projected channels"):
        emu.backward(torch.randn(1, 4096, 5, 5), x, pw, None, dw, None, None, None, [1, 1],
                     [1, 1, 1, 1], [1, 1], 0, 0, [True] * 7, True, SIMT, 48 * 1024, 1)


def test_emulated_forward_matches_cpu_kernel_bitwise_in_float64_simple_case():
    # Different summation orders give different last bits in general; a single input channel
    # and a 1x1 kernel leave one product per output, so both paths must agree exactly.
    p = make_problem("u", B=1, M=1, N=5, H=6, W=6, K=(1, 1), bias=False).cast(torch.float64)
    y, _ = run_emulated(p, torch.zeros(1, 5, 6, 6, dtype=torch.float64), SIMT)
    assert torch.equal(y, p.fused().detach())


def test_every_projection_mode_is_refused_for_the_wrong_dtype():
    p = make_problem("u", padding=1).cast(torch.float64)
    with pytest.raises(ValueError, match="projection mode 1 is not available"):
        emu.forward(*op_args(p), WMMA_HALF, SMEM, 1)


