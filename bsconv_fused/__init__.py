"""bsconv-fused: fused Blueprint Separable Convolutions (BSConv-U / BSConv-S) for PyTorch."""

from . import functional, reference
from ._extension import extension_available, extension_error, use_reference
from .modules import BSConvS, BSConvU, orthonormal_loss

__all__ = [
    "BSConvS",
    "BSConvU",
    "extension_available",
    "extension_error",
    "functional",
    "orthonormal_loss",
    "reference",
    "use_reference",
]
__version__ = "0.1.0"
