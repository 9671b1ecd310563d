"""Drop-in replacements for the authors' ``bsconv.pytorch.BSConvU`` / ``BSConvS`` on the fused op.

The modules subclass ``nn.Sequential`` and build exactly the submodules of ``bsconv`` 0.4.0, with
the same names, order, constructors (hence the same default initialization and the same RNG
consumption) and therefore the same ``state_dict`` keys, so weights load in both directions and
``model[0]`` still is the (first) pointwise convolution. Only ``forward`` differs: it runs the
whole block as one fused op (``bsconv_fused.functional``), folding eval-mode BatchNorm into the
op's per-channel mid transform. The math is in ``shared/design/bsconv.md``.

``forward`` falls back to the plain ``nn.Sequential`` forward (the submodules one after another,
exactly the reference computation) whenever the block cannot be fused:

* a BatchNorm that normalizes with batch statistics (training mode, or no running statistics),
  because the statistics of the projected tensor are not known before it is computed;
* the structure was changed after construction (children added, removed, renamed or replaced by
  modules with their own ``forward``, e.g. by QAT conversion or Conv-BN fusion), or a child has
  forward/backward hooks (e.g. ``spectral_norm``, feature-extraction hooks), which only run when
  the child itself is called;
* ``torch.fx.symbolic_trace`` is tracing the module (the fused path validates concrete shapes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

try:  # true for fx.symbolic_trace only, not for torch.export / torch.compile
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_symbolic_tracing
except ImportError:  # pragma: no cover  (older torch)
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_symbolic_tracing

from . import functional
from ._args import IntOrPair, Padding

__all__ = ["BSConvS", "BSConvU", "orthonormal_loss"]

_LAYOUT_U = (("pw", "dw"), ("pw", "bn", "dw"))
_LAYOUT_S = (("pw1", "pw2", "dw"), ("pw1", "bn1", "pw2", "bn2", "dw"))


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _is_plain_conv(m: nn.Module) -> bool:
    # Subclasses that only add parametrizations (weight_norm, orthogonal, ...) keep Conv2d.forward
    # and expose the effective weight as ``.weight``: still fusable.
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and not _has_hooks(m)


def _weight_bias(m: nn.Module) -> tuple:
    """``(m.weight, m.bias)`` of a conv; from the parameter dict of a plain ``nn.Conv2d`` (the
    same tensors: ``nn.Module.__getattr__`` takes ~1.3 us per attribute on the build machine,
    a fused call of a small layer ~16 us). Parametrized subclasses go through their
    properties."""
    if type(m) is nn.Conv2d:
        p = m._parameters
        if "weight" in p and "bias" in p:
            return p["weight"], p["bias"]
    return m.weight, m.bias


def _is_pointwise(m: nn.Module) -> bool:
    return (_is_plain_conv(m) and _weight_bias(m)[1] is None and m.groups == 1
            and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and m.padding in ((0, 0), "valid") and tuple(m.dilation) == (1, 1))


def _is_depthwise(m: nn.Module) -> bool:
    return _is_plain_conv(m) and m.groups == m.in_channels == m.out_channels


def _is_foldable_bn(m: nn.Module) -> bool:
    """True when ``m`` is a BatchNorm2d that normalizes with its running statistics (an affine
    map), mirroring the ``bn_training`` decision in ``nn.BatchNorm2d.forward``."""
    return (isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward
            and not _has_hooks(m) and not m.training
            and m.running_mean is not None and m.running_var is not None)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` (per channel), built from differentiable
    ops so that gradients reach ``bn.weight`` and ``bn.bias``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _factory_kwargs(device: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    return {"device": device, "dtype": dtype}


def _getitem(self: nn.Sequential, idx: int | slice) -> nn.Module:
    # nn.Sequential rebuilds slices with ``self.__class__(OrderedDict)``, which the BSConv
    # constructors cannot take (nor can bsconv's): return a plain nn.Sequential instead.
    if isinstance(idx, slice):
        return nn.Sequential(*list(self._modules.values())[idx])
    return nn.Sequential.__getitem__(self, idx)


class BSConvU(nn.Sequential):
    r"""Unconstrained Blueprint Separable Convolution (BSConv-U), fused.

    Pointwise ``M -> N`` projection (no bias), optional BatchNorm, then a ``K x K`` depthwise
    convolution on the ``N`` channels. Submodules (as in ``bsconv.pytorch.BSConvU``):
    ``pw`` (``nn.Conv2d``, weight [N, M, 1, 1]), ``bn`` (``nn.BatchNorm2d(N)``, only with
    ``with_bn``), ``dw`` (``nn.Conv2d``, groups=N, weight [N, 1, K_h, K_w], bias [N]).

    Args:
        in_channels: M.
        out_channels: N.
        kernel_size, stride, padding, dilation, padding_mode: of the depthwise convolution, as in
            ``nn.Conv2d`` (``padding`` may also be ``"same"`` or ``"valid"``).
        bias: whether the depthwise convolution has a bias.
        with_bn: insert ``nn.BatchNorm2d`` between the projection and the depthwise convolution.
        bn_kwargs: extra keyword arguments of that ``nn.BatchNorm2d``.
        device, dtype: factory arguments passed to every submodule (an extension over
            ``bsconv``; keyword only).

    Shapes: input [B, M, H, W] -> output [B, N, H_out, W_out], H_out / W_out as ``nn.Conv2d``.

    In training mode with BatchNorm the block runs unfused (batch statistics); in eval mode the
    BatchNorm is folded into the fused op.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        with_bn: bool = False,
        bn_kwargs: dict[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = _factory_kwargs(device, dtype)
        if bn_kwargs is None:
            bn_kwargs = {}
        self.add_module("pw", nn.Conv2d(
            in_channels=in_channels, out_channels=out_channels, kernel_size=(1, 1), stride=1,
            padding=0, dilation=1, groups=1, bias=False, **factory))
        if with_bn:
            self.add_module("bn", nn.BatchNorm2d(num_features=out_channels,
                                                 **{**factory, **bn_kwargs}))
        self.add_module("dw", nn.Conv2d(
            in_channels=out_channels, out_channels=out_channels, kernel_size=kernel_size,
            stride=stride, padding=padding, dilation=dilation, groups=out_channels, bias=bias,
            padding_mode=padding_mode, **factory))

    __getitem__ = _getitem

    def _fusable(self) -> bool:
        names = tuple(self._modules)
        if names not in _LAYOUT_U or _fx_symbolic_tracing():
            return False
        m = self._modules
        if not (_is_pointwise(m["pw"]) and _is_depthwise(m["dw"])):
            return False
        return "bn" not in m or _is_foldable_bn(m["bn"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, M, H, W] -> y [B, N, H_out, W_out]."""
        if not self._fusable():
            return super().forward(x)
        pw, dw = self._modules["pw"], self._modules["dw"]
        w = _weight_bias(pw)[0]
        dw_w, dw_b = _weight_bias(dw)
        scale = shift = None
        bn = self._modules.get("bn")
        if bn is not None:
            # A BatchNorm kept in float32 under a half-precision block (a common recipe, which
            # nn.BatchNorm2d accepts) folds in float32; the op wants the dtype of the weights.
            scale, shift = (t.to(w.dtype) for t in _bn_affine(bn))
        return functional.bsconv_u(
            x, w, dw_w, dw_b, stride=dw.stride, padding=dw.padding, dilation=dw.dilation,
            padding_mode=dw.padding_mode, mid_scale=scale, mid_shift=shift)


class BSConvS(nn.Sequential):
    r"""Subspace Blueprint Separable Convolution (BSConv-S), fused.

    The projection is factored as ``W = W2 W1`` through ``M' = min(M, max(min_mid_channels,
    ceil(p * M)))`` channels. Submodules (as in ``bsconv.pytorch.BSConvS``): ``pw1``
    (weight [M', M, 1, 1]), ``bn1`` (``nn.BatchNorm2d(M')``, only with ``with_bn``), ``pw2``
    (weight [N, M', 1, 1]), ``bn2`` (``nn.BatchNorm2d(N)``, only with ``with_bn``), ``dw``
    (groups=N, weight [N, 1, K_h, K_w], bias [N]).

    Args:
        p: fraction of the input channels kept in the subspace, ``0 <= p <= 1``.
        min_mid_channels: lower bound of M' (before clipping to M).
        Everything else as :class:`BSConvU`.

    Shapes: input [B, M, H, W] -> output [B, N, H_out, W_out].

    Add :func:`orthonormal_loss` (or ``reg_loss`` of each block) to the task loss to keep the
    rows of W1 orthonormal, as in the paper.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        p: float = 0.25,
        min_mid_channels: int = 4,
        with_bn: bool = False,
        bn_kwargs: dict[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not (0.0 <= p <= 1.0):  # also rejects NaN
            raise ValueError(f"BSConvS: p must be in [0, 1], got {p!r}")
        mid_channels = min(in_channels, max(min_mid_channels, math.ceil(p * in_channels)))
        if mid_channels < 1:
            raise ValueError(
                f"BSConvS: the subspace has {mid_channels} channels (in_channels={in_channels}, "
                f"p={p!r}, min_mid_channels={min_mid_channels}); it needs at least one")
        factory = _factory_kwargs(device, dtype)
        if bn_kwargs is None:
            bn_kwargs = {}
        self.add_module("pw1", nn.Conv2d(
            in_channels=in_channels, out_channels=mid_channels, kernel_size=(1, 1), stride=1,
            padding=0, dilation=1, groups=1, bias=False, **factory))
        if with_bn:
            self.add_module("bn1", nn.BatchNorm2d(num_features=mid_channels,
                                                  **{**factory, **bn_kwargs}))
        self.add_module("pw2", nn.Conv2d(
            in_channels=mid_channels, out_channels=out_channels, kernel_size=(1, 1), stride=1,
            padding=0, dilation=1, groups=1, bias=False, **factory))
        if with_bn:
            self.add_module("bn2", nn.BatchNorm2d(num_features=out_channels,
                                                  **{**factory, **bn_kwargs}))
        self.add_module("dw", nn.Conv2d(
            in_channels=out_channels, out_channels=out_channels, kernel_size=kernel_size,
            stride=stride, padding=padding, dilation=dilation, groups=out_channels, bias=bias,
            padding_mode=padding_mode, **factory))

    __getitem__ = _getitem

    def _fusable(self) -> bool:
        names = tuple(self._modules)
        if names not in _LAYOUT_S or _fx_symbolic_tracing():
            return False
        m = self._modules
        if not (_is_pointwise(m["pw1"]) and _is_pointwise(m["pw2"]) and _is_depthwise(m["dw"])):
            return False
        return "bn1" not in m or (_is_foldable_bn(m["bn1"]) and _is_foldable_bn(m["bn2"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, M, H, W] -> y [B, N, H_out, W_out]."""
        if not self._fusable():
            return super().forward(x)
        m = self._modules
        pw1, pw2, dw = m["pw1"], m["pw2"], m["dw"]
        w1, w2 = _weight_bias(pw1)[0], _weight_bias(pw2)[0]
        dw_w, dw_b = _weight_bias(dw)
        scale = shift = None
        if "bn1" in m:
            # pw1 -> bn1 -> pw2 -> bn2 with eval BN is v = s2 * (W2 (s1 * (W1 x) + t1)) + t2
            #   = s2 * (W2 W1' x) + (s2 * (W2 t1) + t2),  W1' = diag(s1) W1.
            # All four layers are 1x1, so this holds pixel by pixel; the depthwise padding acts
            # after bn2 in both forms.
            # The fold runs in the wider of the weight and BatchNorm dtypes (BN may be kept in
            # float32 under a half-precision block) and is cast back to the weights' dtype.
            s1, t1 = _bn_affine(m["bn1"])
            s2, t2 = _bn_affine(m["bn2"])
            ct = torch.promote_types(w2.dtype, t1.dtype)
            w1 = (w1.to(ct) * s1.to(ct).view(-1, 1, 1, 1)).to(w1.dtype)
            scale = s2.to(w2.dtype)
            shift = (s2.to(ct) * torch.mv(w2.flatten(1).to(ct), t1.to(ct)) + t2.to(ct)).to(w2.dtype)
        return functional.bsconv_s(
            x, w1, w2, dw_w, dw_b, stride=dw.stride, padding=dw.padding,
            dilation=dw.dilation, padding_mode=dw.padding_mode, mid_scale=scale,
            mid_shift=shift)

    def reg_loss(self) -> torch.Tensor:
        """Orthonormality penalty ``||W1 W1^T - I||_F`` of the first projection (plain Frobenius
        norm, not squared; W1 = ``pw1.weight`` as [M', M]). Returns a 0-dim tensor."""
        w = self._modules["pw1"].weight.flatten(1)
        wwt = w @ w.t()
        eye = torch.eye(wwt.shape[0], device=wwt.device, dtype=wwt.dtype)
        return torch.linalg.matrix_norm(wwt - eye, ord="fro")

    def _reg_loss(self) -> torch.Tensor:
        """Alias of :meth:`reg_loss` under the name ``bsconv.pytorch.BSConvS_ModelRegLossMixin``
        looks for."""
        return self.reg_loss()


def orthonormal_loss(model: nn.Module, alpha: float = 0.1) -> torch.Tensor:
    """``alpha * sum(reg_loss)`` over every BSConv-S block in ``model`` (``model`` included).

    Counts this package's :class:`BSConvS` and any module with a ``_reg_loss`` method (the
    authors' ``bsconv.pytorch.BSConvS``). Returns a 0-dim tensor, zero (on the device / dtype of
    the model's first parameter) when there is no such block. The paper uses alpha = 0.1 on
    ImageNet and 0.01 on CIFAR.
    """
    total: torch.Tensor | None = None
    for m in model.modules():
        if isinstance(m, BSConvS):
            loss = m.reg_loss()
        elif callable(getattr(m, "_reg_loss", None)):
            loss = m._reg_loss()
        else:
            continue
        total = loss if total is None else total + loss
    if total is None:
        p = next(model.parameters(), None)
        total = (torch.zeros(()) if p is None
                 else torch.zeros((), device=p.device, dtype=p.dtype))
    return alpha * total
