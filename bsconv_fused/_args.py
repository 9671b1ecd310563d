"""Argument normalization and validation shared by the fused path and the reference path.

Every public entry point funnels its convolution options through :func:`normalize` so that both
paths accept exactly the same inputs and reject bad ones with the same message, which names the
argument and shows what was expected and what was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

IntOrPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
ACTIVATIONS = ("none", "relu", "relu6", "hardswish")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ConvOptions:
    """Normalized options. ``padding`` is (top, bottom, left, right) in input pixels."""

    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]
    dilation: Tuple[int, int]
    padding_mode: str
    activation: str

    def __post_init__(self) -> None:
        # The trailing arguments of the ``bsconv_fused`` ops (stride ... activation), built once.
        object.__setattr__(self, "op_args", (
            list(self.stride), list(self.padding), list(self.dilation),
            self.padding_mode_code, self.activation_code))
        # The same as one flat tuple of ints, for the extension's eager entry (ops.forward).
        object.__setattr__(self, "flat_args", (
            *self.stride, *self.padding, *self.dilation, self.padding_mode_code,
            self.activation_code))

    @property
    def padding_mode_code(self) -> int:
        return PADDING_MODES.index(self.padding_mode)

    @property
    def activation_code(self) -> int:
        return ACTIVATIONS.index(self.activation)

    def output_size(self, h: int, w: int, kh: int, kw: int) -> Tuple[int, int]:
        pt, pb, pl, pr = self.padding
        ho = (h + pt + pb - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + pl + pr - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return ho, wo


def _pair(fn: str, name: str, value: IntOrPair) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")


def _padding(
    fn: str, padding: Padding, stride: Tuple[int, int], dilation: Tuple[int, int], kh: int, kw: int
) -> Tuple[int, int, int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"{fn}: padding='same' is not supported for strided convolutions, "
                    f"got stride={stride}"
                )
            # Same split as nn.Conv2d: the odd pixel of an even total goes to the bottom/right.
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(
            f"{fn}: padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}"
        )
    ph, pw = _pair(fn, "padding", padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"{fn}: padding must be non-negative, got {(ph, pw)}")
    return (ph, ph, pw, pw)


def check_tensor(fn: str, name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{fn}: {name} must have {ndim} dimensions, got {t.dim()} (shape {list(t.shape)})"
        )
    return t


def _check_shape(fn: str, name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if list(t.shape) != list(shape):
        raise ValueError(f"{fn}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def normalize(
    fn: str,
    x: torch.Tensor,
    pw_weights: Sequence[Tuple[str, torch.Tensor]],
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    stride: IntOrPair,
    padding: Padding,
    dilation: IntOrPair,
    padding_mode: str,
    mid_scale: Optional[torch.Tensor],
    mid_shift: Optional[torch.Tensor],
    mid_activation: Optional[str],
) -> ConvOptions:
    """Validates every argument of ``bsconv_u`` / ``bsconv_s`` and returns the normalized options.

    ``pw_weights`` is the chain of projections in application order with their argument names,
    e.g. ``[("pw1_weight", w1), ("pw2_weight", w2)]``; each must be [C_out, C_in, 1, 1] with C_in
    equal to the previous stage's channel count.
    """
    check_tensor(fn, "x", x, 4)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: x must be float64, float32, bfloat16 or float16, got {x.dtype}"
        )
    channels = x.shape[1]
    prev = "x"
    for name, w in pw_weights:
        check_tensor(fn, name, w, 4)
        if w.shape[2:] != (1, 1):
            raise ValueError(
                f"{fn}: {name} must have shape [C_out, {channels}, 1, 1], got {list(w.shape)}"
            )
        if w.shape[1] != channels:
            raise ValueError(
                f"{fn}: {name} has {w.shape[1]} input channels but {prev} has {channels} "
                f"(expected shape [{w.shape[0]}, {channels}, 1, 1], got {list(w.shape)})"
            )
        if w.shape[0] < 1:
            raise ValueError(f"{fn}: {name} must have at least one output channel")
        channels = w.shape[0]
        prev = name
    check_tensor(fn, "dw_weight", dw_weight, 4)
    if dw_weight.shape[0] != channels or dw_weight.shape[1] != 1:
        raise ValueError(f"{fn}: dw_weight must have shape [{channels}, 1, K_h, K_w], "
                         f"got {list(dw_weight.shape)}")
    kh, kw = dw_weight.shape[2], dw_weight.shape[3]
    if kh < 1 or kw < 1:
        raise ValueError(
            f"{fn}: dw_weight must have a non-empty kernel, got {list(dw_weight.shape)}")
    for name, t in (("dw_bias", dw_bias), ("mid_scale", mid_scale), ("mid_shift", mid_shift)):
        if t is not None:
            check_tensor(fn, name, t, 1)
            _check_shape(fn, name, t, [channels])
    tensors = [("x", x)] + list(pw_weights) + [("dw_weight", dw_weight)]
    tensors += [(n, t) for n, t in (("dw_bias", dw_bias), ("mid_scale", mid_scale),
                                    ("mid_shift", mid_shift)) if t is not None]
    for name, t in tensors[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(
                f"{fn}: {name} must be on the device of x ({x.device}), got {t.device}"
            )

    st = _pair(fn, "stride", stride)
    if min(st) < 1:
        raise ValueError(f"{fn}: stride must be positive, got {st}")
    dil = _pair(fn, "dilation", dilation)
    if min(dil) < 1:
        raise ValueError(f"{fn}: dilation must be positive, got {dil}")
    pad = _padding(fn, padding, st, dil, kh, kw)

    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{fn}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}"
        )
    act = "none" if mid_activation is None else mid_activation
    if act not in ACTIVATIONS:
        raise ValueError(
            f"{fn}: mid_activation must be None or one of {ACTIVATIONS}, got {mid_activation!r}"
        )

    h, w = x.shape[2], x.shape[3]
    pt, pb, pl, pr = pad
    if padding_mode in ("reflect", "circular"):
        # F.pad's limits: reflect needs pad < size, circular pad <= size.
        for side, p, size, dim in (("top", pt, h, "height"), ("bottom", pb, h, "height"),
                                   ("left", pl, w, "width"), ("right", pr, w, "width")):
            too_wide = p >= size if padding_mode == "reflect" else p > size
            if p > 0 and too_wide:
                rel = "smaller than" if padding_mode == "reflect" else "at most"
                raise ValueError(
                    f"{fn}: {padding_mode} padding ({side}={p}) must be {rel} the input "
                    f"{dim} ({size})"
                )
    eff_h, eff_w = dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1
    if h + pt + pb < eff_h or w + pl + pr < eff_w:
        raise ValueError(
            f"{fn}: kernel size {(kh, kw)} with dilation {dil} (effective {(eff_h, eff_w)}) is "
            f"larger than the padded input {(h + pt + pb, w + pl + pr)}"
        )
    return ConvOptions(st, pad, dil, padding_mode, act)


# ----------------------------------------------------------------------------------------------
# Validation results by call signature. A layer is called with the same shapes and options over
# and over; re-checking every argument in Python costs tens of microseconds per call, which is
# more than the fused kernel itself on small layers. A signature that passed :func:`normalize`
# once maps to its options; anything else (a new signature, an argument that is not a tensor or
# not a plain int / pair / string) goes through :func:`normalize`, which raises the errors.

_NOT_CACHEABLE = object()
call_key = None  # the extension's key builder (csrc/python_call.cpp), set when it loads
# The tag of each function (and number of projections) in call_key's keys.
CALL_TAGS = {("bsconv_u", 1): 0, ("bsconv_s", 2): 1}
_options_cache: dict = {}
_OPTIONS_CACHE_MAX = 4096


def _tensor_key(t: object) -> object:
    if t is None:
        return None
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        return _NOT_CACHEABLE
    return (t.shape, t.dtype, t.device)


def _option_key(v: object) -> object:
    tv = type(v)
    if tv is int or tv is str or v is None:
        return (tv, v)
    if (tv is tuple or tv is list) and all(type(e) is int for e in v):
        return (tuple, tuple(v))
    return _NOT_CACHEABLE


def normalize_cached(*args: object) -> ConvOptions:
    """:func:`normalize` (same arguments, same result, same errors), remembered per call
    signature."""
    if torch.compiler.is_compiling():  # traced once per graph anyway; keep dynamo out of the dict
        return normalize(*args)
    (fn, x, pw_weights, dw_weight, dw_bias, stride, padding, dilation, padding_mode, mid_scale,
     mid_shift, mid_activation) = args
    fast = None
    tag = CALL_TAGS.get((fn, len(pw_weights)))
    if call_key is not None and tag is not None:
        # The same information as the key below, as bytes built in C++ (~1 us, not ~4 us);
        # None for arguments of other types (tensor subclasses, bools, floats, ...).
        fast = call_key(tag, x, pw_weights[0][1],
                        pw_weights[1][1] if len(pw_weights) == 2 else None, dw_weight, dw_bias,
                        mid_scale, mid_shift, stride, padding, dilation, padding_mode,
                        mid_activation)
    key: object
    if fast is not None:
        key, cacheable = fast, True
    else:
        tk, ok = _tensor_key, _option_key
        pks = tuple(tk(w) for _, w in pw_weights)
        parts = (tk(x), *pks, tk(dw_weight), tk(dw_bias), tk(mid_scale), tk(mid_shift),
                 ok(stride), ok(padding), ok(dilation), ok(padding_mode), ok(mid_activation))
        key, cacheable = (fn, parts), _NOT_CACHEABLE not in parts
    opts = _options_cache.get(key)
    if opts is not None:
        return opts
    opts = normalize(*args)
    if cacheable:
        if len(_options_cache) >= _OPTIONS_CACHE_MAX:
            _options_cache.clear()
        _options_cache[key] = opts
    return opts
