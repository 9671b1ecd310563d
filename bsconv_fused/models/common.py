"""Building blocks shared by the model zoo.

Class names, attribute names, registration order and constructor arguments follow the authors'
``bsconv.pytorch.common`` (bsconv 0.4.0), so the zoo models have the same ``repr``, the same
``state_dict`` keys and, for the same seed, the same initial weights as the reference models.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import orthonormal_loss

__all__ = [
    "Classifier", "ConvBlock", "HSigmoid", "HSwish", "SEUnit", "Swish", "ZooModel",
    "get_activation",
]


class Swish(nn.Module):
    """``x * sigmoid(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class HSwish(nn.Module):
    """Hard swish, ``x * relu6(x + 3) / 6`` (MobileNetV3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class HSigmoid(nn.Module):
    """Hard sigmoid, ``relu6(x + 3) / 6`` (MobileNetV3 squeeze-and-excitation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


def get_activation(name: str) -> nn.Module:
    """Activation module by name: relu, relu6, swish, hswish, sigmoid, hsigmoid."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "swish":
        return Swish()
    if name == "hswish":
        return HSwish()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "hsigmoid":
        return HSigmoid()
    raise ValueError(f"unknown activation {name!r}")


class ConvBlock(nn.Module):
    """``conv`` -> optional ``bn`` (BatchNorm2d) -> optional ``activation``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: int,
        padding: int,
        groups: int = 1,
        bias: bool = False,
        use_bn: bool = True,
        activation: Optional[str] = "relu",
    ) -> None:
        super().__init__()
        self.use_bn = use_bn
        self.use_activation = activation is not None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                              padding=padding, groups=groups, bias=bias)
        if use_bn:
            self.bn = nn.BatchNorm2d(num_features=out_channels)
        if activation is not None:
            self.activation = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.use_bn:
            x = self.bn(x)
        if self.use_activation:
            x = self.activation(x)
        return x


def conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
               depthwise: bool = False, use_bn: bool = True,
               activation: Optional[str] = "relu", bias: bool = False) -> ConvBlock:
    """A :class:`ConvBlock` with ``padding = kernel_size // 2`` (depthwise: groups = channels)."""
    return ConvBlock(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                     groups=in_channels if depthwise else 1, bias=bias, use_bn=use_bn,
                     activation=activation)


def conv1x1(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    """Plain 1x1 convolution."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=bias)


class SEUnit(nn.Module):
    """Squeeze-and-excitation: ``x * act2(conv2(act1(conv1(avgpool(x)))))``."""

    def __init__(self, channels: int, squeeze_factor: int = 16, squeeze_activation: str = "relu",
                 excite_activation: str = "sigmoid") -> None:
        super().__init__()
        squeeze_channels = channels // squeeze_factor
        self.pool = nn.AdaptiveAvgPool2d(output_size=1)
        self.conv1 = conv1x1(channels, squeeze_channels, bias=True)
        self.activation1 = get_activation(squeeze_activation)
        self.conv2 = conv1x1(squeeze_channels, channels, bias=True)
        self.activation2 = get_activation(excite_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.activation2(self.conv2(self.activation1(self.conv1(self.pool(x)))))
        return x * s


class Classifier(nn.Module):
    """1x1 convolution with bias on the pooled features, flattened to [B, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x.view(x.size(0), -1)

    def init_params(self) -> None:
        nn.init.xavier_normal_(self.conv.weight, gain=1.0)


class ZooModel(nn.Module):
    """Base of the zoo models: ``backbone`` (an ``nn.Sequential``) then ``classifier``.

    Input [B, 3, H, W] -> logits [B, num_classes]. ``in_size`` is the nominal input size
    (224 x 224 for ImageNet models, 32 x 32 for CIFAR models); other sizes work too.
    """

    backbone: nn.Sequential
    classifier: Classifier

    def init_params(self) -> None:
        """The reference initialization: Kaiming-uniform backbone convolutions with zero biases,
        Xavier-normal classifier weight."""
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.classifier.init_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def reg_loss(self, alpha: float = 0.1) -> torch.Tensor:
        """Orthonormal regularization of the BSConv-S blocks, ``alpha * sum ||W1 W1^T - I||_F``
        (zero for models without BSConv-S), as the ``reg_loss`` the authors' BSConv-S replacers
        attach to their models. Add it to the task loss."""
        return orthonormal_loss(self, alpha=alpha)
