"""gradcheck, opcheck and torch.compile of the registered ops."""

from __future__ import annotations

import pytest
import torch
from helpers import make_problem

from bsconv_fused import functional, ops
from bsconv_fused._args import normalize


@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("act", [None, "relu", "relu6", "hardswish"])
def test_gradcheck(variant, padding_mode, act):
    p = make_problem(variant, B=2, M=3, N=4, mid=2, H=5, W=4, padding=(1, 2), stride=(1, 2),
                     dilation=(2, 1), padding_mode=padding_mode, mid_activation=act,
                     mid_affine=True).cast(torch.float64)

    def f(*inputs):
        q = p.__class__(p.variant, inputs[0], list(inputs[1:1 + len(p.pws)]),
                        *inputs[1 + len(p.pws):], p.kwargs)
        return q.fused()

    assert torch.autograd.gradcheck(f, tuple(p.inputs()), eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(p, opts):
    pw2 = p.pws[1] if len(p.pws) > 1 else None
    return (p.x, p.pws[0], pw2, p.dw_weight, p.dw_bias, p.mid_scale, p.mid_shift,
            list(opts.stride), list(opts.padding), list(opts.dilation), opts.padding_mode_code,
            opts.activation_code)


def _opts(p):
    names = ["pw_weight"] if len(p.pws) == 1 else ["pw1_weight", "pw2_weight"]
    return normalize("t", p.x, list(zip(names, p.pws)), p.dw_weight, p.dw_bias,
                     p.kwargs.get("stride", 1), p.kwargs.get("padding", 0),
                     p.kwargs.get("dilation", 1), p.kwargs.get("padding_mode", "zeros"),
                     p.mid_scale, p.mid_shift, p.kwargs.get("mid_activation"))


@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("extras", [False, True])
def test_opcheck(variant, memory_format, extras):
    p = make_problem(variant, B=2, M=4, N=6, mid=2, H=6, W=5, padding=1, bias=extras,
                     mid_affine=extras, mid_activation="relu" if extras else None,
                     padding_mode="reflect" if extras else "zeros")
    p = p.cast(torch.float32, memory_format=memory_format)
    opts = _opts(p)
    args = _op_args(p, opts)
    torch.library.opcheck(torch.ops.bsconv_fused.forward.default, args)
    gy = torch.randn(p.reference().shape)
    mask = [t is not None for t in (p.x, p.pws[0], args[2], p.dw_weight, p.dw_bias,
                                    p.mid_scale, p.mid_shift)]
    bargs = (gy,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a
                          for a in args) + (mask,)
    torch.library.opcheck(torch.ops.bsconv_fused.backward.default, bargs)


def test_compile_fullgraph_forward_and_backward():
    p = make_problem("s", B=2, M=8, N=12, mid=4, H=10, W=9, padding=1, mid_affine=True,
                     mid_activation="hardswish").cast(torch.float32)

    def f(x, w1, w2, dw, b, s, t):
        y = functional.bsconv_s(x, w1, w2, dw, b, padding=1, mid_scale=s, mid_shift=t,
                                mid_activation="hardswish")
        return torch.relu(y).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*p.inputs())
    gc = torch.autograd.grad(loss_c, p.inputs())
    loss_e = f(*p.inputs())
    ge = torch.autograd.grad(loss_e, p.inputs())
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 5, 17, 13, device="meta").contiguous(memory_format=torch.channels_last)
    w = torch.empty(7, 5, 1, 1, device="meta")
    dw = torch.empty(7, 1, 5, 3, device="meta")
    y = functional.bsconv_u(x, w, dw, stride=2, padding=(2, 1))
    assert y.shape == (2, 7, 9, 7) and y.device.type == "meta"
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_ops_module_exposes_registered_ops():
    assert hasattr(torch.ops.bsconv_fused, "forward")
    assert hasattr(torch.ops.bsconv_fused, "backward")
    assert ops._registered
