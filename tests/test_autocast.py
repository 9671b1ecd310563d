"""Under autocast the fused op runs in the autocast dtype, like the nn.Conv2d layers it replaces."""

from __future__ import annotations

import pytest
import torch
from helpers import fused_op_ran, make_problem

import bsconv_fused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["u", "s"])
def test_cpu_autocast_runs_fused_in_low_precision(dtype, variant):
    p = make_problem(variant, B=2, M=8, N=12, mid=4, H=9, W=9, padding=1, mid_affine=True,
                     mid_activation="relu6").cast(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        y = p.fused()
        with bsconv_fused.use_reference():
            r = p.reference()
        assert fused_op_ran(lambda: p.fused())
    assert y.dtype == dtype and r.dtype == dtype
    y64 = p.cast(torch.float64).reference()
    # Same rounding of the inputs as the reference; the fused op accumulates in float32.
    err, ref_err = (y.double() - y64).abs().max(), (r.double() - y64).abs().max()
    assert err <= 2 * ref_err + 1e-6
    y.float().sum().backward()
    for t in p.inputs():
        assert t.grad is not None and t.grad.dtype == torch.float32


def test_module_under_autocast():
    torch.manual_seed(0)
    m = bsconv_fused.BSConvU(6, 10, 3, padding=1, with_bn=True).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        with bsconv_fused.use_reference():
            r = m(x)
    assert y.dtype == torch.bfloat16 and r.dtype == torch.bfloat16
    y32 = m(x)
    # No worse than twice the unfused bf16 path's own error (both round the same inputs).
    assert (y.float() - y32).abs().max() <= 2 * (r.float() - y32).abs().max() + 1e-6
