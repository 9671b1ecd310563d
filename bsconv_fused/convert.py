"""Turn the convolutions of an existing model into fused BSConv blocks.

:func:`convert` walks a model and replaces

* every ``nn.Conv2d`` with ``groups == 1`` whose kernel size is selected by ``kernel_sizes`` by a
  freshly initialized :class:`~bsconv_fused.BSConvU` or :class:`~bsconv_fused.BSConvS` with the
  same channels, kernel size, stride, padding (strings included), dilation, bias, padding mode,
  device and dtype. This is what the authors' ``bsconv.pytorch.BSConvU_Replacer`` /
  ``BSConvS_Replacer`` do (same selection rule, same constructor arguments, same traversal order,
  hence the same random initialization for the same seed); the replaced layers need (re)training.
* every ``bsconv.pytorch.BSConvU`` / ``BSConvS`` of the authors' package (if installed) by the
  fused module of the same kind, keeping its submodules and therefore its weights: the converted
  model computes the same function.

Modules that already are fused BSConv blocks are left alone (their inner 1x1 / depthwise
convolutions are never converted).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .modules import BSConvS, BSConvU

__all__ = ["ConvertReport", "ConvertedLayer", "convert"]

KernelSizes = Union[int, Sequence[Union[int, Sequence[int]]], None]

try:  # the authors' package is optional
    from bsconv.pytorch.modules import BSConvS as _RefBSConvS
    from bsconv.pytorch.modules import BSConvU as _RefBSConvU
except ImportError:  # pragma: no cover  (bsconv not installed)
    _RefBSConvU = _RefBSConvS = None  # type: ignore[assignment, misc]

_REF_LAYOUTS = {
    "BSConvU": (("pw", "dw"), ("pw", "bn", "dw")),
    "BSConvS": (("pw1", "pw2", "dw"), ("pw1", "bn1", "pw2", "bn2", "dw")),
}


@dataclass
class ConvertedLayer:
    """One replaced module.

    Attributes:
        name: qualified module name in the model (``""`` for the model itself).
        source: type of the replaced module (``"Conv2d"``, ``"bsconv.BSConvU"``, ...).
        target: ``"BSConvU"`` or ``"BSConvS"``.
        weights: ``"fresh"`` (new, randomly initialized weights) or ``"kept"`` (a reference
            BSConv block converted with its weights).
        in_channels, out_channels, kernel_size, stride: of the layer.
        params_before, params_after: parameters of the old and the new module.
    """

    name: str
    source: str
    target: str
    weights: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    params_before: int
    params_after: int


@dataclass
class ConvertReport:
    """What :func:`convert` did.

    Attributes:
        layers: one :class:`ConvertedLayer` per replaced module, in traversal order (a module
            shared at several places is replaced once, by one shared new module, and listed once).
        params_before, params_after: parameters of the whole model (each shared parameter once).
    """

    layers: List[ConvertedLayer] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def replaced(self) -> int:
        """Number of replaced modules."""
        return len(self.layers)

    def __str__(self) -> str:
        ratio = (100.0 * self.params_after / self.params_before) if self.params_before else 0.0
        lines = [f"convert: replaced {self.replaced} module{'s' if self.replaced != 1 else ''}; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} ({ratio:.2f} %)"]
        if self.layers:
            header = ("Module", "From", "To", "Weights", "In", "Out", "Kernel", "Stride",
                      "Params before", "Params after")
            rows = [header] + [
                (layer.name or "(root)", layer.source, layer.target, layer.weights,
                 str(layer.in_channels), str(layer.out_channels),
                 "x".join(map(str, layer.kernel_size)), "x".join(map(str, layer.stride)),
                 f"{layer.params_before:,}", f"{layer.params_after:,}")
                for layer in self.layers]
            widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
            for r in rows:
                lines.append("  ".join(c.rjust(w) if i >= 4 else c.ljust(w)
                                       for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        return "\n".join(lines)


def _count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _normalize_kernel_sizes(kernel_sizes: KernelSizes) -> Optional[frozenset]:
    """``None`` -> any size; an int or a sequence of ints / (k_h, k_w) pairs -> set of pairs."""
    if kernel_sizes is None:
        return None

    def is_size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    entries = [kernel_sizes] if isinstance(kernel_sizes, int) else kernel_sizes
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError("convert: kernel_sizes must be None, an int, or a sequence of ints and "
                        f"(k_h, k_w) pairs, got {kernel_sizes!r}")
    if len(entries) == 0:
        raise ValueError("convert: kernel_sizes is empty, nothing would be converted "
                         "(use None to convert every kernel size)")
    pairs = set()
    for k in entries:
        if is_size(k):
            pairs.add((k, k))
        elif (isinstance(k, (tuple, list)) and len(k) == 2 and is_size(k[0])
              and is_size(k[1])):
            pairs.add((int(k[0]), int(k[1])))
        else:
            raise ValueError("convert: every entry of kernel_sizes must be a positive int (a "
                             f"square kernel) or a pair of positive ints, got {k!r} in "
                             f"{kernel_sizes!r}")
    return frozenset(pairs)


def _check_arguments(variant: str, p: float, min_mid_channels: int) -> str:
    if not isinstance(variant, str) or variant.lower() not in ("u", "s"):
        raise ValueError(f"convert: variant must be 'u' (BSConv-U) or 's' (BSConv-S), "
                         f"got {variant!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
        raise ValueError(f"convert: p must be a number in [0, 1], got {p!r}")
    if (isinstance(min_mid_channels, bool) or not isinstance(min_mid_channels, int)
            or min_mid_channels < 1):
        raise ValueError(f"convert: min_mid_channels must be a positive int, "
                         f"got {min_mid_channels!r}")
    return variant.lower()


def _is_reference_bsconv(module: nn.Module) -> Optional[str]:
    """``"BSConvU"`` / ``"BSConvS"`` for a module of the authors' package, else None."""
    if _RefBSConvU is not None and isinstance(module, _RefBSConvU):
        return "BSConvU"
    if _RefBSConvS is not None and isinstance(module, _RefBSConvS):
        return "BSConvS"
    return None


def _bn_kwargs(bn: nn.Module) -> Dict[str, Any]:
    return {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
            "track_running_stats": bn.track_running_stats}


def _from_reference(module: nn.Module, kind: str) -> Optional[nn.Module]:
    """Fused counterpart of a reference BSConv block that takes over its submodules (weights,
    dtypes, devices, training flags included). None if its structure was altered."""
    names = tuple(module._modules)
    if names not in _REF_LAYOUTS[kind]:
        return None
    m = module._modules
    if not all(isinstance(c, nn.BatchNorm2d if n.startswith("bn") else nn.Conv2d)
               for n, c in m.items()):
        return None
    dw = m["dw"]
    first = m["pw"] if kind == "BSConvU" else m["pw1"]
    bn = m.get("bn", m.get("bn1"))
    args: Dict[str, Any] = dict(
        in_channels=first.in_channels, out_channels=dw.out_channels,
        kernel_size=dw.kernel_size, stride=dw.stride, padding=dw.padding,
        dilation=dw.dilation, bias=dw.bias is not None, padding_mode=dw.padding_mode,
        with_bn=bn is not None, bn_kwargs=None if bn is None else _bn_kwargs(bn),
        device="meta")  # built on meta (no memory, no RNG use): its submodules are replaced
    if kind == "BSConvU":
        new: nn.Module = BSConvU(**args)
    else:
        # p = 0 with min_mid_channels = M' reproduces the subspace size M' exactly.
        new = BSConvS(p=0.0, min_mid_channels=m["pw1"].out_channels, **args)
    if tuple(new._modules) != names:
        return None
    for name in names:
        new._modules[name] = m[name]
    new.training = module.training  # the block's own flag; the submodules keep theirs
    return new


def _conv_to_bsconv(conv: nn.Conv2d, variant: str, p: float, min_mid_channels: int,
                    with_bn: bool, bn_kwargs: Optional[Dict[str, Any]]) -> nn.Module:
    args: Dict[str, Any] = dict(
        in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        with_bn=with_bn, bn_kwargs=None if bn_kwargs is None else dict(bn_kwargs),
        device=conv.weight.device, dtype=conv.weight.dtype)
    if variant == "u":
        new: nn.Module = BSConvU(**args)
    else:
        new = BSConvS(p=p, min_mid_channels=min_mid_channels, **args)
    new.train(conv.training)
    return new


def replace_modules(model: nn.Module,
                    transform: Callable[[nn.Module, str], Optional[nn.Module]]) -> nn.Module:
    """Pre-order walk over ``model`` (the model itself first, then its children in registration
    order, as the authors' ``ModuleReplacer``). ``transform(module, qualified_name)`` returns a
    replacement (the walk does not descend into it) or None (the walk descends into the
    module). A module reachable under several names is transformed once and its replacement is
    shared. Returns the (possibly replaced) model; children are replaced in place."""
    memo: Dict[int, nn.Module] = {}
    visited: set = set()

    def visit(module: nn.Module, name: str) -> nn.Module:
        key = id(module)
        if key in memo:
            return memo[key]
        new = transform(module, name)
        if new is not None:
            memo[key] = new
            return new
        if key not in visited:
            visited.add(key)
            for child_name, child in list(module._modules.items()):
                if child is None:
                    continue
                new_child = visit(child, f"{name}.{child_name}" if name else child_name)
                if new_child is not child:
                    module._modules[child_name] = new_child
        return module

    return visit(model, "")


def convert(
    model: nn.Module,
    variant: str = "u",
    kernel_sizes: KernelSizes = (3, 5),
    p: float = 0.25,
    min_mid_channels: int = 4,
    with_bn: bool = False,
    inplace: bool = False,
    bn_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, ConvertReport]:
    """Replaces the standard convolutions of ``model`` by fused BSConv blocks.

    Args:
        model: any ``nn.Module`` (a bare ``nn.Conv2d`` works too).
        variant: ``"u"`` for :class:`~bsconv_fused.BSConvU`, ``"s"`` for
            :class:`~bsconv_fused.BSConvS`.
        kernel_sizes: which ``nn.Conv2d`` (with ``groups == 1``) to replace: ints select square
            kernels, ``(k_h, k_w)`` pairs any kernel, e.g. ``(3, 5)`` or ``((1, 7), (7, 1), 3)``;
            ``None`` replaces every kernel size (1x1 included). The default is the authors'
            ``((3, 3), (5, 5))``.
        p, min_mid_channels: subspace size of BSConv-S,
            ``M' = min(M, max(min_mid_channels, ceil(p * M)))``; ignored for BSConv-U.
        with_bn, bn_kwargs: put an ``nn.BatchNorm2d`` (with these extra arguments) after each
            projection, as the authors' replacers do.
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is
            left untouched. Always use the returned model (the model itself is replaced when it
            is a convolution).

    Reference BSConv blocks (``bsconv.pytorch.BSConvU`` / ``BSConvS``) are converted to the
    fused module of the same kind whatever ``variant``, ``kernel_sizes`` and ``with_bn`` say,
    keeping their submodules and weights. The training flag of every replaced module is kept.
    New BSConv-S blocks do not add a ``reg_loss`` method to the model (the authors' replacer
    does): use :func:`bsconv_fused.orthonormal_loss`.

    Returns:
        ``(converted_model, report)``, see :class:`ConvertReport`.

    Raises:
        ValueError: bad ``variant``, ``kernel_sizes``, ``p`` or ``min_mid_channels``.
        TypeError: ``model`` is not an ``nn.Module`` or ``kernel_sizes`` has the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert: TorchScript modules cannot be converted; convert the eager "
                        "model before scripting")
    variant = _check_arguments(variant, p, min_mid_channels)
    if any(isinstance(q, nn.parameter.UninitializedParameter) for q in model.parameters()):
        raise ValueError("convert: the model has lazy modules whose shapes are not known yet; "
                         "run one forward pass first")
    sizes = _normalize_kernel_sizes(kernel_sizes)
    if bn_kwargs is not None and not isinstance(bn_kwargs, dict):
        raise TypeError(f"convert: bn_kwargs must be a dict or None, got {bn_kwargs!r}")
    if not inplace:
        model = copy.deepcopy(model)

    report = ConvertReport(params_before=_count_parameters(model))

    def transform(module: nn.Module, name: str) -> Optional[nn.Module]:
        if isinstance(module, (BSConvU, BSConvS)):
            return module  # already fused: keep, and do not descend into its 1x1 / dw convs
        ref_kind = _is_reference_bsconv(module)
        if ref_kind is not None:
            new = _from_reference(module, ref_kind)
            if new is None:
                return module  # altered structure: leave it as it is
            weights, source = "kept", f"bsconv.{ref_kind}"
            dw = module._modules["dw"]
            in_channels = next(iter(module._modules.values())).in_channels
        elif (isinstance(module, nn.Conv2d) and module.groups == 1
              and (sizes is None or tuple(module.kernel_size) in sizes)):
            new = _conv_to_bsconv(module, variant, p, min_mid_channels, with_bn, bn_kwargs)
            weights, source = "fresh", type(module).__name__
            dw, in_channels = module, module.in_channels
        else:
            return None
        report.layers.append(ConvertedLayer(
            name=name, source=source, target=type(new).__name__, weights=weights,
            in_channels=in_channels, out_channels=dw.out_channels,
            kernel_size=tuple(dw.kernel_size), stride=tuple(dw.stride),
            params_before=_count_parameters(module), params_after=_count_parameters(new)))
        return new

    model = replace_modules(model, transform)
    report.params_after = _count_parameters(model)
    return model, report

