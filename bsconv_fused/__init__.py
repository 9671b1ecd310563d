"""bsconv-fused: fused Blueprint Separable Convolutions (BSConv-U / BSConv-S) for PyTorch."""

from . import analysis, decompose, export, functional, models, reference
from ._extension import extension_available, extension_error, use_reference
from .convert import convert
from .fuse import FusedPointwiseDepthwise, FuseReport, fuse
from .modules import BSConvS, BSConvU, orthonormal_loss
from .profile import profile

__all__ = [
    "BSConvS",
    "BSConvU",
    "FuseReport",
    "FusedPointwiseDepthwise",
    "analysis",
    "convert",
    "decompose",
    "extension_available",
    "export",
    "extension_error",
    "functional",
    "fuse",
    "models",
    "orthonormal_loss",
    "profile",
    "reference",
    "use_reference",
]
__version__ = "0.1.0"
