"""The registered ops ``bsconv_fused::forward`` / ``bsconv_fused::backward``: fake kernels.

Autograd of the forward op is registered in C++ (``csrc/autograd.cpp``): it saves the inputs and
calls the backward op once, with no Python on the call path.

One op pair covers both variants: BSConv-U passes its projection as ``pw1_weight`` and
``pw2_weight=None``; BSConv-S passes both. The C++ schemas live in ``csrc/bsconv.cpp``; the shape
rules here mirror ``csrc/cpu/bsconv_cpu.cpp``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch._prims_common import suggest_memory_format

from ._args import ConvOptions

_PLAIN = (torch.Tensor, torch.nn.Parameter, type(None))
_direct = None  # the extension's eager entry of the forward op (csrc/python_call.cpp)


def forward(x: torch.Tensor, pw1_weight: torch.Tensor, pw2_weight: Optional[torch.Tensor],
            dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
            mid_scale: Optional[torch.Tensor], mid_shift: Optional[torch.Tensor],
            opts: ConvOptions) -> torch.Tensor:
    """Calls the fused forward op with already-validated options.

    Eager calls on plain tensors take the extension's direct entry, which skips the ~10 us of
    argument conversion of ``torch.ops`` and goes through the same dispatcher. Everything
    else calls ``torch.ops``: torch.compile / export (which trace the op), tensor subclasses
    and torch function modes (which override it through ``__torch_function__``)."""
    if (_direct is not None and type(x) in _PLAIN and type(pw1_weight) in _PLAIN
            and type(pw2_weight) in _PLAIN and type(dw_weight) in _PLAIN
            and type(dw_bias) in _PLAIN and type(mid_scale) in _PLAIN
            and type(mid_shift) in _PLAIN and not torch._C._is_torch_function_mode_enabled()
            and not torch.compiler.is_compiling()):
        return _direct(x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift,
                       opts.flat_args)
    return torch.ops.bsconv_fused.forward.default(
        x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift, *opts.op_args)


def _output_shape(x: torch.Tensor, pw_last: torch.Tensor, dw_weight: torch.Tensor,
                  stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int]) -> List[int]:
    kh, kw = dw_weight.shape[2], dw_weight.shape[3]
    ho = (x.shape[2] + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [x.shape[0], pw_last.shape[0], ho, wo]


def _forward_fake(x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift,
                  stride, padding, dilation, padding_mode, activation):
    last = pw1_weight if pw2_weight is None else pw2_weight
    shape = _output_shape(x, last, dw_weight, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


def _backward_fake(grad_y, x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift,
                   stride, padding, dilation, padding_mode, activation, output_mask):
    like = [x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift]
    out = []
    for i, t in enumerate(like):
        if output_mask[i] and t is not None:
            fmt = suggest_memory_format(t) if t.dim() == 4 else torch.contiguous_format
            out.append(torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt))
        else:
            out.append(x.new_empty((0,)))
    return tuple(out)


_registered = False


def register(direct: Optional[object] = None) -> None:
    """Registers the fake kernels of the ops (once, after the extension loaded); ``direct``:
    the extension's eager entry of the forward op."""
    global _registered, _direct
    _direct = direct
    if _registered:
        return
    torch.library.register_fake("bsconv_fused::forward")(_forward_fake)
    torch.library.register_fake("bsconv_fused::backward")(_backward_fake)
    _registered = True
