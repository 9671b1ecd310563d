"""Bad input fails with a clear message that names the argument (Python API and raw ops)."""

from __future__ import annotations

import pytest
import torch

from bsconv_fused import functional, reference


def args(M=4, N=6, K=3, H=8, W=8, dtype=torch.float32):
    return (torch.randn(2, M, H, W, dtype=dtype), torch.randn(N, M, 1, 1, dtype=dtype),
            torch.randn(N, 1, K, K, dtype=dtype))


CASES = [
    # (description, mutate(x, pw, dw) -> (x, pw, dw, kwargs), exception, message)
    ("x rank", lambda x, pw, dw: (x[0], pw, dw, {}), ValueError, r"x must have 4 dimensions"),
    ("pw rank", lambda x, pw, dw: (x, pw[:, :, 0, 0], dw, {}), ValueError,
     r"pw_weight must have 4 dimensions"),
    ("channel mismatch", lambda x, pw, dw: (x[:, :3], pw, dw, {}), ValueError,
     r"pw_weight has 4 input channels but x has 3"),
    ("pw not 1x1", lambda x, pw, dw: (x, pw.expand(6, 4, 3, 3), dw, {}), ValueError,
     r"pw_weight must have shape \[C_out, 4, 1, 1\], got \[6, 4, 3, 3\]"),
    ("dw shape", lambda x, pw, dw: (x, pw, dw[:5], {}), ValueError,
     r"dw_weight must have shape \[6, 1, K_h, K_w\], got \[5, 1, 3, 3\]"),
    ("dw rank", lambda x, pw, dw: (x, pw, dw[:, 0], {}), ValueError,
     r"dw_weight must have 4 dimensions"),
    ("bias shape", lambda x, pw, dw: (x, pw, dw, {"dw_bias": torch.zeros(5)}), ValueError,
     r"dw_bias must have shape \[6\], got \[5\]"),
    ("scale shape", lambda x, pw, dw: (x, pw, dw, {"mid_scale": torch.zeros(6, 1)}), ValueError,
     r"mid_scale must have 1 dimensions"),
    ("shift shape", lambda x, pw, dw: (x, pw, dw, {"mid_shift": torch.zeros(7)}), ValueError,
     r"mid_shift must have shape \[6\], got \[7\]"),
    ("dtype mismatch", lambda x, pw, dw: (x, pw.double(), dw, {}), TypeError,
     r"pw_weight must have the dtype of x \(torch.float32\), got torch.float64"),
    ("bias dtype", lambda x, pw, dw: (x, pw, dw, {"dw_bias": torch.zeros(6).half()}), TypeError,
     r"dw_bias must have the dtype of x"),
    ("int input", lambda x, pw, dw: (x.int(), pw, dw, {}), TypeError,
     r"x must be float64, float32, bfloat16 or float16, got torch.int32"),
    ("device mismatch", lambda x, pw, dw: (x, pw.to("meta"), dw, {}), ValueError,
     r"pw_weight must be on the device of x \(cpu\), got meta"),
    ("stride zero", lambda x, pw, dw: (x, pw, dw, {"stride": 0}), ValueError,
     r"stride must be positive, got \(0, 0\)"),
    ("stride negative", lambda x, pw, dw: (x, pw, dw, {"stride": (1, -2)}), ValueError,
     r"stride must be positive, got \(1, -2\)"),
    ("dilation zero", lambda x, pw, dw: (x, pw, dw, {"dilation": (0, 1)}), ValueError,
     r"dilation must be positive, got \(0, 1\)"),
    ("padding negative", lambda x, pw, dw: (x, pw, dw, {"padding": -1}), ValueError,
     r"padding must be non-negative, got \(-1, -1\)"),
    ("padding string", lambda x, pw, dw: (x, pw, dw, {"padding": "full"}), ValueError,
     r"padding must be an int, a pair of ints, 'same' or 'valid', got 'full'"),
    ("padding triple", lambda x, pw, dw: (x, pw, dw, {"padding": (1, 2, 3)}), TypeError,
     r"padding must be an int or a pair of ints, got \(1, 2, 3\)"),
    ("same strided", lambda x, pw, dw: (x, pw, dw, {"padding": "same", "stride": 2}), ValueError,
     r"padding='same' is not supported for strided convolutions"),
    ("kernel too large", lambda x, pw, dw: (x[:, :, :2, :2], pw, dw, {}), ValueError,
     r"kernel size \(3, 3\) with dilation \(1, 1\) \(effective \(3, 3\)\) is larger than the "
     r"padded input \(2, 2\)"),
    ("dilated kernel too large", lambda x, pw, dw: (x, pw, dw, {"dilation": 4}), ValueError,
     r"kernel size \(3, 3\) with dilation \(4, 4\).* is larger than the padded input \(8, 8\)"),
    ("reflect too wide", lambda x, pw, dw: (x, pw, dw, {"padding": 8, "padding_mode": "reflect"}),
     ValueError, r"reflect padding \(top=8\) must be smaller than the input height \(8\)"),
    ("circular too wide",
     lambda x, pw, dw: (x, pw, dw, {"padding": (0, 9), "padding_mode": "circular"}), ValueError,
     r"circular padding \(left=9\) must be at most the input width \(8\)"),
    ("padding mode", lambda x, pw, dw: (x, pw, dw, {"padding_mode": "mirror"}), ValueError,
     r"padding_mode must be one of \('zeros', 'reflect', 'replicate', 'circular'\), got 'mirror'"),
    ("activation", lambda x, pw, dw: (x, pw, dw, {"mid_activation": "gelu"}), ValueError,
     r"mid_activation must be None or one of .*got 'gelu'"),
    ("x not a tensor", lambda x, pw, dw: (x.tolist(), pw, dw, {}), TypeError,
     r"x must be a Tensor, got list"),
]


@pytest.mark.parametrize("impl", [functional, reference], ids=["fused", "reference"])
@pytest.mark.parametrize("desc,mutate,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bsconv_u_errors(impl, desc, mutate, exc, msg):
    x, pw, dw, kw = mutate(*args())
    with pytest.raises(exc, match=r"^bsconv_u: " + msg):
        impl.bsconv_u(x, pw, dw, **kw)


@pytest.mark.parametrize("impl", [functional, reference], ids=["fused", "reference"])
def test_bsconv_s_errors_name_the_right_weight(impl):
    x = torch.randn(1, 8, 5, 5)
    w1, w2, dw = torch.randn(2, 8, 1, 1), torch.randn(6, 2, 1, 1), torch.randn(6, 1, 3, 3)
    with pytest.raises(ValueError, match=r"bsconv_s: pw2_weight has 3 input channels but "
                                         r"pw1_weight has 2"):
        impl.bsconv_s(x, w1, torch.randn(6, 3, 1, 1), dw)
    with pytest.raises(ValueError, match=r"bsconv_s: pw1_weight has 8 input channels but x has 7"):
        impl.bsconv_s(x[:, :7], w1, w2, dw)
    with pytest.raises(ValueError, match=r"bsconv_s: dw_weight must have shape \[6, 1, K_h, K_w\]"):
        impl.bsconv_s(x, w1, w2, dw[:4])


def test_raw_op_checks_its_arguments():
    """The C++ entry points check too (for callers that bypass the Python API)."""
    x, pw, dw = args()
    op = torch.ops.bsconv_fused.forward
    with pytest.raises(RuntimeError, match=r"bsconv_fused::forward: dw_weight must have shape "
                                           r"\[6, 1, K_h, K_w\], got \[6, 3, 3\]"):
        op(x, pw, None, dw[:, 0], None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 0, 0)
    with pytest.raises(RuntimeError, match=r"padding_mode must be 0 \(zeros\).*got 7"):
        op(x, pw, None, dw, None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 7, 0)
    with pytest.raises(RuntimeError, match=r"activation must be 0 \(none\).*got -1"):
        op(x, pw, None, dw, None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 0, -1)
    with pytest.raises(RuntimeError, match=r"stride must be positive"):
        op(x, pw, None, dw, None, None, None, [0, 1], [1, 1, 1, 1], [1, 1], 0, 0)
    with pytest.raises(RuntimeError, match=r"reflect padding \(8\) must be smaller than the "
                                           r"input height \(8\)"):
        op(x, pw, None, dw, None, None, None, [1, 1], [8, 1, 1, 1], [1, 1], 1, 0)
    with pytest.raises(RuntimeError, match=r"mid_scale must have the dtype of x"):
        op(x, pw, None, dw, None, torch.ones(6).double(), None, [1, 1], [1, 1, 1, 1], [1, 1], 0, 0)
    gy = torch.randn(2, 6, 7, 8)
    with pytest.raises(RuntimeError, match=r"bsconv_fused::backward: grad_y must have shape "
                                           r"\[2, 6, 8, 8\], got \[2, 6, 7, 8\]"):
        torch.ops.bsconv_fused.backward(gy, x, pw, None, dw, None, None, None, [1, 1],
                                        [1, 1, 1, 1], [1, 1], 0, 0, [True] * 7)


def test_remembered_signatures_still_reject_bad_input():
    """The fused path remembers argument signatures that passed validation; a call that differs
    only in what the signature must capture (a bool for an int, a list of floats, a new size
    that makes the padding too wide) is still checked and rejected."""
    x, pw, dw = args()
    functional.bsconv_u(x, pw, dw, stride=1, padding=1)  # valid: remembered
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints"):
        functional.bsconv_u(x, pw, dw, stride=True, padding=1)
    with pytest.raises(TypeError, match=r"padding must be an int or a pair of ints"):
        functional.bsconv_u(x, pw, dw, stride=1, padding=[1.0, 1.0])
    functional.bsconv_u(x, pw, dw, padding=2, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"reflect padding \(top=2\) must be smaller than"):
        functional.bsconv_u(x[:, :, :2], pw, dw, padding=2, padding_mode="reflect")
    with pytest.raises(TypeError, match=r"pw_weight must have the dtype of x"):
        functional.bsconv_u(x, pw.double(), dw, stride=1, padding=1)
    with pytest.raises(TypeError, match=r"x must be a Tensor"):
        functional.bsconv_u(x.numpy(), pw, dw, stride=1, padding=1)
    with pytest.raises(ValueError, match=r"dw_weight must have shape \[5, 1, K_h, K_w\]"):
        functional.bsconv_u(x, pw[:5], dw, stride=1, padding=1)  # another projection shape
    pw1, pw2 = torch.randn(3, 4, 1, 1), torch.randn(6, 3, 1, 1)
    functional.bsconv_s(x, pw1, pw2, dw, padding=1)  # valid: remembered
    with pytest.raises(ValueError, match=r"pw2_weight has 2 input channels but pw1_weight has 3"):
        functional.bsconv_s(x, pw1, pw2[:, :2], dw, padding=1)
    # and the remembered signature still gives the same result as a fresh validation
    y1 = functional.bsconv_u(x, pw, dw, stride=1, padding=1)
    y2 = reference.bsconv_u(x, pw, dw, stride=1, padding=1)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


def test_call_key_captures_every_field_of_the_signature():
    """The C++ key of the remembered signatures (bsconv_fused._C.call_key) changes with every
    tensor's shape, dtype and device and with every option; arguments it cannot key exactly
    (tensor subclasses, bools, floats, huge ints, non-tensors) give None, and the call is then
    keyed in Python."""
    from bsconv_fused import _args

    call_key = _args.call_key
    assert call_key is not None  # the extension was built and loaded
    x, pw, dw = args()
    base = [0, x, pw, None, dw, None, None, None, 1, 1, 1, "zeros", None]
    k0 = call_key(*base)
    assert isinstance(k0, bytes) and call_key(*base) == k0
    # what does not change the options: layout, values, Parameter for Tensor
    assert call_key(0, x.contiguous(memory_format=torch.channels_last), *base[2:]) == k0
    assert call_key(0, torch.randn_like(x), torch.nn.Parameter(pw), *base[3:]) == k0
    assert call_key(*base[:8], (1, 1), *base[9:]) == call_key(*base[:8], [1, 1], *base[9:])

    changes = {
        0: [1],
        1: [x.double(), x[:1], x[:, :, :7], x.to("meta"), x.unsqueeze(0)],
        2: [pw[:5], pw.double()],
        3: [torch.randn(6, 6, 1, 1)],
        4: [torch.randn(6, 1, 5, 5), torch.randn(6, 1, 3, 1)],
        5: [torch.randn(6)],
        6: [torch.randn(6)],
        7: [torch.randn(6)],
        8: [2, (1, 1), None],
        9: [0, "same", "valid", (1, 1), [1, 1, 1, 1], -1],
        10: [2, (1, 1)],
        11: ["reflect", "zero", ""],
        12: ["relu", "relu6"],
    }
    keys = [k0]
    for i, values in changes.items():
        for v in values:
            keys.append(call_key(*base[:i], v, *base[i + 1:]))
    assert all(isinstance(k, bytes) for k in keys)
    assert len(set(keys)) == len(keys)  # all distinct

    class Sub(torch.Tensor):
        pass

    not_keyed = {0: [None, "u", True], 1: [x.as_subclass(Sub), x.numpy(), [1.0]],
                 4: [dw.as_subclass(Sub)], 8: [True, 1.0, (1, True), 2 ** 70],
                 9: [(1, 1.0), {1: 1}], 11: [b"zeros"]}
    for i, values in not_keyed.items():
        for v in values:
            assert call_key(*base[:i], v, *base[i + 1:]) is None, (i, v)


def test_options_are_remembered_by_the_cpp_key():
    from bsconv_fused import _args

    x, pw, dw = args()
    _args._options_cache.clear()
    a = _args.normalize_cached("bsconv_u", x, [("pw_weight", pw)], dw, None, 1, 1, 1, "zeros",
                               None, None, None)
    b = _args.normalize_cached("bsconv_u", torch.randn_like(x), [("pw_weight", pw)], dw, None,
                               1, 1, 1, "zeros", None, None, None)
    assert b is a and len(_args._options_cache) == 1
    assert a == _args.normalize("bsconv_u", x, [("pw_weight", pw)], dw, None, 1, 1, 1, "zeros",
                                None, None, None)
    # a bool option is keyed in Python (and rejected there, not remembered)
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints"):
        _args.normalize_cached("bsconv_u", x, [("pw_weight", pw)], dw, None, True, 1, 1,
                               "zeros", None, None, None)
    assert len(_args._options_cache) == 1
