"""Exporting models with fused BSConv ops: standard convolutions for ONNX and other exporters.

``torch.export.export`` keeps the fused op as one node, ``bsconv_fused::forward`` (it has a fake
kernel, so it traces with symbolic shapes); that is what AOTInductor and other PyTorch runtimes
that load this extension want. Runtimes that know only standard operators (ONNX, ...) need the op
decomposed into the convolutions it stands for. Two ways, both exact (the decomposition is the
reference composition ``bsconv_fused.reference``, the oracle of the test suite):

* :func:`decompose` rewrites an ``ExportedProgram``: every ``bsconv_fused::forward`` node becomes
  ``conv2d`` (projection) -> ``mul`` / ``add`` / activation (mid transform) -> [``pad``] ->
  depthwise ``conv2d``; nothing else in the program changes.
* :func:`export_onnx` calls ``torch.onnx.export`` with the model running on the reference path
  (``bsconv_fused.use_reference()``), so both the dynamo-based exporter (the default) and the
  legacy TorchScript one (``dynamo=False``) only see standard ops; an ``ExportedProgram`` is
  decomposed first.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from . import reference
from ._args import ACTIVATIONS, PADDING_MODES, ConvOptions
from ._extension import use_reference

__all__ = ["decompose", "decomposition_table", "export_onnx"]


def _forward_decomposition(
    x: torch.Tensor, pw1_weight: torch.Tensor, pw2_weight: Optional[torch.Tensor],
    dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor], mid_scale: Optional[torch.Tensor],
    mid_shift: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], padding_mode: int, activation: int,
) -> torch.Tensor:
    """``bsconv_fused::forward`` in standard ops (same arguments as the op)."""
    opts = ConvOptions(tuple(stride), tuple(padding), tuple(dilation),
                       PADDING_MODES[padding_mode], ACTIVATIONS[activation])
    pws = [pw1_weight] if pw2_weight is None else [pw1_weight, pw2_weight]
    return reference._bsconv(x, pws, dw_weight, dw_bias, opts, mid_scale, mid_shift)


def decomposition_table() -> Dict[Any, Callable[..., torch.Tensor]]:
    """``{torch.ops.bsconv_fused.forward.default: decomposition}`` for
    ``ExportedProgram.run_decompositions`` (merge it into another table to decompose more)."""
    return {torch.ops.bsconv_fused.forward.default: _forward_decomposition}


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with every fused BSConv op replaced by standard convolutions (other ops kept)."""
    return ep.run_decompositions(decomposition_table())


def export_onnx(
    model: Union[torch.nn.Module, torch.export.ExportedProgram],
    args: Tuple[Any, ...] = (),
    f: Optional[Union[str, os.PathLike]] = None,
    **kwargs: Any,
) -> Any:
    """``torch.onnx.export`` for models with fused BSConv modules.

    Same arguments and return value as ``torch.onnx.export`` (``dynamo=True`` by default in
    torch 2.14, returning an ``ONNXProgram``; ``dynamo=False`` writes ``f`` and returns None).
    The exported graph uses standard ONNX operators (Conv, Mul, Add, Relu / Clip / HardSwish,
    Pad) that every runtime executes.
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = decompose(model)
    kwargs.setdefault("verbose", False)  # no progress lines from the dynamo exporter
    with use_reference(), warnings.catch_warnings():
        # The TorchScript tracer (dynamo=False) flags the argument checks on (static) shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                module=r"bsconv_fused\._args")
        return torch.onnx.export(model, args, f, **kwargs)
