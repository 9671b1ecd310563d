"""Pure-PyTorch BSConv: the oracle for the tests, the fallback and the benchmark baseline.

Built only from standard ops (``F.conv2d``, ``F.pad``, activations), in the order the authors'
package applies them: pointwise projection(s), optional mid transform (per-channel affine and
activation, applied to image pixels only), then the padded depthwise convolution. The math is in
``shared/design/bsconv.md``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._args import ConvOptions, IntOrPair, Padding, normalize


def _mid(v: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
         activation: str) -> torch.Tensor:
    if scale is not None:
        v = v * scale.view(1, -1, 1, 1)
    if shift is not None:
        v = v + shift.view(1, -1, 1, 1)
    if activation == "relu":
        v = F.relu(v)
    elif activation == "relu6":
        v = F.relu6(v)
    elif activation == "hardswish":
        v = F.hardswish(v)
    return v


def _depthwise(v: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
               opts: ConvOptions) -> torch.Tensor:
    pt, pb, pl, pr = opts.padding
    if opts.padding_mode == "zeros" and pt == pb and pl == pr:
        padding = (pt, pl)
    else:
        # F.pad takes (left, right, top, bottom); "constant" is zeros mode.
        mode = "constant" if opts.padding_mode == "zeros" else opts.padding_mode
        v = F.pad(v, (pl, pr, pt, pb), mode=mode)
        padding = (0, 0)
    return F.conv2d(v, dw_weight, dw_bias, opts.stride, padding, opts.dilation,
                    groups=v.shape[1])


def _bsconv(x, pws, dw_weight, dw_bias, opts, mid_scale, mid_shift):
    v = x
    for w in pws:
        v = F.conv2d(v, w)
    v = _mid(v, mid_scale, mid_shift, opts.activation)
    return _depthwise(v, dw_weight, dw_bias, opts)


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
    """Reference BSConv-U. x [B, M, H, W], pw_weight [N, M, 1, 1], dw_weight [N, 1, K_h, K_w],
    dw_bias / mid_scale / mid_shift [N]. Returns y [B, N, H_out, W_out]."""
    opts = normalize("bsconv_u", x, [("pw_weight", pw_weight)], dw_weight, dw_bias, stride,
                     padding, dilation, padding_mode, mid_scale, mid_shift, mid_activation)
    return _bsconv(x, [pw_weight], dw_weight, dw_bias, opts, mid_scale, mid_shift)


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
    """Reference BSConv-S. pw1_weight [M', M, 1, 1], pw2_weight [N, M', 1, 1], the rest as
    :func:`bsconv_u`."""
    opts = normalize("bsconv_s", x, [("pw1_weight", pw1_weight), ("pw2_weight", pw2_weight)],
                     dw_weight, dw_bias, stride, padding, dilation, padding_mode, mid_scale,
                     mid_shift, mid_activation)
    return _bsconv(x, [pw1_weight, pw2_weight], dw_weight, dw_bias, opts, mid_scale, mid_shift)
