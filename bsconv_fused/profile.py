"""Parameter and multiply-accumulate (MAC) counts per layer.

:func:`profile` runs one forward pass on a zero input with forward hooks on the leaf modules and
returns a :class:`ProfileResult` (rows + totals, printable as a table).

BSConv blocks (this package's fused :class:`~bsconv_fused.BSConvU` / :class:`~bsconv_fused.BSConvS`
and the authors' ``bsconv.pytorch`` ones) are profiled as one row each, hooked on the block itself:
the fused forward never calls the block's children. Their MACs are those of the computation they
stand for, pointwise projection(s) on every input pixel plus the depthwise convolution on every
output pixel::

    BSConv-U:  B*H*W * M*N          + B*Ho*Wo * N*Kh*Kw
    BSConv-S:  B*H*W * (M*M' + M'*N) + B*Ho*Wo * N*Kh*Kw

MACs count the multiplications of convolution and linear weights only (what papers report as
"MACs" or "multiply-adds"). The authors' ``bsconv.pytorch.ModelProfiler`` reports "FLOPs" that are
these MACs plus one operation per bias add, per ReLU output and per pooled input, and two per
BatchNorm input (one without affine parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .modules import BSConvS, BSConvU

__all__ = ["ProfileResult", "ProfileRow", "profile"]

try:  # the authors' package is optional
    from bsconv.pytorch.modules import BSConvS as _RefBSConvS
    from bsconv.pytorch.modules import BSConvU as _RefBSConvU

    _BLOCK_TYPES: Tuple[type, ...] = (BSConvU, BSConvS, _RefBSConvU, _RefBSConvS)
except ImportError:  # pragma: no cover  (bsconv not installed)
    _BLOCK_TYPES = (BSConvU, BSConvS)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Leaf modules whose parameters do no multiply-accumulate with the input (or only elementwise).
_NO_MAC_TYPES: Tuple[type, ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    nn.Embedding, nn.EmbeddingBag, nn.PReLU)
if hasattr(nn, "RMSNorm"):
    _NO_MAC_TYPES += (nn.RMSNorm,)


@dataclass
class ProfileRow:
    """One profiled module (a leaf module or a whole BSConv block).

    Attributes:
        name: qualified module name (``""`` if the model itself is a leaf).
        type: class name, ``bsconv.`` prefixed for modules of the authors' package.
        info: kernel / stride summary (``"3x3 s2 DW"``, ``"BSConv-S 3x3 s1 M'=16"``, ...).
        in_shape, out_shape: shapes at the first call (None if the module was not called or
            its input / output is not a tensor).
        params: parameters of the module (its own and its children's).
        macs: multiply-accumulates, summed over all calls.
        calls: how often the module ran in the forward pass.
    """

    name: str
    type: str
    info: str
    in_shape: Optional[Tuple[int, ...]]
    out_shape: Optional[Tuple[int, ...]]
    params: int
    macs: int
    calls: int


@dataclass
class ProfileResult:
    """Result of :func:`profile`.

    Attributes:
        rows: one :class:`ProfileRow` per leaf module / BSConv block, in registration order.
        total_params: parameters of the model (each shared parameter once; equals the sum over
            ``rows`` unless parameters are shared).
        total_macs: sum of ``macs`` over ``rows``.
        input_size: shape of the input that was run.
        uncounted: names of modules with weights whose MACs are not counted (no rule for their
            type, e.g. recurrent or attention layers); empty for convolutional networks.
    """

    rows: List[ProfileRow]
    total_params: int
    total_macs: int
    input_size: Tuple[int, ...]
    uncounted: List[str] = field(default_factory=list)

    def row(self, name: str) -> ProfileRow:
        """The row of the module called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        def shape(s: Optional[Tuple[int, ...]]) -> str:
            return "-" if s is None else "x".join(map(str, s))

        header = ("Module", "Type", "Info", "In shape", "Out shape", "Params", "MACs")
        rows = [header] + [
            (r.name or "(model)", r.type, r.info, shape(r.in_shape), shape(r.out_shape),
             f"{r.params:,}", f"{r.macs:,}") for r in self.rows]
        rows.append(("(total)", "", "", shape(self.input_size), "", f"{self.total_params:,}",
                     f"{self.total_macs:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

        def line(r: Sequence[str], numbers_right: bool) -> str:
            cells = [c.rjust(w) if numbers_right and i >= 5 else c.ljust(w)
                     for i, (c, w) in enumerate(zip(r, widths))]
            return "| " + " | ".join(cells) + " |"

        out = [rule, line(rows[0], False), rule]
        out += [line(r, True) for r in rows[1:-1]]
        out += [rule, line(rows[-1], True), rule]
        out.append(f"{self.total_params / 1e6:.3f} M parameters, "
                   f"{self.total_macs / 1e6:.3f} M MACs for input {shape(self.input_size)}")
        if self.uncounted:
            out.append("MACs not counted for: " + ", ".join(self.uncounted))
        return "\n".join(out)


def _type_name(module: nn.Module) -> str:
    t = type(module)
    return ("bsconv." if t.__module__.startswith("bsconv.") else "") + t.__name__


def _pair_str(v: Any, square: bool = True) -> str:
    """``(3, 3) -> "3x3"``; with ``square=False`` equal entries collapse: ``(2, 2) -> "2"``."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not square and len(set(v)) == 1:
        return str(v[0])
    return "x".join(map(str, v))


def _info(module: nn.Module) -> str:
    if isinstance(module, _BLOCK_TYPES):
        dw = module._modules.get("dw")
        if not isinstance(dw, nn.Conv2d):
            return "BSConv"
        kind = "BSConv-S" if "pw1" in module._modules else "BSConv-U"
        text = f"{kind} {_pair_str(dw.kernel_size)} s{_pair_str(dw.stride, square=False)}"
        pw1 = module._modules.get("pw1")
        if isinstance(pw1, nn.Conv2d):
            text += f" M'={pw1.out_channels}"
        return text
    if isinstance(module, _CONVS + _TRANSPOSED_CONVS):
        text = f"{_pair_str(module.kernel_size)} s{_pair_str(module.stride, square=False)}"
        if isinstance(module, _CONVS):
            if all(k == 1 for k in module.kernel_size) and module.groups == 1:
                text += " PW"
            elif module.groups == module.in_channels == module.out_channels:
                text += " DW"
            elif module.groups > 1:
                text += f" g{module.groups}"
        return text
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    return ""


def _block_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """MACs of a BSConv block: projections at the input resolution, depthwise at the output's."""
    in_pixels = x.shape[0] * x[0, 0].numel()
    out_pixels = y.shape[0] * y[0, 0].numel()
    macs = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            macs += (out_pixels if name == "dw" else in_pixels) * child.weight.numel()
    return macs


def _macs(module: nn.Module, x: Any, y: Any) -> Optional[int]:
    """MACs of one call, None if there is no rule for the module's type."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return 0 if not any(True for _ in module.parameters()) else None
    if isinstance(module, _BLOCK_TYPES):
        return _block_macs(module, x, y)
    if isinstance(module, _CONVS):
        # every output position of every output channel: C_in / groups * prod(K) MACs
        return y.shape[0] * y[0, 0].numel() * module.weight.numel()
    if isinstance(module, _TRANSPOSED_CONVS):
        # every input position of every input channel scatters C_out / groups * prod(K) MACs
        return x.shape[0] * x[0, 0].numel() * module.weight.numel()
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features
    if isinstance(module, _NO_MAC_TYPES) or not any(True for _ in module.parameters()):
        return 0
    return None


def _profiled_modules(model: nn.Module) -> List[Tuple[str, nn.Module, bool]]:
    """(name, module, hooked) in registration order: leaves and BSConv blocks are hooked;
    containers that own parameters directly get an un-hooked parameters-only entry."""
    out: List[Tuple[str, nn.Module, bool]] = []
    seen: set = set()

    def walk(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        children = [(n, c) for n, c in module._modules.items() if c is not None]
        if isinstance(module, _BLOCK_TYPES) or not children:
            out.append((name, module, True))
            return
        if any(True for _ in module.parameters(recurse=False)):
            out.append((name, module, False))
        for child_name, child in children:
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    return out


def profile(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    *,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> ProfileResult:
    """Counts parameters and multiply-accumulates (MACs) of ``model`` per layer and in total.

    Runs one forward pass of a zero tensor of shape ``input_size`` (batch included, e.g.
    ``(1, 3, 224, 224)``; MACs grow with the batch size) under ``torch.no_grad`` and with the
    model temporarily in eval mode (BatchNorm statistics are not touched; the training flags are
    restored afterwards). The input is created on ``device`` / in ``dtype``, by default those of
    the model's first parameter (CPU / float32 for a model without parameters).

    Returns:
        a :class:`ProfileResult`; ``print(result)`` shows the table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"profile: model must be an nn.Module, got {type(model).__name__}")
    size = tuple(input_size)
    if not size or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in size):
        raise ValueError(f"profile: input_size must be a sequence of non-negative ints "
                         f"(batch included), got {input_size!r}")
    first = next(model.parameters(), None)
    if device is None:
        device = first.device if first is not None else "cpu"
    if dtype is None:
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32

    entries = _profiled_modules(model)
    stats: Dict[int, Dict[str, Any]] = {}

    def hook(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        s = stats[id(module)]
        x = inputs[0] if inputs else None
        if s["calls"] == 0:
            s["in_shape"] = tuple(x.shape) if isinstance(x, torch.Tensor) else None
            s["out_shape"] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        s["calls"] += 1
        macs = _macs(module, x, output)
        if macs is None:
            s["uncounted"] = True
        else:
            s["macs"] += macs

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for _, module, hooked in entries:
            stats[id(module)] = {"calls": 0, "macs": 0, "in_shape": None, "out_shape": None,
                                 "uncounted": not hooked and not isinstance(
                                     module, _NO_MAC_TYPES)}
            if hooked:
                handles.append(module.register_forward_hook(hook))
        model.eval()
        with torch.no_grad():
            model(torch.zeros(size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode

    rows = []
    uncounted = []
    for name, module, hooked in entries:
        s = stats[id(module)]
        params = sum(p.numel() for p in module.parameters(recurse=hooked))
        if s["uncounted"] and params:
            uncounted.append(name or "(model)")
        rows.append(ProfileRow(name=name, type=_type_name(module), info=_info(module),
                               in_shape=s["in_shape"], out_shape=s["out_shape"], params=params,
                               macs=s["macs"], calls=s["calls"]))
    return ProfileResult(rows=rows, total_params=sum(p.numel() for p in model.parameters()),
                         total_macs=sum(r.macs for r in rows), input_size=size,
                         uncounted=uncounted)
