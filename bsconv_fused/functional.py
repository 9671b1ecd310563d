"""Functional BSConv-U / BSConv-S on the fused kernels (the reference path as fallback)."""

from __future__ import annotations

from typing import List, Optional

import torch

from . import _args, ops, reference
from ._args import IntOrPair, Padding, normalize_cached
from ._extension import _state as _ext_state
from ._extension import autocast_dtype, fused_available_for
from ._extension import fused_call as _call  # None without the extension


def _autocast(*tensors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Casts floating-point tensors to the autocast dtype when autocast is on for their device."""
    x = tensors[0]
    if not torch._C._is_any_autocast_enabled() or not isinstance(x, torch.Tensor):
        return list(tensors)
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in tensors]


def bsconv_u(
    x: torch.Tensor,
    pw_weight: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    padding_mode: str = "zeros",
    mid_scale: Optional[torch.Tensor] = None,
    mid_shift: Optional[torch.Tensor] = None,
    mid_activation: Optional[str] = None,
) -> torch.Tensor:
    """Fused BSConv-U: ``y = DW(act(scale * (W x) + shift)) + b``, one kernel launch.

    Shapes: x [B, M, H, W]; pw_weight [N, M, 1, 1]; dw_weight [N, 1, K_h, K_w]; dw_bias,
    mid_scale, mid_shift [N] (optional). stride / padding / dilation / padding_mode follow
    nn.Conv2d (padding may be "same" or "valid"); mid_activation is None, "relu", "relu6" or
    "hardswish" and acts on image pixels only. Returns y [B, N, H_out, W_out] in the memory
    format of x.
    """
    if not torch.compiler.is_compiling() and _call is not None and not _ext_state.force_reference:
        # A call signature seen before, on plain tensors: validated options and the op call in
        # one C call (NotImplemented: anything else, which the code below handles).
        y = _call(_args._options_cache, 0, x, pw_weight, None, dw_weight, dw_bias, mid_scale,
                  mid_shift, stride, padding, dilation, padding_mode, mid_activation)
        if y is not NotImplemented:
            return y
    x, pw_weight, dw_weight, dw_bias, mid_scale, mid_shift = _autocast(
        x, pw_weight, dw_weight, dw_bias, mid_scale, mid_shift)
    opts = normalize_cached("bsconv_u", x, [("pw_weight", pw_weight)], dw_weight, dw_bias,
                            stride, padding, dilation, padding_mode, mid_scale, mid_shift,
                            mid_activation)
    if fused_available_for(x.device):
        return ops.forward(x, pw_weight, None, dw_weight, dw_bias, mid_scale, mid_shift, opts)
    return reference._bsconv(x, [pw_weight], dw_weight, dw_bias, opts, mid_scale, mid_shift)


def bsconv_s(
    x: torch.Tensor,
    pw1_weight: torch.Tensor,
    pw2_weight: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    padding_mode: str = "zeros",
    mid_scale: Optional[torch.Tensor] = None,
    mid_shift: Optional[torch.Tensor] = None,
    mid_activation: Optional[str] = None,
) -> torch.Tensor:
    """Fused BSConv-S: ``y = DW(act(scale * (W2 W1 x) + shift)) + b``, one kernel launch.

    pw1_weight [M', M, 1, 1], pw2_weight [N, M', 1, 1]; everything else as :func:`bsconv_u`.
    """
    if not torch.compiler.is_compiling() and _call is not None and not _ext_state.force_reference:
        y = _call(_args._options_cache, 1, x, pw1_weight, pw2_weight, dw_weight, dw_bias,
                  mid_scale, mid_shift, stride, padding, dilation, padding_mode, mid_activation)
        if y is not NotImplemented:
            return y
    x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift = _autocast(
        x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift)
    opts = normalize_cached("bsconv_s", x,
                            [("pw1_weight", pw1_weight), ("pw2_weight", pw2_weight)],
                            dw_weight, dw_bias, stride, padding, dilation, padding_mode,
                            mid_scale, mid_shift, mid_activation)
    if fused_available_for(x.device):
        return ops.forward(x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift,
                           opts)
    return reference._bsconv(x, [pw1_weight, pw2_weight], dw_weight, dw_bias, opts, mid_scale,
                             mid_shift)
