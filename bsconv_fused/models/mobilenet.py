"""MobileNetV1 / V2 / V3 (ImageNet and CIFAR) with BSConv variants.

Same architectures, names and parsing as the authors' ``bsconv.pytorch.mobilenet`` (bsconv
0.4.0):

* ``mobilenetv1_..._bsconvu`` (paper Sect. 4.1): every depthwise separable block (3x3 depthwise,
  BN, ReLU, 1x1 pointwise, BN, ReLU) becomes ``nn.Sequential(BSConvU, BN, ReLU)`` with the fused
  :class:`~bsconv_fused.BSConvU` (pointwise first, then the depthwise convolution).
* ``mobilenetv2/v3_..._bsconvs_p1d6`` (paper Sect. 4.2): the network is unchanged; the reduction
  1x1 convolution of each linear bottleneck (``conv3``) is the first projection W1 of a BSConv-S
  (p = 1/6) and gets an orthonormality penalty (``model.reg_loss()``). Here the bottlenecks of
  these variants in addition run their expansion 1x1 conv, BN, activation and depthwise
  convolution as one fused op in eval mode (BSConv-U with a mid transform); in training mode, with
  batch-statistics BatchNorm, they run exactly as the reference.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

try:  # true for fx.symbolic_trace only, as in bsconv_fused.modules
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_symbolic_tracing
except ImportError:  # pragma: no cover  (older torch)
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_symbolic_tracing

from .. import functional
from ..convert import replace_modules
from ..modules import (
    BSConvU,
    _bn_affine,
    _has_hooks,
    _is_depthwise,
    _is_foldable_bn,
    _is_pointwise,
)
from .common import Classifier, ConvBlock, HSwish, SEUnit, ZooModel, conv_block

__all__ = [
    "BSConvSLinearBottleneck", "DepthwiseSeparableConvBlock", "LinearBottleneck", "MobileNetV1",
    "MobileNetV2", "MobileNetV3", "build_mobilenet_v1", "build_mobilenet_v2",
    "build_mobilenet_v3", "get_mobilenet",
]

ARCHITECTURE_PATTERN = re.compile(
    r"^(?P<cifar>cifar_)?mobilenet(?P<version>v1|v2|v3_small|v3_large)"
    r"_w(?P<width_num>[0-9]+)(d(?P<width_den>[0-9]+))?(_(?P<bsconv>bsconvu|bsconvs_p1d6))?$")


class DepthwiseSeparableConvBlock(nn.Module):
    """3x3 depthwise conv-BN-ReLU, then 1x1 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = conv_block(in_channels, in_channels, 3, stride=stride, depthwise=True)
        self.conv_pw = conv_block(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


class LinearBottleneck(nn.Module):
    """Inverted residual: 1x1 expand-BN-act, kxk depthwise-BN-act, optional SE, 1x1 reduce-BN,
    identity shortcut when the shape is kept."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int,
                 activation: str = "relu6", kernel_size: int = 3, use_se: bool = False) -> None:
        super().__init__()
        self.use_res_skip = in_channels == out_channels and stride == 1
        self.use_se = use_se
        self.conv1 = conv_block(in_channels, mid_channels, 1, activation=activation)
        if kernel_size not in (3, 5):
            raise ValueError(f"LinearBottleneck: kernel_size must be 3 or 5, got {kernel_size}")
        self.conv2 = conv_block(mid_channels, mid_channels, kernel_size, stride=stride,
                                depthwise=True, activation=activation)
        if use_se:
            self.se_unit = SEUnit(mid_channels, squeeze_factor=4, squeeze_activation="relu",
                                  excite_activation="hsigmoid")
        self.conv3 = conv_block(mid_channels, out_channels, 1, activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.conv2(self.conv1(x))
        return self._finish(x, residual)

    def _finish(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Everything after ``conv2``: SE, ``conv3``, shortcut."""
        if self.use_se:
            x = self.se_unit(x)
        x = self.conv3(x)
        return x + residual if self.use_res_skip else x


_MID_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", HSwish: "hardswish"}


class BSConvSLinearBottleneck(LinearBottleneck):
    """:class:`LinearBottleneck` of the ``_bsconvs_p1d6`` variants.

    Same submodules and function. ``_reg_loss`` is the orthonormality penalty of the reduction
    ``conv3`` (``||W W^T - I||_F``, W = its [out, mid] weight), as in the reference. With the
    expansion BatchNorm in eval mode, ``conv1`` (1x1 conv, BN, activation) and the depthwise
    ``conv2.conv`` run as one fused BSConv-U op with the BN folded into its mid transform.
    """

    def _fused_expand_depthwise(self) -> Optional[str]:
        """The mid activation when the expansion + depthwise part can run fused, else None."""
        if _fx_symbolic_tracing():
            return None
        c1, c2 = self.conv1, self.conv2
        if type(c1) is not ConvBlock or type(c2) is not ConvBlock:
            return None  # replaced by the user
        if not (c1.use_bn and c1.use_activation) or _has_hooks(c1) or _has_hooks(c2):
            return None
        act = _MID_ACTIVATIONS.get(type(c1.activation))
        if act is None or _has_hooks(c1.activation):
            return None
        if not (_is_pointwise(c1.conv) and _is_foldable_bn(c1.bn) and _is_depthwise(c2.conv)):
            return None
        return act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self._fused_expand_depthwise()
        if act is None:
            return super().forward(x)
        residual = x
        c2, pw, dw = self.conv2, self.conv1.conv, self.conv2.conv
        scale, shift = (t.to(pw.weight.dtype) for t in _bn_affine(self.conv1.bn))
        x = functional.bsconv_u(
            x, pw.weight, dw.weight, dw.bias, stride=dw.stride, padding=dw.padding,
            dilation=dw.dilation, padding_mode=dw.padding_mode, mid_scale=scale,
            mid_shift=shift, mid_activation=act)
        if c2.use_bn:
            x = c2.bn(x)
        if c2.use_activation:
            x = c2.activation(x)
        return self._finish(x, residual)

    def _reg_loss(self) -> torch.Tensor:
        """``||W W^T - I||_F`` of the reduction weight W = ``conv3.conv.weight`` as [out, mid]
        (0-dim tensor); summed by ``model.reg_loss`` / :func:`bsconv_fused.orthonormal_loss`."""
        w = self.conv3.conv.weight.flatten(1)
        wwt = w @ w.t()
        eye = torch.eye(wwt.shape[0], device=wwt.device, dtype=wwt.dtype)
        return torch.linalg.matrix_norm(wwt - eye, ord="fro")


def _add_data_bn_and_init_conv(backbone: nn.Sequential, in_channels: int, channels: int,
                               stride: int, activation: str, use_data_batchnorm: bool) -> None:
    if use_data_batchnorm:
        backbone.add_module("data_bn", nn.BatchNorm2d(num_features=in_channels))
    backbone.add_module("init_conv", conv_block(in_channels, channels, 3, stride=stride,
                                                activation=activation))


class MobileNetV1(ZooModel):
    """MobileNetV1: ``data_bn``, 3x3 ``init_conv``, stages of depthwise separable blocks
    (stride ``strides[stage]`` in the first unit), global pooling, 1x1-conv classifier."""

    def __init__(self, num_classes: int, init_conv_channels: int, init_conv_stride: int,
                 channels: Sequence[Sequence[int]], strides: Sequence[int], in_channels: int = 3,
                 in_size: Tuple[int, int] = (224, 224), use_data_batchnorm: bool = True) -> None:
        super().__init__()
        self.use_data_batchnorm = use_data_batchnorm
        self.in_size = in_size
        backbone = nn.Sequential()
        _add_data_bn_and_init_conv(backbone, in_channels, init_conv_channels, init_conv_stride,
                                   "relu", use_data_batchnorm)
        current = init_conv_channels
        for stage_index, stage_channels in enumerate(channels):
            stage = nn.Sequential()
            for unit_index, unit_channels in enumerate(stage_channels):
                stride = strides[stage_index] if unit_index == 0 else 1
                stage.add_module(f"unit{unit_index + 1}",
                                 DepthwiseSeparableConvBlock(current, unit_channels, stride))
                current = unit_channels
            backbone.add_module(f"stage{stage_index + 1}", stage)
        backbone.add_module("global_pool", nn.AdaptiveAvgPool2d(output_size=1))
        self.backbone = backbone
        self.classifier = Classifier(current, num_classes)
        self.init_params()


class MobileNetV2(ZooModel):
    """MobileNetV2: ``data_bn``, ``init_conv``, stages of linear bottlenecks (ReLU6), 1x1
    ``final_conv``, global pooling, classifier. ``bsconv=True`` uses
    :class:`BSConvSLinearBottleneck` units."""

    def __init__(self, num_classes: int, init_conv_channels: int, init_conv_stride: int,
                 channels: Sequence[Sequence[int]], mid_channels: Sequence[Sequence[int]],
                 final_conv_channels: int, strides: Sequence[int], in_channels: int = 3,
                 in_size: Tuple[int, int] = (224, 224), use_data_batchnorm: bool = True,
                 bsconv: bool = False) -> None:
        super().__init__()
        self.use_data_batchnorm = use_data_batchnorm
        self.in_size = in_size
        unit_type = BSConvSLinearBottleneck if bsconv else LinearBottleneck
        backbone = nn.Sequential()
        _add_data_bn_and_init_conv(backbone, in_channels, init_conv_channels, init_conv_stride,
                                   "relu6", use_data_batchnorm)
        current = init_conv_channels
        for stage_index, stage_channels in enumerate(channels):
            stage = nn.Sequential()
            for unit_index, unit_channels in enumerate(stage_channels):
                stride = strides[stage_index] if unit_index == 0 else 1
                stage.add_module(f"unit{unit_index + 1}", unit_type(
                    current, mid_channels[stage_index][unit_index], unit_channels, stride))
                current = unit_channels
            backbone.add_module(f"stage{stage_index + 1}", stage)
        backbone.add_module("final_conv", conv_block(current, final_conv_channels, 1,
                                                     activation="relu6"))
        backbone.add_module("global_pool", nn.AdaptiveAvgPool2d(output_size=1))
        self.backbone = backbone
        self.classifier = Classifier(final_conv_channels, num_classes)
        self.init_params()


class MobileNetV3(ZooModel):
    """MobileNetV3: ``data_bn``, ``init_conv`` (h-swish), stages of linear bottlenecks (per-stage
    kernel size and activation, per-unit SE), ``final_conv1`` (+ ``final_se``), pooling,
    optional ``final_conv2`` and dropout, classifier. ``bsconv=True`` uses
    :class:`BSConvSLinearBottleneck` units."""

    def __init__(self, num_classes: int, init_conv_channels: int, init_conv_stride: int,
                 final_conv_channels: Sequence[int], final_conv_se: bool,
                 channels: Sequence[Sequence[int]], mid_channels: Sequence[Sequence[int]],
                 strides: Sequence[int], se_units: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[int], activations: Sequence[str],
                 dropout_rate: float = 0.0, in_channels: int = 3,
                 in_size: Tuple[int, int] = (224, 224), use_data_batchnorm: bool = True,
                 bsconv: bool = False) -> None:
        super().__init__()
        self.use_data_batchnorm = use_data_batchnorm
        self.in_size = in_size
        self.dropout_rate = dropout_rate
        unit_type = BSConvSLinearBottleneck if bsconv else LinearBottleneck
        backbone = nn.Sequential()
        _add_data_bn_and_init_conv(backbone, in_channels, init_conv_channels, init_conv_stride,
                                   "hswish", use_data_batchnorm)
        current = init_conv_channels
        for stage_index, stage_channels in enumerate(channels):
            stage = nn.Sequential()
            for unit_index, unit_channels in enumerate(stage_channels):
                stage.add_module(f"unit{unit_index + 1}", unit_type(
                    current, mid_channels[stage_index][unit_index], unit_channels,
                    strides[stage_index] if unit_index == 0 else 1,
                    activation=activations[stage_index], kernel_size=kernel_sizes[stage_index],
                    use_se=se_units[stage_index][unit_index] == 1))
                current = unit_channels
            backbone.add_module(f"stage{stage_index + 1}", stage)
        backbone.add_module("final_conv1", conv_block(current, final_conv_channels[0], 1,
                                                      activation="hswish"))
        current = final_conv_channels[0]
        if final_conv_se:
            backbone.add_module("final_se", SEUnit(current, squeeze_factor=4,
                                                   squeeze_activation="relu",
                                                   excite_activation="hsigmoid"))
        backbone.add_module("final_pool", nn.AdaptiveAvgPool2d(output_size=1))
        if len(final_conv_channels) > 1:
            backbone.add_module("final_conv2", conv_block(current, final_conv_channels[1], 1,
                                                          activation="hswish", use_bn=False))
            current = final_conv_channels[1]
        if dropout_rate != 0.0:
            backbone.add_module("final_dropout", nn.Dropout(dropout_rate))
        self.backbone = backbone
        self.classifier = Classifier(current, num_classes)
        self.init_params()


def _scale(channels: Sequence[Sequence[int]], width_multiplier: float) -> List[List[int]]:
    return [[int(c * width_multiplier) for c in stage] for stage in channels]


def build_mobilenet_v1(num_classes: int, width_multiplier: float = 1.0,
                       cifar: bool = False) -> MobileNetV1:
    """Plain MobileNetV1 (CIFAR: stride-1 stem and first two stages)."""
    init_conv_channels = 32
    channels: List[List[int]] = [[64], [128, 128], [256, 256], [512] * 6, [1024, 1024]]
    if width_multiplier != 1.0:
        channels = _scale(channels, width_multiplier)
        init_conv_channels = int(init_conv_channels * width_multiplier)
    return MobileNetV1(num_classes=num_classes, init_conv_channels=init_conv_channels,
                       init_conv_stride=1 if cifar else 2, channels=channels,
                       strides=[1, 1, 2, 2, 2] if cifar else [1, 2, 2, 2, 2],
                       in_size=(32, 32) if cifar else (224, 224))


def build_mobilenet_v2(num_classes: int, width_multiplier: float = 1.0, cifar: bool = False,
                       bsconv: bool = False) -> MobileNetV2:
    """MobileNetV2 (the 1280-channel final conv only grows, never shrinks, with the width)."""
    init_conv_channels = 32
    channels: List[List[int]] = [[16], [24, 24], [32, 32, 32], [64, 64, 64, 64, 96, 96, 96],
                                 [160, 160, 160, 320]]
    mid_channels: List[List[int]] = [[32], [96, 144], [144, 192, 192],
                                     [192, 384, 384, 384, 384, 576, 576], [576, 960, 960, 960]]
    final_conv_channels = 1280
    if width_multiplier != 1.0:
        init_conv_channels = int(init_conv_channels * width_multiplier)
        channels = _scale(channels, width_multiplier)
        mid_channels = _scale(mid_channels, width_multiplier)
        if width_multiplier > 1.0:
            final_conv_channels = int(final_conv_channels * width_multiplier)
    return MobileNetV2(num_classes=num_classes, init_conv_channels=init_conv_channels,
                       init_conv_stride=1 if cifar else 2, channels=channels,
                       mid_channels=mid_channels, final_conv_channels=final_conv_channels,
                       strides=[1, 1, 2, 2, 2] if cifar else [1, 2, 2, 2, 2],
                       in_size=(32, 32) if cifar else (224, 224), bsconv=bsconv)


_V3_SPECS = {
    # channels, mid channels, strides, kernel sizes, activations, SE flags, final convs, final SE
    "small": (
        [[16], [24, 24], [40, 40, 40, 48, 48], [96, 96, 96]],
        [[16], [72, 88], [96, 240, 240, 120, 144], [288, 576, 576]],
        [2, 2, 2, 2], [3, 3, 5, 5], ["relu", "relu", "hswish", "hswish"],
        [[1], [0, 0], [1, 1, 1, 1, 1], [1, 1, 1]], (576, 1024), True),
    "large": (
        [[16], [24, 24], [40, 40, 40], [80, 80, 80, 80, 112, 112], [160, 160, 160]],
        [[16], [64, 72], [72, 120, 120], [240, 200, 184, 184, 480, 672], [672, 960, 960]],
        [1, 2, 2, 2, 2], [3, 3, 5, 3, 5], ["relu", "relu", "relu", "hswish", "hswish"],
        [[0], [0, 0], [1, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 1]], (960, 1280), False),
}


def build_mobilenet_v3(num_classes: int, version: str, width_multiplier: float = 1.0,
                       cifar: bool = False, use_lightweight_head: bool = True,
                       bsconv: bool = False) -> MobileNetV3:
    """MobileNetV3-small / -large (``version``); the lightweight head (the default) drops the
    last 1x1 conv. CIFAR: stride-1 stem and one stride-2 stage less."""
    if version not in _V3_SPECS:
        raise ValueError(f"MobileNetV3 version must be 'small' or 'large', got {version!r}")
    channels, mid_channels, strides, kernel_sizes, activations, se_units, final, final_se = \
        _V3_SPECS[version]
    final_conv_channels = [final[0]] if use_lightweight_head else list(final)
    init_conv_channels = 16
    if cifar:
        strides = [1, 2, 2, 2] if version == "small" else [1, 1, 2, 2, 2]
    if width_multiplier != 1.0:
        channels = _scale(channels, width_multiplier)
        mid_channels = _scale(mid_channels, width_multiplier)
        init_conv_channels = int(init_conv_channels * width_multiplier)
        if width_multiplier > 1.0:
            final_conv_channels[0] = int(final_conv_channels[0] * width_multiplier)
    return MobileNetV3(num_classes=num_classes, init_conv_channels=init_conv_channels,
                       init_conv_stride=1 if cifar else 2,
                       final_conv_channels=final_conv_channels, final_conv_se=final_se,
                       channels=channels, mid_channels=mid_channels, strides=strides,
                       se_units=se_units, kernel_sizes=kernel_sizes, activations=activations,
                       dropout_rate=0.0, in_size=(32, 32) if cifar else (224, 224),
                       bsconv=bsconv)


def to_bsconvu_mobilenet_v1(model: nn.Module) -> nn.Module:
    """Replaces every :class:`DepthwiseSeparableConvBlock` (in place) by
    ``nn.Sequential(BSConvU(in, out, 3x3, stride), BatchNorm2d(out), ReLU)``: the BSConv-U
    MobileNetV1 of the paper (Sect. 4.1)."""

    def transform(module: nn.Module, name: str) -> Optional[nn.Module]:
        if not isinstance(module, DepthwiseSeparableConvBlock):
            return None
        dw, pw = module.conv_dw.conv, module.conv_pw.conv
        return nn.Sequential(
            BSConvU(dw.in_channels, pw.out_channels, kernel_size=dw.kernel_size,
                    stride=dw.stride, padding=dw.padding, dilation=dw.dilation,
                    bias=dw.bias is not None, padding_mode=dw.padding_mode, with_bn=False),
            nn.BatchNorm2d(num_features=pw.out_channels),
            nn.ReLU(inplace=True))

    return replace_modules(model, transform)


def get_mobilenet(architecture: str, num_classes: int) -> nn.Module:
    """MobileNet from a (lower-case) name: ``[cifar_]mobilenet{v1,v2,v3_small,v3_large}_wN[dD]``
    with width multiplier N / D, optionally ``_bsconvu`` (V1 only) or ``_bsconvs_p1d6`` (V2, V3
    only), e.g. ``mobilenetv1_w3d4_bsconvu``, ``cifar_mobilenetv3_small_w1_bsconvs_p1d6``."""
    match = ARCHITECTURE_PATTERN.match(architecture)
    if match is None:
        raise ValueError(f"Model architecture '{architecture}' is not supported")
    cifar = match.group("cifar") is not None
    version = match.group("version")
    variant = match.group("bsconv")
    width_multiplier = float(match.group("width_num"))
    if match.group("width_den") is not None:
        denominator = float(match.group("width_den"))
        if denominator == 0.0:
            raise ValueError(f"Model architecture '{architecture}' is not supported: the width "
                             "multiplier wNdD has D = 0")
        width_multiplier /= denominator
    if variant == "bsconvu" and version != "v1":
        raise ValueError(f"Model architecture '{architecture}' is not supported: BSConv-U "
                         "('_bsconvu') is defined for MobileNetV1 only, MobileNetV2/V3 take "
                         "'_bsconvs_p1d6'")
    if variant == "bsconvs_p1d6" and version == "v1":
        raise ValueError(f"Model architecture '{architecture}' is not supported: BSConv-S "
                         "('_bsconvs_p1d6') is defined for MobileNetV2/V3 only, MobileNetV1 "
                         "takes '_bsconvu'")
    bsconv = variant == "bsconvs_p1d6"
    model: nn.Module
    if version == "v1":
        model = build_mobilenet_v1(num_classes, width_multiplier, cifar=cifar)
        if variant == "bsconvu":
            model = to_bsconvu_mobilenet_v1(model)
    elif version == "v2":
        model = build_mobilenet_v2(num_classes, width_multiplier, cifar=cifar, bsconv=bsconv)
    else:
        model = build_mobilenet_v3(num_classes, version[3:], width_multiplier, cifar=cifar,
                                   bsconv=bsconv)
    return model
