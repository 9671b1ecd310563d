"""Model zoo: the authors' BSConv architectures built on the fused modules.

``get_model(architecture, num_classes=...)`` accepts every name ``bsconv.pytorch.get_model``
(bsconv 0.4.0) accepts, parsed the same way, and returns a model with the same structure, the same
parameter count and the same ``state_dict`` keys (reference weights load with ``strict=True`` and
give the same outputs). Where the reference uses its ``BSConvU`` / ``BSConvS`` modules these
models use the fused :class:`bsconv_fused.BSConvU` / :class:`bsconv_fused.BSConvS`. With the same
``torch.manual_seed`` they are even initialized to the same weights.

Names (case-insensitive):

* ResNets: ``[cifar_][pre]resnetD`` with D in 10, 18, 26, 34, 68, 102 (ImageNet) or 20, 56, 110,
  302, 602 (``cifar_``), and WideResNets ``cifar_wrnD_W`` (pre-activation, D in 16, 28, 40, any
  integer width W); optionally ``_bsconvu`` (every 3x3 conv becomes a BSConv-U) or
  ``_bsconvs_pXdY`` (BSConv-S with p = X / Y and BatchNorm after the projections).
* MobileNets: ``[cifar_]mobilenet{v1,v2,v3_small,v3_large}_wN[dD]`` (width multiplier N / D);
  optionally ``_bsconvu`` (V1 only) or ``_bsconvs_p1d6`` (V2 and V3 only).

Models with BSConv-S have ``model.reg_loss(alpha=0.1)``, the orthonormal regularization to add to
the training loss (it is zero for the other models).
"""

from __future__ import annotations

from typing import List

from torch import nn

from .common import ZooModel
from .mobilenet import MobileNetV1, MobileNetV2, MobileNetV3, get_mobilenet
from .resnet import UNITS_PER_STAGE, ResNet, get_resnet

__all__ = ["MobileNetV1", "MobileNetV2", "MobileNetV3", "ResNet", "ZooModel", "get_model",
           "list_models"]


def get_model(architecture: str, *, num_classes: int) -> nn.Module:
    """Builds the model named ``architecture`` with ``num_classes`` outputs.

    Input [B, 3, H, W] (nominally 224 x 224, 32 x 32 for ``cifar_`` models) -> logits
    [B, num_classes]. See the module docstring for the names.

    Raises:
        ValueError: the name is not supported (the message says why).
        TypeError: ``architecture`` is not a string.
    """
    if not isinstance(architecture, str):
        raise TypeError(f"get_model: architecture must be a str, got {architecture!r}")
    name = architecture.lower()
    if "mobilenet" in name:
        return get_mobilenet(name, num_classes=num_classes)
    if "resnet" in name or "wrn" in name:
        return get_resnet(name, num_classes=num_classes)
    raise ValueError(f"Model architecture '{name}' is not supported: expected a ResNet, "
                     "pre-activation ResNet, WideResNet or MobileNet name")


def list_models() -> List[str]:
    """Representative architecture names (sorted): every family with and without its BSConv
    variants. Not exhaustive: widths ``wN[dD]`` / ``_W`` and fractions ``pXdY`` are open-ended."""
    names = []
    for key in UNITS_PER_STAGE:
        if key.startswith("cifar_wrn"):
            bases = [f"{key}_{width}" for width in (1, 2, 4, 8, 10)]
        else:
            bases = [key, key.replace("resnet", "preresnet")]
        for base in bases:
            names += [base, f"{base}_bsconvu", f"{base}_bsconvs_p1d4"]
    for prefix in ("", "cifar_"):
        for version, widths in (("v1", ("w1", "w3d4", "w1d2", "w1d4")),
                                ("v2", ("w1", "w3d4", "w1d2", "w1d4")),
                                ("v3_small", ("w1", "w3d4", "w1d2", "w7d20")),
                                ("v3_large", ("w1", "w3d4", "w1d2", "w7d20"))):
            suffix = "_bsconvu" if version == "v1" else "_bsconvs_p1d6"
            for width in widths:
                base = f"{prefix}mobilenet{version}_{width}"
                names += [base, base + suffix]
    return sorted(names)
