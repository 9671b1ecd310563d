"""The same checks on a real GPU (skipped on machines without one): CUDA vs the float64
reference and CPU <-> CUDA parity, forward and backward, deterministic and atomic reductions."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_accurate, make_problem, max_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _to(p, device):
    q = p.cast(p.x.dtype)
    for name in ("x", "dw_weight", "dw_bias", "mid_scale", "mid_shift"):
        t = getattr(q, name)
        if t is not None:
            setattr(q, name, t.detach().to(device).requires_grad_())
    q.pws = [w.detach().to(device).requires_grad_() for w in q.pws]
    return q


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("K,stride,mode,act", [((3, 3), 1, "zeros", None),
                                               ((5, 5), 2, "reflect", "relu6"),
                                               ((2, 3), 1, "circular", "hardswish")])
def test_cuda_matches_reference_and_cpu(dtype, variant, deterministic, K, stride, mode, act):
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        p = make_problem(variant, B=2, M=24, N=40, mid=8, H=13, W=12, K=K, stride=stride,
                         padding=1, padding_mode=mode, mid_activation=act,
                         mid_affine=act is not None).cast(dtype)
        pc = _to(p, "cuda")
        y_cuda = pc.fused()
        y_cpu = p.fused()
        gy = torch.randn(y_cpu.shape, dtype=torch.float64)
        p64 = p.cast(torch.float64)
        y64 = p64.reference()
        g64 = torch.autograd.grad(y64, p64.inputs(), gy)
        g_cuda = torch.autograd.grad(y_cuda, pc.inputs(), gy.to("cuda", dtype))
        g_cpu = torch.autograd.grad(y_cpu, p.inputs(), gy.to(dtype))
        if dtype == torch.float64:
            assert max_err(y_cuda.cpu(), y64) <= 1e-11 * y64.abs().max().item()
        else:
            assert_accurate("y", y_cuda.cpu(), y_cpu, y64)
        for a, b, c in zip(g_cuda, g_cpu, g64):
            if dtype == torch.float64:
                assert max_err(a.cpu(), c) <= 1e-11 * max(1.0, c.abs().max().item())
            else:
                assert_accurate("grad", a.cpu(), b, c)
    finally:
        torch.use_deterministic_algorithms(False)
