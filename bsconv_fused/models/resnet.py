"""ResNets, pre-activation ResNets and WideResNets (ImageNet and CIFAR) with BSConv variants.

Same architectures, names and parsing as the authors' ``bsconv.pytorch.resnet`` (bsconv 0.4.0);
the ``_bsconvu`` / ``_bsconvs_pXdY`` variants replace every 3x3 convolution (``groups == 1``) by
the fused :class:`~bsconv_fused.BSConvU` (no BatchNorm) / :class:`~bsconv_fused.BSConvS` (with
BatchNorm after each projection, ``p = X / Y``), as the authors' replacers do.
"""

from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..convert import convert
from .common import Classifier, ZooModel, conv_block

__all__ = ["ResNet", "build_resnet", "get_resnet"]

# Units per stage, by base name (pre-activation variants share the entries).
UNITS_PER_STAGE = {
    "resnet10": (1, 1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet26": (3, 3, 3, 3),
    "resnet34": (3, 4, 6, 3),
    "resnet68": (3, 4, 23, 3),
    "resnet102": (3, 8, 36, 3),
    "cifar_resnet20": (3, 3, 3),
    "cifar_resnet56": (9, 9, 9),
    "cifar_resnet110": (18, 18, 18),
    "cifar_resnet302": (50, 50, 50),
    "cifar_resnet602": (100, 100, 100),
    "cifar_wrn16": (2, 2, 2),
    "cifar_wrn28": (4, 4, 4),
    "cifar_wrn40": (6, 6, 6),
}

ARCHITECTURE_PATTERN = re.compile(
    r"^(?P<base>(pre)?resnet[0-9]+|cifar_(pre)?resnet[0-9]+|cifar_wrn[0-9]+_[0-9]+)"
    r"(_(?P<bsconv>bsconvu|bsconvs_p(?P<p_num>[0-9]+)d(?P<p_den>[0-9]+)))?$")


class InitUnitLarge(nn.Module):
    """ImageNet stem: 7x7 stride-2 convolution block, 3x3 stride-2 max pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_block(in_channels, out_channels, 7, stride=2)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


class InitUnitSmall(nn.Module):
    """CIFAR stem: one 3x3 convolution (plain conv for pre-activation nets, else conv-BN-ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, preact: bool = False) -> None:
        super().__init__()
        self.conv = conv_block(in_channels, out_channels, 3, use_bn=not preact,
                               activation=None if preact else "relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PostActivation(nn.Module):
    """BN-ReLU after the last pre-activation unit."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features=channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(x))


class StandardUnit(nn.Module):
    """Basic residual unit: conv3x3-BN-ReLU, conv3x3-BN, (+ projected) shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.use_projection = in_channels != out_channels or stride != 1
        self.conv1 = conv_block(in_channels, out_channels, 3, stride=stride)
        self.conv2 = conv_block(out_channels, out_channels, 3, activation=None)
        if self.use_projection:
            self.projection = conv_block(in_channels, out_channels, 1, stride=stride,
                                         activation=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.projection(x) if self.use_projection else x
        return self.relu(self.conv2(self.conv1(x)) + residual)


class PreactUnit(nn.Module):
    """Pre-activation unit: BN-ReLU, conv3x3-BN-ReLU, conv3x3, (+ projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.use_projection = in_channels != out_channels or stride != 1
        self.bn = nn.BatchNorm2d(num_features=in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv_block(in_channels, out_channels, 3, stride=stride)
        self.conv2 = conv_block(out_channels, out_channels, 3, use_bn=False, activation=None)
        if self.use_projection:
            self.projection = conv_block(in_channels, out_channels, 1, stride=stride,
                                         use_bn=False, activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_projection:
            x = self.relu(self.bn(x))
            residual = self.projection(x)
        else:
            residual = x
            x = self.relu(self.bn(x))
        return self.conv2(self.conv1(x)) + residual


class ResNet(ZooModel):
    """ResNet backbone (``data_bn``, ``init_unit``, ``stage1..``, optional ``final_activation``,
    ``global_pool``) and a 1x1-conv classifier.

    Args:
        channels: output channels of every unit, per stage (first unit of stages > 1 strides 2).
        num_classes: classifier outputs.
        preact: pre-activation units (and a final BN-ReLU) instead of standard units.
        init_unit_channels: stem output channels.
        use_init_unit_large: ImageNet stem (7x7/2 conv + max pool) instead of the CIFAR 3x3 stem.
        in_channels, in_size: input channels and nominal input size.
        use_data_batchnorm: BatchNorm on the input.
    """

    def __init__(self, channels: Sequence[Sequence[int]], num_classes: int, preact: bool = False,
                 init_unit_channels: int = 64, use_init_unit_large: bool = True,
                 in_channels: int = 3, in_size: Tuple[int, int] = (224, 224),
                 use_data_batchnorm: bool = True) -> None:
        super().__init__()
        self.use_data_batchnorm = use_data_batchnorm
        self.use_init_unit_large = use_init_unit_large
        self.in_size = in_size

        backbone = nn.Sequential()
        if use_data_batchnorm:
            backbone.add_module("data_bn", nn.BatchNorm2d(num_features=in_channels))
        if use_init_unit_large:
            backbone.add_module("init_unit", InitUnitLarge(in_channels, init_unit_channels))
        else:
            backbone.add_module("init_unit",
                                InitUnitSmall(in_channels, init_unit_channels, preact=preact))
        unit_type = PreactUnit if preact else StandardUnit
        current = init_unit_channels
        for stage_index, stage_channels in enumerate(channels):
            stage = nn.Sequential()
            for unit_index, unit_channels in enumerate(stage_channels):
                stride = 2 if unit_index == 0 and stage_index > 0 else 1
                stage.add_module(f"unit{unit_index + 1}",
                                 unit_type(current, unit_channels, stride))
                current = unit_channels
            backbone.add_module(f"stage{stage_index + 1}", stage)
        if preact:
            backbone.add_module("final_activation", PostActivation(current))
        backbone.add_module("global_pool", nn.AdaptiveAvgPool2d(output_size=1))
        self.backbone = backbone
        self.classifier = Classifier(current, num_classes)
        self.init_params()


def build_resnet(num_classes: int, units_per_stage: Sequence[int], width_multiplier: float = 1.0,
                 preact: bool = False, cifar: bool = False) -> ResNet:
    """Plain (pre-activation) ResNet: CIFAR (stem 16 channels, stages 16/32/64 times
    ``width_multiplier``) or ImageNet (stem 64, stages 64/128/256/512 times the multiplier)."""
    base: List[int] = [16, 32, 64] if cifar else [64, 128, 256, 512]
    channels = [[int(c * width_multiplier)] * units for c, units in zip(base, units_per_stage)]
    return ResNet(channels=channels, num_classes=num_classes, preact=preact,
                  init_unit_channels=16 if cifar else 64, use_init_unit_large=not cifar,
                  in_size=(32, 32) if cifar else (224, 224))


def get_resnet(architecture: str, num_classes: int) -> nn.Module:
    """ResNet from a (lower-case) name such as ``resnet18``, ``preresnet34_bsconvu``,
    ``cifar_resnet110_bsconvs_p1d4``, ``cifar_preresnet56`` or ``cifar_wrn28_10_bsconvu``
    (WideResNets are pre-activation nets; ``cifar_wrnD_W``: depth D in 16, 28, 40, width W)."""
    match = ARCHITECTURE_PATTERN.match(architecture)
    if match is None:
        raise ValueError(f"Model architecture '{architecture}' is not supported")
    base = match.group("base")
    if base.startswith("cifar_wrn"):
        _, depth, width = base.split("_")
        key, width_multiplier = f"cifar_{depth}", float(width)
    else:
        key, width_multiplier = base.replace("preresnet", "resnet"), 1.0
    if key not in UNITS_PER_STAGE:
        raise ValueError(f"Model architecture '{architecture}' is not supported: unknown depth "
                         f"'{key}' (known: {', '.join(UNITS_PER_STAGE)})")
    p = None
    if match.group("p_num") is not None:
        denominator = float(match.group("p_den"))
        if denominator == 0.0:
            raise ValueError(f"Model architecture '{architecture}' is not supported: the "
                             "BSConv-S fraction pXdY has Y = 0")
        p = float(match.group("p_num")) / denominator
        if not p <= 1.0:
            raise ValueError(f"Model architecture '{architecture}' is not supported: the "
                             f"BSConv-S fraction p = {p} is larger than 1")

    model: nn.Module = build_resnet(
        num_classes=num_classes, units_per_stage=UNITS_PER_STAGE[key],
        width_multiplier=width_multiplier, preact="preresnet" in base or "wrn" in base,
        cifar=base.startswith("cifar_"))
    variant = match.group("bsconv")
    if variant == "bsconvu":
        model, _ = convert(model, "u", kernel_sizes=(3, 5), with_bn=False, inplace=True)
    elif variant is not None:
        model, _ = convert(model, "s", kernel_sizes=(3, 5), p=p, with_bn=True, inplace=True)
    return model
