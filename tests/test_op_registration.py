"""gradcheck, opcheck and torch.compile of the registered ops."""

from __future__ import annotations

import pytest
import torch
from helpers import fused_op_ran, make_problem

import bsconv_fused
from bsconv_fused import _args, functional, ops
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


# The eager entry (csrc/python_call.cpp) that ops.forward takes for plain tensors.

class _Counting:
    """Counts the calls that the wrapped eager entries served (not NotImplemented)."""

    def __init__(self):
        self.calls = 0
        self.by_entry = {}

    def wrap(self, name, real):
        def entry(*args):
            y = real(*args)
            if y is not NotImplemented:
                self.calls += 1
                self.by_entry[name] = self.by_entry.get(name, 0) + 1
            return y
        return entry


@pytest.fixture
def counted_direct(monkeypatch):
    """Both eager entries of csrc/python_call.cpp, counted: ops._direct (any signature) and
    functional._call (signatures already validated)."""
    assert ops._direct is not None and functional._call is not None, "eager entries missing"
    counter = _Counting()
    monkeypatch.setattr(ops, "_direct", counter.wrap("direct", ops._direct))
    monkeypatch.setattr(functional, "_call", counter.wrap("call", functional._call))
    return counter


@pytest.mark.parametrize("variant", ["u", "s"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_direct_entry_matches_torch_ops(variant, memory_format, counted_direct):
    p = make_problem(variant, B=2, M=5, N=7, mid=3, H=6, W=5, padding=(1, 2), stride=(2, 1),
                     mid_affine=True, mid_activation="relu6", padding_mode="reflect")
    p = p.cast(torch.float32, memory_format=memory_format)
    inputs = p.inputs()
    gy = torch.randn(p.reference().shape).contiguous(memory_format=memory_format)
    _args._options_cache.clear()
    y_direct = p.fused()  # a new signature: validated in Python, then ops._direct
    g_direct = torch.autograd.grad(y_direct, inputs, gy)
    y_call = p.fused()  # remembered: functional._call
    g_call = torch.autograd.grad(y_call, inputs, gy)
    assert counted_direct.by_entry == {"direct": 1, "call": 1}
    args = _op_args(p, _opts(p))
    y_ops = torch.ops.bsconv_fused.forward.default(*args)
    g_ops = torch.autograd.grad(y_ops, inputs, gy)
    for y, g in ((y_direct, g_direct), (y_call, g_call)):
        assert y.stride() == y_ops.stride()
        torch.testing.assert_close(y, y_ops, rtol=0, atol=0)
        for a, b in zip(g, g_ops):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert y.grad_fn.name() == y_ops.grad_fn.name()


def test_direct_entry_is_skipped_for_subclasses_modes_and_compile(counted_direct):
    p = make_problem("u", B=1, M=4, N=6, H=5, W=5, padding=1).cast(torch.float32)
    seen = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Recorder():
        p.fused()
    assert torch.ops.bsconv_fused.forward.default in seen
    assert counted_direct.calls == 0

    class Sub(torch.Tensor):
        pass

    q = p.__class__(p.variant, p.x.as_subclass(Sub), p.pws, p.dw_weight, p.dw_bias,
                    p.mid_scale, p.mid_shift, p.kwargs)
    assert isinstance(q.fused(), Sub)  # __torch_function__ of the subclass ran
    assert counted_direct.calls == 0

    compiled = torch.compile(lambda x: functional.bsconv_u(x, p.pws[0], p.dw_weight,
                                                           p.dw_bias, padding=1),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(p.x), p.fused())
    assert counted_direct.calls == 1  # the eager call only; the compiled graph used torch.ops


def test_direct_entry_goes_through_the_dispatcher(counted_direct):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    p = make_problem("s", B=1, M=4, N=6, mid=2, H=5, W=5, padding=1).cast(torch.float32)
    x = p.x.clone().requires_grad_()
    with Recorder():
        y = functional.bsconv_s(x, *p.pws, p.dw_weight, p.dw_bias, padding=1)
        y.sum().backward()
    assert counted_direct.calls == 1
    assert torch.ops.bsconv_fused.forward.default in seen
    assert torch.ops.bsconv_fused.backward.default in seen


def test_direct_entry_errors_name_the_argument():
    p = make_problem("u", B=1, M=4, N=6, H=5, W=5).cast(torch.float32)
    direct = ops._direct
    flat = _opts(p).flat_args
    with pytest.raises(TypeError, match="dw_weight must be a Tensor, got list"):
        direct(p.x, p.pws[0], None, [1.0], None, None, None, flat)
    with pytest.raises(TypeError, match="x must be a Tensor, got NoneType"):
        direct(None, p.pws[0], None, p.dw_weight, None, None, None, flat)
    with pytest.raises(TypeError, match="tuple of 10 ints"):
        direct(p.x, p.pws[0], None, p.dw_weight, None, None, None, flat[:-1])
    with pytest.raises(TypeError, match="expected 8 arguments"):
        direct(p.x)
    with pytest.raises(TypeError):
        direct(p.x, p.pws[0], None, p.dw_weight, None, None, None, (*flat[:-1], "relu"))
    # The op's own checks raise the same error through both entries.
    bad = torch.randn(5, 1, 3, 3)  # N = 5 depthwise channels for a projection to 6
    args = (p.x, p.pws[0], None, bad, None, None, None)
    with pytest.raises(RuntimeError) as via_ops:
        torch.ops.bsconv_fused.forward.default(*args, *_opts(p).op_args)
    with pytest.raises(type(via_ops.value)) as via_direct:
        direct(*args, flat)
    assert str(via_direct.value).splitlines()[0] == str(via_ops.value).splitlines()[0]
    assert "dw_weight" in str(via_direct.value)


def test_remembered_call_entry_declines_what_it_does_not_handle():
    """functional._call (csrc/python_call.cpp) serves only remembered signatures of plain
    tensors on a device with a fused kernel, outside torch function modes and autocast; for
    anything else it returns NotImplemented and the Python path runs."""
    call = functional._call
    p = make_problem("u", B=1, M=4, N=6, H=5, W=5, padding=1).cast(torch.float32)
    x, pw, dw = p.x.detach(), p.pws[0].detach(), p.dw_weight.detach()

    def args(x=x, pw=pw, dw=dw, stride=1):
        return (_args._options_cache, 0, x, pw, None, dw, None, None, None, stride, 1, 1,
                "zeros", None)

    _args._options_cache.clear()
    assert call(*args()) is NotImplemented  # not validated yet
    y = functional.bsconv_u(x, pw, dw, padding=1)  # validates and remembers
    assert len(_args._options_cache) == 1
    torch.testing.assert_close(call(*args()), y, rtol=0, atol=0)
    assert call(*args(stride=2)) is NotImplemented  # another signature
    assert call(*args(x=x[:, :, :4])) is NotImplemented
    assert call(*args(stride=True)) is NotImplemented  # keyed in Python

    class Sub(torch.Tensor):
        pass

    assert call(*args(x=x.as_subclass(Sub))) is NotImplemented
    assert call(*args(dw=dw.as_subclass(Sub))) is NotImplemented
    functional.bsconv_u(x.to("meta"), pw.to("meta"), dw.to("meta"), padding=1)
    assert call(*args(x.to("meta"), pw.to("meta"), dw.to("meta"))) is NotImplemented

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert call(*args()) is NotImplemented
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert call(*args()) is NotImplemented
        assert functional.bsconv_u(x, pw, dw, padding=1).dtype == torch.bfloat16
    # under use_reference() functional does not call it at all
    assert fused_op_ran(lambda: functional.bsconv_u(x, pw, dw, padding=1))
    with bsconv_fused.use_reference():
        assert not fused_op_ran(lambda: functional.bsconv_u(x, pw, dw, padding=1))
    with pytest.raises(TypeError, match="expected a dict"):
        call({}, 0, x)
    with pytest.raises(TypeError, match="expected a dict"):
        call([], *args()[1:])
