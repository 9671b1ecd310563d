"""Fuse pointwise -> [BatchNorm] -> [activation] -> depthwise chains for inference.

:func:`fuse` walks a model, finds every chain

    1x1 conv (groups 1, stride 1, no padding) -> [BatchNorm2d] -> [ReLU | ReLU6 | Hardswish]
    -> depthwise KxK conv (groups == in == out channels) -> [BatchNorm2d]

(and the factored form ``1x1 -> [BN] -> 1x1 -> [BN] -> [act] -> depthwise`` of BSConv-S), and
replaces it by one :class:`FusedPointwiseDepthwise`, which runs the whole chain as one call of the
fused op (``bsconv_fused.functional.bsconv_u`` / ``bsconv_s`` with ``mid_scale`` / ``mid_shift`` /
``mid_activation``). This covers the expand half of the inverted residual blocks of torchvision's
MobileNetV2 / V3 and MnasNet, the authors' ``bsconv.pytorch`` modules and models, the model
zoo (``bsconv_fused.models``), and this
package's :class:`~bsconv_fused.BSConvU` / :class:`~bsconv_fused.BSConvS` blocks (whose eval-mode
BatchNorm is then folded once instead of at every call, together with a BatchNorm right after the
block).

How chains are found: the model's forward is traced with ``torch.fx`` (leaves: torch.nn modules,
childless modules, this package's blocks) and chains are read off *paths*: runs of module calls
where each call's only input is the previous call's output and that output has no other user. So
residual connections, squeeze-excitation branches and custom ``forward`` code (the zoo's /
bsconv's ``ConvBlock``, torchvision's ``InvertedResidual``) are handled, and a chain whose
intermediate result is used anywhere else is not a chain. Where a module does not trace (data-
dependent control flow), its ``nn.Sequential`` containers are searched instead (their children,
flattened, run in order) and other modules child by child. A module registered or called at more
than one place is never part of a chain.

The replacement: the chain's first module becomes the fused module and its other modules become
``nn.Identity``, so the containers keep their indices and names. Modules after the depthwise
convolution's BatchNorm (its activation, squeeze-excitation, ...) stay in place.

Exactness: every fold is an exact identity in real arithmetic (see :func:`_fold_chain`), computed
in float64 and rounded once to the weights' dtype. Eval-mode ``BatchNorm2d`` itself evaluates
``x * (gamma / sqrt(var + eps)) + (beta - mean * gamma / sqrt(var + eps))`` per channel, so the
folded mid transform differs only by the rounding of that per-channel scale / shift; folding the
BatchNorm after the depthwise conv into its weights re-associates one product per tap. The
float32 results therefore differ from the unfused model by a few float32 ulps per layer, the same
order as changing the summation order of the convolutions (the tests check this against a float64
oracle).

Training mode: a chain with any module in training mode is left alone (a BatchNorm in training
mode normalizes with batch statistics, and the fused module holds frozen copies of the weights),
and :func:`fuse` warns; call ``model.eval()`` first.

Not fusible (left unfused and listed in the report): an activation other than ReLU / ReLU6 /
Hardswish (or a class declared equivalent, see ``activations`` of :func:`fuse`) between the
projection and the depthwise conv (e.g. SiLU in EfficientNet: the op's mid transform has no
SiLU, and neither the BatchNorm nor the SiLU can be moved across the other layer), BatchNorm
without running statistics, modules with hooks or used at several places, ``Conv2d`` subclasses
with their own ``forward``, strided or padded 1x1 convs.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from . import functional
from ._args import IntOrPair, Padding
from .modules import BSConvS, BSConvU

__all__ = ["FuseReport", "FusedChain", "FusedPointwiseDepthwise", "SkippedChain", "fuse"]

SUPPORTED_ACTIVATIONS = ("relu", "relu6", "hardswish")


class FusedPointwiseDepthwise(nn.Module):
    r"""One fused ``pointwise -> act(scale * v + shift) -> depthwise`` block for inference.

    ``y = DW(act(mid_scale * (W2 W1 x) + mid_shift)) + dw_bias`` (``W2`` absent for the BSConv-U
    form), computed by one call of :func:`bsconv_fused.functional.bsconv_u` / ``bsconv_s``.

    Args:
        pw1_weight: [N, M, 1, 1] (BSConv-U form) or [M', M, 1, 1] (BSConv-S form).
        dw_weight: [N, 1, K_h, K_w].
        dw_bias: [N] or None.
        pw2_weight: [N, M', 1, 1] for the BSConv-S form, else None.
        mid_scale, mid_shift: [N] or None (the folded BatchNorm and projection biases).
        mid_activation: None, "relu", "relu6" or "hardswish".
        stride, padding, dilation, padding_mode: of the depthwise convolution, as ``nn.Conv2d``.

    The tensors become parameters of the module (so ``.to()``, ``.half()``, ``state_dict`` and
    ``torch.export`` handle them as usual). Shapes: [B, M, H, W] -> [B, N, H_out, W_out].
    """

    def __init__(
        self,
        pw1_weight: torch.Tensor,
        dw_weight: torch.Tensor,
        dw_bias: Optional[torch.Tensor] = None,
        *,
        pw2_weight: Optional[torch.Tensor] = None,
        mid_scale: Optional[torch.Tensor] = None,
        mid_shift: Optional[torch.Tensor] = None,
        mid_activation: Optional[str] = None,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if mid_activation is not None and mid_activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"FusedPointwiseDepthwise: mid_activation must be None or one of "
                             f"{SUPPORTED_ACTIVATIONS}, got {mid_activation!r}")

        def param(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
            return None if t is None else nn.Parameter(t.detach().clone())

        self.pw1_weight = param(pw1_weight)
        self.pw2_weight = param(pw2_weight)
        self.dw_weight = param(dw_weight)
        self.dw_bias = param(dw_bias)
        self.mid_scale = param(mid_scale)
        self.mid_shift = param(mid_shift)
        self.mid_activation = mid_activation
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.padding_mode = padding_mode

    @property
    def in_channels(self) -> int:
        return self.pw1_weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.dw_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, M, H, W] -> y [B, N, H_out, W_out]."""
        kwargs = dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                      padding_mode=self.padding_mode, mid_scale=self.mid_scale,
                      mid_shift=self.mid_shift, mid_activation=self.mid_activation)
        if self.pw2_weight is None:
            return functional.bsconv_u(x, self.pw1_weight, self.dw_weight, self.dw_bias, **kwargs)
        return functional.bsconv_s(x, self.pw1_weight, self.pw2_weight, self.dw_weight,
                                   self.dw_bias, **kwargs)

    def extra_repr(self) -> str:
        chans = [self.in_channels]
        if self.pw2_weight is not None:
            chans.append(self.pw1_weight.shape[0])
        chans.append(self.out_channels)
        s = "->".join(str(c) for c in chans)
        s += f", kernel_size={tuple(self.dw_weight.shape[2:])}, stride={self.stride}"
        s += f", padding={self.padding}"
        if self.dilation not in (1, (1, 1)):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.mid_scale is not None or self.mid_shift is not None:
            s += ", mid_affine=True"
        if self.mid_activation is not None:
            s += f", mid_activation={self.mid_activation!r}"
        return s


# --------------------------------------------------------------------------------------------
# The report.


@dataclass
class FusedChain:
    """One replaced chain: qualified names of its modules (in execution order), the fused
    module's qualified name, the form ("pw-dw", "pw-pw-dw", "BSConvU", "BSConvS"), its
    activation and whether a BatchNorm after the depthwise conv was folded in."""

    modules: List[str]
    name: str
    kind: str
    activation: Optional[str]
    folded_bn_after: bool


@dataclass
class SkippedChain:
    """A chain that was found but left unfused, and why."""

    modules: List[str]
    reason: str


@dataclass
class FuseReport:
    """What :func:`fuse` did: ``fused`` and ``skipped`` chains."""

    fused: List[FusedChain] = field(default_factory=list)
    skipped: List[SkippedChain] = field(default_factory=list)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def skip_reasons(self) -> Dict[str, int]:
        """How many chains were skipped for each reason."""
        out: Dict[str, int] = {}
        for s in self.skipped:
            out[s.reason] = out.get(s.reason, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"fused {self.num_fused} chain(s), skipped {self.num_skipped}"]
        for f in self.fused:
            extra = f", act={f.activation}" if f.activation else ""
            extra += ", +BN after" if f.folded_bn_after else ""
            lines.append(f"  fused   {f.name} [{f.kind}{extra}]: {' -> '.join(f.modules)}")
        for s in self.skipped:
            lines.append(f"  skipped {' -> '.join(s.modules)}: {s.reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Module predicates.


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _is_transparent_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward just runs its children in order (so its children can be
    merged with its neighbours'): not BSConvU/S, no custom forward, no hooks."""
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and not _has_hooks(m))


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d)


def _is_1x1(m: nn.Module) -> bool:
    return _is_conv(m) and tuple(m.kernel_size) == (1, 1) and m.groups == 1


def _is_depthwise(m: nn.Module) -> bool:
    return _is_conv(m) and m.groups == m.in_channels == m.out_channels and not _is_1x1(m)


# Activation modules of other packages that compute exactly one of the op's activations, by
# qualified class name (no import needed). Both HSwish compute ``x * relu6(x + 3) / 6``.
KNOWN_ACTIVATIONS: Dict[str, str] = {
    "bsconv.pytorch.common.HSwish": "hardswish",
    "bsconv_fused.models.common.HSwish": "hardswish",
}


def _activation_name(m: nn.Module, extra: Mapping[type, str]) -> Optional[str]:
    """The op's name of a supported activation module (exact types only: a subclass may change
    ``forward``), else None."""
    t = type(m)
    if t in extra:
        return extra[t]
    if t is nn.ReLU:
        return "relu"
    if t is nn.ReLU6 or (t is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0):
        return "relu6"
    if t is nn.Hardswish:
        return "hardswish"
    return KNOWN_ACTIVATIONS.get(f"{t.__module__}.{t.__qualname__}")


def _conv_problem(m: nn.Module, name: str, pointwise: bool) -> Optional[str]:
    if type(m).forward is not nn.Conv2d.forward:
        return f"{name} is a {type(m).__name__} with its own forward"
    if not m.weight.is_floating_point():
        return f"{name} has non-float weights ({m.weight.dtype})"
    if pointwise:
        if tuple(m.stride) != (1, 1):
            return f"{name} is a strided 1x1 conv (stride {tuple(m.stride)})"
        if m.padding not in ((0, 0), "valid"):
            return f"{name} is a padded 1x1 conv (padding {m.padding})"
    return None


def _bn_problem(m: nn.Module, name: str) -> Optional[str]:
    if type(m).forward is not nn.BatchNorm2d.forward:
        return f"{name} is a {type(m).__name__} with its own forward"
    if m.running_mean is None or m.running_var is None:
        return f"{name} has no running statistics (track_running_stats=False)"
    return None


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------
# Folding (float64, rounded once to the weights' dtype).


def _bn_affine64(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as ``scale * x + shift`` per channel, in float64."""
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.detach().double() * scale
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


@dataclass
class _Chain:
    """The modules of one chain, in execution order; None where a part is absent."""

    pw1: nn.Conv2d
    bn1: Optional[nn.BatchNorm2d]
    pw2: Optional[nn.Conv2d]
    bn2: Optional[nn.BatchNorm2d]
    act: Optional[str]
    dw: nn.Conv2d
    bn_after: Optional[nn.BatchNorm2d]


def _fold_chain(c: _Chain) -> FusedPointwiseDepthwise:
    """Builds the fused module. With every BatchNorm as ``s * x + t`` and conv biases ``b``:

    * ``u = s1 * (W1 x + b1) + t1 = (diag(s1) W1) x + c1``, ``c1 = s1 b1 + t1``;
    * ``v = s2 * (W2 u + b2) + t2 = s2 * (W2 diag(s1) W1 x) + s2 (W2 c1 + b2) + t2``, so
      ``mid_scale = s2`` and ``mid_shift = s2 (W2 c1 + b2) + t2`` (one projection: drop W2, c1);
    * ``y = s3 * (DW_B(act(v)) + b) + t3 = DW_{s3 B}(act(v)) + (s3 b + t3)``.

    All 1x1 layers act pixel by pixel, so these hold at every pixel; the depthwise padding acts on
    ``act(v)`` in both forms (the op applies the mid transform to image pixels only).
    """
    dtype = c.pw1.weight.dtype

    def d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().double()

    w1 = d(c.pw1.weight)
    c1: Optional[torch.Tensor] = d(c.pw1.bias)  # the constant term after the first projection
    if c.bn1 is not None:
        s1, t1 = _bn_affine64(c.bn1)
        w1 = w1 * s1.view(-1, 1, 1, 1)
        c1 = t1 if c1 is None else s1 * c1 + t1
    w2 = d(c.pw2.weight) if c.pw2 is not None else None
    shift = c1
    if w2 is not None:
        shift = None if c1 is None else torch.mv(w2.flatten(1), c1)
        b2 = d(c.pw2.bias)
        if b2 is not None:
            shift = b2 if shift is None else shift + b2
    scale = None
    if c.bn2 is not None:
        s2, t2 = _bn_affine64(c.bn2)
        scale = s2
        shift = t2 if shift is None else s2 * shift + t2
    dw_w, dw_b = d(c.dw.weight), d(c.dw.bias)
    if c.bn_after is not None:
        s3, t3 = _bn_affine64(c.bn_after)
        dw_w = dw_w * s3.view(-1, 1, 1, 1)
        dw_b = t3 if dw_b is None else s3 * dw_b + t3

    def r(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(dtype)

    padding = c.dw.padding if isinstance(c.dw.padding, str) else tuple(c.dw.padding)
    fused = FusedPointwiseDepthwise(
        r(w1), r(dw_w), r(dw_b), pw2_weight=r(w2), mid_scale=r(scale), mid_shift=r(shift),
        mid_activation=c.act, stride=tuple(c.dw.stride), padding=padding,
        dilation=tuple(c.dw.dilation), padding_mode=c.dw.padding_mode)
    return fused.to(c.pw1.weight.device)


# --------------------------------------------------------------------------------------------
# Finding chains.
#
# A *path* is a list of module calls in which each call's only input is the previous call's
# output and that output has no other consumer: replacing the first call of a chain on a path by
# the fused module and the others by nn.Identity then cannot change what any other code sees.
# Paths come from a torch.fx trace of the model (any forward: residual blocks, ConvBlocks with
# attributes, ...) or, where tracing fails, from the flattened children of nn.Sequential
# containers.


@dataclass
class _Leaf:
    """One module call on a path: the module, where it is registered, its qualified name."""

    parent: nn.Module
    key: str
    name: str
    module: nn.Module
    shared: bool = False  # registered or called at more than one place


def _qual(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


_OWN_BLOCKS = (BSConvU, BSConvS, FusedPointwiseDepthwise)


def _is_builtin(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer whose leaves are torch.nn's modules (but not containers), modules without
    children (custom activations then show up as one call), this package's blocks and modules
    with hooks (FX would inline them and lose the hooks)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _OWN_BLOCKS) or _has_hooks(m) or next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _flatten(seq: nn.Module, prefix: str) -> List[_Leaf]:
    out: List[_Leaf] = []
    for key, child in seq._modules.items():
        if child is None:
            continue
        name = _qual(prefix, key)
        if _is_transparent_sequential(child):
            out.extend(_flatten(child, name))
        else:
            out.append(_Leaf(seq, key, name, child))
    return out


def _bsconv_chain(m: nn.Module) -> _Chain:
    """The chain of a fusable BSConvU / BSConvS block (its own eval-mode check passed)."""
    mods = m._modules
    if isinstance(m, BSConvU):
        return _Chain(mods["pw"], mods.get("bn"), None, None, None, mods["dw"], None)
    return _Chain(mods["pw1"], mods.get("bn1"), mods["pw2"], mods.get("bn2"), None, mods["dw"],
                  None)


def _bsconv_problem(m: nn.Module, name: str) -> Optional[str]:
    if m.training:
        return f"training mode ({name}); call model.eval() before fuse()"
    if _has_hooks(m):
        return f"{name} has hooks"
    if not m._fusable():
        return (f"{name} cannot run fused (modified structure, hooks or BatchNorm without "
                "running statistics)")
    return None


class _Fuser:
    def __init__(self, root: nn.Module, activations: Mapping[type, str]) -> None:
        self.report = FuseReport()
        self.activations = activations
        # How often each module is registered in the model (a module shared by two places must
        # not be replaced by nn.Identity).
        self.registrations: Counter = Counter(
            id(m) for _, m in root.named_modules(remove_duplicate=False))

    # ---- paths ---------------------------------------------------------------------------

    def _fx_paths(self, module: nn.Module,
                  prefix: str) -> Optional[Tuple[List[List[_Leaf]], List[_Leaf]]]:
        """Paths of ``module``'s forward from a torch.fx trace, and the called modules FX did not
        look into that may hold chains; None when ``module`` does not trace."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _Tracer().trace(module)
        except Exception:  # noqa: BLE001  (any failure just means: not traceable)
            return None
        nodes = [n for n in graph.nodes if n.op == "call_module"]
        mods = {n: module.get_submodule(n.target) for n in nodes}
        calls = Counter(id(m) for m in mods.values())

        def nxt(n: torch.fx.Node) -> Optional[torch.fx.Node]:
            if len(n.users) != 1:
                return None
            (u,) = n.users
            if u.op != "call_module" or u.args != (n,) or u.kwargs:
                return None
            return u

        def leaf(n: torch.fx.Node) -> _Leaf:
            parent_name, _, key = n.target.rpartition(".")
            m = mods[n]
            shared = calls[id(m)] > 1 or self.registrations[id(m)] > 1
            return _Leaf(module.get_submodule(parent_name), key, _qual(prefix, n.target), m,
                         shared)

        successors = {n: nxt(n) for n in nodes}
        has_prev = {u for u in successors.values() if u is not None}
        paths = []
        for n in nodes:
            if n in has_prev:
                continue
            path: List[_Leaf] = []
            cur: Optional[torch.fx.Node] = n
            while cur is not None:
                path.append(leaf(cur))
                cur = successors[cur]
            paths.append(path)
        # Leaves with children FX did not look into (containers with hooks) may hold chains.
        inner = [lf for path in paths for lf in path
                 if not isinstance(lf.module, _OWN_BLOCKS) and next(lf.module.children(), None)
                 and (not _is_builtin(lf.module) or isinstance(lf.module, nn.Sequential))]
        return paths, inner

    # ---- replacing -------------------------------------------------------------------------

    def _fuse(self, group: List[_Leaf], chain: _Chain, kind: str) -> None:
        fused = _fold_chain(chain)
        first, *rest = group
        first.parent._modules[first.key] = fused
        for leaf in rest:
            leaf.parent._modules[leaf.key] = nn.Identity()
        self.report.fused.append(FusedChain(
            [leaf.name for leaf in group], first.name, kind, chain.act,
            chain.bn_after is not None))

    def _bn_after(self, leaves: List[_Leaf], idx: List[int], pos: int,
                  used: set) -> Optional[_Leaf]:
        """The foldable eval BatchNorm right after position ``pos`` (of ``idx``), if any."""
        if pos + 1 >= len(idx) or idx[pos + 1] in used:
            return None
        leaf = leaves[idx[pos + 1]]
        m = leaf.module
        prev = leaves[idx[pos]].module
        out_channels = prev.dw.out_channels if isinstance(prev, (BSConvU, BSConvS)) \
            else prev.out_channels
        if (_is_bn(m) and not m.training and not _has_hooks(m) and not leaf.shared
                and _bn_problem(m, leaf.name) is None and m.num_features == out_channels):
            return leaf
        return None

    # ---- chains on one path ----------------------------------------------------------------

    def process_path(self, leaves: List[_Leaf]) -> set:
        """Finds and replaces the chains on a path; returns the indices of the leaves used."""
        # nn.Identity leaves are no-ops: skip them when looking at neighbours.
        idx = [i for i, leaf in enumerate(leaves) if type(leaf.module) is not nn.Identity]
        used: set = set()
        for pos, i in enumerate(idx):
            m = leaves[i].module
            if isinstance(m, (BSConvU, BSConvS)):
                self._process_bsconv_leaf(leaves, idx, pos, used)
            elif _is_depthwise(m):
                self._process_depthwise(leaves, idx, pos, used)
        return used

    def _process_bsconv_leaf(self, leaves: List[_Leaf], idx: List[int], pos: int,
                             used: set) -> None:
        leaf = leaves[idx[pos]]
        problem = _bsconv_problem(leaf.module, leaf.name)
        if problem is None and leaf.shared:
            problem = f"{leaf.name} is used at more than one place"
        if problem is not None:
            self.report.skipped.append(SkippedChain([leaf.name], problem))
            return
        chain = _bsconv_chain(leaf.module)
        after = self._bn_after(leaves, idx, pos, used)
        group = [leaf] + ([after] if after is not None else [])
        chain.bn_after = after.module if after is not None else None
        self._fuse(group, chain, type(leaf.module).__name__)
        used.update(idx[pos:pos + len(group)])

    def _process_depthwise(self, leaves: List[_Leaf], idx: List[int], pos: int,
                           used: set) -> None:
        """Walks back from the depthwise conv at ``pos`` (of ``idx``): [one activation-like
        module], [BN], 1x1 conv, then optionally [BN], 1x1 conv (the BSConv-S form)."""

        def at(p: int) -> Optional[_Leaf]:
            return leaves[idx[p]] if p >= 0 and idx[p] not in used else None

        id_to_index = {id(leaf): i for i, leaf in enumerate(leaves)}
        dw_leaf = leaves[idx[pos]]
        p = pos - 1
        between = at(p)
        if between is None:
            return
        act_leaf: Optional[_Leaf] = None
        if not (_is_bn(between.module) or _is_conv(between.module)):
            act_leaf, p = between, p - 1
        bn2 = at(p)
        if bn2 is not None and _is_bn(bn2.module):
            p -= 1
        else:
            bn2 = None
        pw2 = at(p)
        if pw2 is None or not _is_1x1(pw2.module) \
                or pw2.module.out_channels != dw_leaf.module.in_channels:
            return  # no projection right before: e.g. a depthwise separable conv
        p -= 1
        # The factored (BSConv-S) form: another 1x1 conv (optionally with a BatchNorm) before.
        bn1 = at(p)
        if bn1 is not None and _is_bn(bn1.module):
            pw1 = at(p - 1)
        else:
            bn1, pw1 = None, bn1
        if pw1 is not None and not (_is_1x1(pw1.module)
                                    and pw1.module.out_channels == pw2.module.in_channels):
            pw1 = None
        if pw1 is None:
            bn1 = None
        parts = [pw1, bn1, pw2, bn2, act_leaf, dw_leaf]
        group = [leaf for leaf in parts if leaf is not None]

        problem = None
        act_name = None
        if act_leaf is not None:
            act_name = _activation_name(act_leaf.module, self.activations)
            if act_name is None:
                problem = (f"{type(act_leaf.module).__name__} ({act_leaf.name}) between the "
                           "pointwise and the depthwise conv is not an activation the fused op "
                           "supports (ReLU, ReLU6, Hardswish)")
        for leaf in group:
            if problem is not None:
                break
            m = leaf.module
            if _has_hooks(m):
                problem = f"{leaf.name} has hooks"
            elif leaf.shared:
                problem = f"{leaf.name} is used at more than one place"
            elif m.training:
                problem = f"training mode ({leaf.name}); call model.eval() before fuse()"
            elif _is_bn(m):
                problem = _bn_problem(m, leaf.name)
            elif _is_conv(m):
                problem = _conv_problem(m, leaf.name, pointwise=leaf is not dw_leaf)
        if problem is None and len({leaf.module.weight.dtype for leaf in group
                                    if _is_conv(leaf.module)}) > 1:
            problem = "the convolutions have different dtypes"
        if problem is not None:
            self.report.skipped.append(SkippedChain([leaf.name for leaf in group], problem))
            return
        after = self._bn_after(leaves, idx, pos, used)
        chain = _Chain(
            pw1=(pw1 or pw2).module, bn1=None if bn1 is None else bn1.module,
            pw2=None if pw1 is None else pw2.module, bn2=None if bn2 is None else bn2.module,
            act=act_name, dw=dw_leaf.module, bn_after=None if after is None else after.module)
        if after is not None:
            group.append(after)
        self._fuse(group, chain, "pw-dw" if chain.pw2 is None else "pw-pw-dw")
        used.update(id_to_index[id(leaf)] for leaf in group)

    # ---- walking the model -----------------------------------------------------------------

    def visit(self, module: nn.Module, prefix: str) -> None:
        """Fuses the chains inside ``module`` (``module`` itself stays)."""
        traced = self._fx_paths(module, prefix)
        if traced is not None:
            paths, inner = traced
            for path in paths:
                self.process_path(path)
            for leaf in inner:  # opaque to FX (hooks, ...): look inside
                if leaf.parent._modules.get(leaf.key) is leaf.module:
                    self.visit(leaf.module, leaf.name)
            return
        # Not traceable: the children of nn.Sequential containers run in order; anything else is
        # searched child by child.
        if _is_transparent_sequential(module):
            leaves = _flatten(module, prefix)
            for leaf in leaves:
                leaf.shared = self.registrations[id(leaf.module)] > 1
            used = self.process_path(leaves)
            for i, leaf in enumerate(leaves):
                if i not in used and not isinstance(leaf.module, _OWN_BLOCKS):
                    self.visit(leaf.module, leaf.name)
            return
        for key, child in list(module._modules.items()):
            if child is None:
                continue
            name = _qual(prefix, key)
            if isinstance(child, (BSConvU, BSConvS)):
                # Held by a module with its own (untraceable) forward: replace the block alone.
                leaf = _Leaf(module, key, name, child, self.registrations[id(child)] > 1)
                self.process_path([leaf])
            elif not isinstance(child, FusedPointwiseDepthwise):
                self.visit(child, name)


def fuse(model: nn.Module, inplace: bool = False, warn: bool = True,
         activations: Optional[Mapping[type, str]] = None) -> Tuple[nn.Module, FuseReport]:
    """Replaces every fusable ``pointwise -> [BN] -> [act] -> depthwise -> [BN]`` chain of an
    eval-mode model by one :class:`FusedPointwiseDepthwise`.

    Args:
        model: the model, in eval mode (chains with training-mode modules are left alone).
        inplace: modify ``model`` itself; by default a deep copy is fused and ``model`` is left
            unchanged.
        warn: warn (``UserWarning``) when chains were skipped because of training mode.
        activations: extra activation module classes (exact types) and the op activation each
            computes exactly ("relu", "relu6" or "hardswish"), e.g. ``{MyHSwish: "hardswish"}``.
            ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, 6)``, ``nn.Hardswish`` and the classes in
            ``KNOWN_ACTIVATIONS`` are recognized anyway.

    Returns:
        ``(fused_model, report)``: the model computing the same function (up to float rounding,
        see the module docstring) and a :class:`FuseReport` listing the fused and the skipped
        chains with the reason for each. If ``model`` itself is a BSConvU / BSConvS block, the
        returned model is the fused module replacing it.
    """
    activations = dict(activations or {})
    for cls, name in activations.items():
        if name not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"fuse: activations[{cls.__name__}] must be one of "
                             f"{SUPPORTED_ACTIVATIONS}, got {name!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, (BSConvU, BSConvS)):
        holder = nn.Sequential(model)  # so that the block can be replaced like a child
        fuser = _Fuser(holder, activations)
        fuser.process_path([_Leaf(holder, "0", "", model)])
        model = holder[0]
    else:
        fuser = _Fuser(model, activations)
        fuser.visit(model, "")
    report = fuser.report
    n_train = sum(1 for s in report.skipped if s.reason.startswith("training mode"))
    if warn and n_train:
        warnings.warn(f"bsconv_fused.fuse: {n_train} chain(s) left unfused because modules are "
                      "in training mode; call model.eval() before fuse()", UserWarning,
                      stacklevel=2)
    return model, report
