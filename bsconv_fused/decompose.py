"""Convert trained ``K x K`` convolutions into BSConv-U, BSConv-S or depthwise-separable blocks.

Two observations motivate a conversion without training from scratch:

* Haase & Amthor (CVPR 2020, Sec. 3.1) find that the ``M`` depth slices of a trained filter are
  strongly correlated: each filter is close to one ``K x K`` *blueprint* scaled along depth, which
  is exactly a BSConv-U kernel ``F[n, m] = W[n, m] * B_n``.
* He et al., "Depth-wise Decomposition for Accelerating Separable Convolutions" (2019), expand a
  regular convolution into a depthwise-separable one by an SVD of each input channel's slice and
  refine the result on real inputs.

Notation. A convolution ``conv`` (``groups == 1``) has the kernel ``F`` [N, M, K_h, K_w];
``K = K_h * K_w``. ``A_n = F[n]`` reshaped to [M, K] is filter ``n``; ``S_m = F[:, m]`` reshaped
to [N, K] is the slice of input channel ``m``. All factorizations run in float64 and the modules
are built in the convolution's device and dtype.

**Data-free (closed form, SVD).**

* BSConv-U: ``A_n ~ s_1 u_1 v_1^T`` (best rank-1 approximation, Eckart-Young). The blueprint is
  ``B_n = v_1`` (unit Frobenius norm, sign chosen so that its largest-magnitude entry is positive;
  ties: the first such entry) and ``W[n, :] = s_1 u_1`` carries the scale and the matching sign.
* BSConv-S: the rank-1 step above, then the truncated SVD ``W ~ U_r S_r V_r^T`` with
  ``r = M'``: ``W2 = U_r S_r`` [N, M'], ``W1 = V_r^T`` [M', M] (orthonormal rows, the fixed point
  of the orthonormal regularization; sign: the largest-magnitude entry of each row of ``W1`` is
  positive). For fixed blueprints the kernel error splits as
  ``||F - F'||^2 = sum_n (||A_n||^2 - s_1(A_n)^2) + ||W - W2 W1||^2``, so this ``W2 W1`` is the
  optimal rank-``M'`` projection given the blueprints.
* Depthwise separable (He et al.): ``S_m ~ sum_{j<r} s_j u_j v_j^T``; the depthwise convolution
  (channel multiplier ``r``) gets the kernels ``v_j`` (unit norm, same sign rule) as its output
  channels ``m*r + j`` and the pointwise convolution gets the columns ``s_j u_j``. Exact for
  ``r = min(N, K)``.

Every function returns a :class:`Decomposition` whose ``kernel_error`` is the relative Frobenius
error ``||F - F'||_F / ||F||_F`` (exact rank-1 kernels: ~1e-16).

**Data-driven refinement.** With inputs of the layer, the target is the layer's *response*, not
its kernel. Everything is computed from second-order statistics of the (padded) input patches
``z = [vec(patch) (M*K), 1]`` gathered batch by batch (:class:`PatchStats`): the Gram matrix of the
patches the converted layer sees, and their cross-Gram with the patches the original layer saw.
The original response is ``y_n = f_n^T z`` (``f_n`` = kernel and bias), so the squared response
error of any candidate is a quadratic form in these Gram matrices and every step below is an
exact least-squares problem solved in float64 (small ridge, bias eliminated by centering):

1. *weighted SVD* (He et al.): per input channel ``m`` with ``X_m = Q R`` the sampled K x K
   patches of channel ``m``, the rank-``r`` SVD of ``R S_m^T`` minimizes that channel's response
   error; the kernels map back with ``R^-1``. For BSConv-U, per filter, the same with the nearest
   Kronecker approximation ``G_chan (x) G_space`` of the patch Gram (the statistics of all
   channels): the rank-1 SVD of ``R_c A_n R_s^T``.
2. *refit* of all pointwise weights (and biases) jointly by least squares on the exact Gram.
3. a few *alternating* least-squares sweeps (blueprints/depthwise kernels given the pointwise
   weights, then the pointwise weights again), each an exact minimization, so the response
   error never increases.
4. the result is compared with the data-free decomposition on the same statistics and the better
   one is kept (per filter for BSConv-U, whose filters are independent), so refinement never
   loses to plain SVD on the data it was given.

For whole models (:func:`convert_trained`) the layers are refitted in execution order on the
inputs produced by the already converted earlier layers, against the original model's responses
(the multi-layer case of He et al.), so errors do not accumulate.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .modules import BSConvS, BSConvU

__all__ = [
    "Decomposition",
    "LayerReport",
    "PatchStats",
    "convert_trained",
    "matching_rank",
    "mid_channels",
    "to_bsconv_s",
    "to_bsconv_u",
    "to_depthwise_separable",
]

_F64 = torch.float64
Inputs = Union[torch.Tensor, Iterable[torch.Tensor]]
#: max elements of one float64 work buffer (patch rows, einsum chunks): 32 MB
_CHUNK = 1 << 22


class Decomposition(NamedTuple):
    """Result of a single-layer conversion (unpacks as ``module, kernel_error, ...``).

    Attributes:
        module: the new block (:class:`BSConvU`, :class:`BSConvS` or ``nn.Sequential(dw, pw)``).
        kernel_error: relative Frobenius error ``||F - F'|| / ||F||`` of its kernel.
        response_error: relative error ``||Y - Y'||_F / ||Y||_F`` of its response on the given
            inputs (``None`` without inputs).
        kernel_error_svd, response_error_svd: the same for the plain SVD decomposition (equal to
            the above without inputs).
    """

    module: nn.Module
    kernel_error: float
    response_error: float | None = None
    kernel_error_svd: float | None = None
    response_error_svd: float | None = None


# --------------------------------------------------------------------------------------------
# helpers: kernel access, sign convention, module construction
# --------------------------------------------------------------------------------------------

def _check_conv(conv: nn.Module, fn: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{fn}: expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"{fn}: only groups=1 convolutions can be decomposed, got "
                         f"groups={conv.groups}")


def _kernel(conv: nn.Conv2d) -> torch.Tensor:
    """Kernel as float64 [N, M, K]."""
    w = conv.weight.detach()
    return w.to(_F64).reshape(w.shape[0], w.shape[1], -1)


def _bias(conv: nn.Conv2d) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias.detach().to(_F64)


def _sign_fix(v: torch.Tensor) -> torch.Tensor:
    """Signs [...] (+-1) that make the largest-magnitude entry of each row of v [..., K]
    positive (first such entry on ties; +1 for zero rows)."""
    idx = v.abs().argmax(dim=-1, keepdim=True)
    s = torch.sign(torch.gather(v, -1, idx)).squeeze(-1)
    return torch.where(s == 0, torch.ones_like(s), s)


def _rel(num2: torch.Tensor | float, den2: torch.Tensor | float) -> float:
    """sqrt(num2 / den2) as a float, 0 for 0 / 0."""
    num2, den2 = float(num2), float(den2)
    if den2 <= 0.0:
        return 0.0 if num2 <= 0.0 else math.inf
    return math.sqrt(max(num2, 0.0) / den2)


def _kernel_error(a: torch.Tensor, a_hat: torch.Tensor) -> float:
    return _rel((a - a_hat).square().sum(), a.square().sum())


def mid_channels(in_channels: int, p: float = 0.25, min_mid_channels: int = 4) -> int:
    """BSConv-S subspace width ``M' = min(M, max(min_mid_channels, ceil(p * M)))``."""
    return min(in_channels, max(min_mid_channels, math.ceil(p * in_channels)))


def _factory(conv: nn.Conv2d) -> dict[str, Any]:
    return {"device": conv.weight.device, "dtype": conv.weight.dtype}


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    return {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation, "padding_mode": conv.padding_mode}


def _copy(param: torch.Tensor | None, value: torch.Tensor | None) -> None:
    if param is not None and value is not None:
        with torch.no_grad():
            param.copy_(value.reshape(param.shape).to(param.dtype))


def _build_u(conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor,
             bias: torch.Tensor | None) -> BSConvU:
    """BSConvU with pw = w [N, M], dw = b [N, K], dw bias = bias [N]."""
    n, m = w.shape
    mod = BSConvU(m, n, bias=conv.bias is not None, **_geometry(conv), **_factory(conv))
    _copy(mod.pw.weight, w)
    _copy(mod.dw.weight, b)
    _copy(mod.dw.bias, bias)
    return mod.train(conv.training)


def _build_s(conv: nn.Conv2d, w1: torch.Tensor, w2: torch.Tensor, b: torch.Tensor,
             bias: torch.Tensor | None, p: float, min_mid_channels: int) -> BSConvS:
    """BSConvS with pw1 = w1 [M', M], pw2 = w2 [N, M'], dw = b [N, K]."""
    n, m = w2.shape[0], w1.shape[1]
    mod = BSConvS(m, n, bias=conv.bias is not None, p=p, min_mid_channels=min_mid_channels,
                  **_geometry(conv), **_factory(conv))
    _copy(mod.pw1.weight, w1)
    _copy(mod.pw2.weight, w2)
    _copy(mod.dw.weight, b)
    _copy(mod.dw.bias, bias)
    return mod.train(conv.training)


def _build_dsc(conv: nn.Conv2d, d: torch.Tensor, pw: torch.Tensor,
               bias: torch.Tensor | None) -> nn.Sequential:
    """nn.Sequential(dw, pw): depthwise kernels d [M, r, K] (output channel m*r + j), pointwise
    pw [N, M, r]."""
    m, r, _ = d.shape
    n = pw.shape[0]
    fac = _factory(conv)
    dw = nn.Conv2d(m, m * r, groups=m, bias=False, **_geometry(conv), **fac)
    pwc = nn.Conv2d(m * r, n, kernel_size=1, bias=conv.bias is not None, **fac)
    _copy(dw.weight, d)
    _copy(pwc.weight, pw)
    _copy(pwc.bias, bias)
    return nn.Sequential(OrderedDict([("dw", dw), ("pw", pwc)])).train(conv.training)


# --------------------------------------------------------------------------------------------
# data-free factorizations (float64)
# --------------------------------------------------------------------------------------------

def _rank1(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation of every filter a [N, M, K] -> (w [N, M], b [N, K]), b unit
    norm with its largest-|.| entry positive."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    b = vh[:, 0, :]
    w = u[:, :, 0] * s[:, :1]
    sg = _sign_fix(b)
    return w * sg[:, None], b * sg[:, None]


def _subspace(w: torch.Tensor, mid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of w [N, M] to rank ``mid`` -> (w2 [N, mid], w1 [mid, M]), rows of w1
    orthonormal (completed with null-space directions and zero columns of w2 if mid >
    min(N, M))."""
    n, m = w.shape
    u, s, vh = torch.linalg.svd(w, full_matrices=True)
    w1 = vh[:mid].clone()
    k = min(mid, n, m)
    w2 = torch.zeros(n, mid, dtype=w.dtype, device=w.device)
    w2[:, :k] = u[:, :k] * s[:k]
    sg = _sign_fix(w1)
    return w2 * sg, w1 * sg[:, None]


def _dsc(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r SVD of every input channel's slice a[:, m] [N, K] -> (d [M, r, K] unit-norm
    depthwise kernels, p [N, M, r] pointwise weights)."""
    sl = a.permute(1, 0, 2)  # [M, N, K]
    u, s, vh = torch.linalg.svd(sl, full_matrices=False)
    d = vh[:, :r, :]
    p = u[:, :, :r] * s[:, None, :r]  # [M, N, r]
    sg = _sign_fix(d)  # [M, r]
    return d * sg[:, :, None], (p * sg[:, None, :]).permute(1, 0, 2)


def _kernel_u(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return w[:, :, None] * b[:, None, :]


def _kernel_dsc(d: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nmj,mjk->nmk", p, d)


def _normalize_rows(b: torch.Tensor, w: torch.Tensor, dim_w: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescales rows of b [..., K] to unit norm with the largest-|.| entry positive; the inverse
    scale goes into w along ``dim_w`` (w broadcastable after unsqueeze)."""
    nrm = b.norm(dim=-1)
    nrm = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    sg = _sign_fix(b)
    f = nrm * sg
    return b / f[..., None], w * f.unsqueeze(dim_w)


# --------------------------------------------------------------------------------------------
# patch statistics
# --------------------------------------------------------------------------------------------

def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches of ``conv`` as float64 rows [B * L, M * K] (channel-major like the kernel),
    padding applied exactly as the layer does (any padding mode, "same" included)."""
    x = x.detach().to(_F64)
    pad = tuple(conv._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class PatchStats:
    """Second-order statistics of a convolution's input patches ``z = [vec(patch), 1]`` (D =
    M*K + 1 entries; patches as the layer sees them, padding included).

    ``z_a`` are the patches the converted layer will see, ``z_b`` the ones the original layer saw
    (its target responses are ``f^T z_b``); ``d = z_a - z_b``. Kept in this difference form so
    that small response errors are not lost to cancellation.

    Attributes:
        aa: [D, D] ``sum z_a z_a^T``.
        ad: [D, D] ``sum z_a d^T`` (``None`` when z_b = z_a, i.e. not paired).
        dd: [D, D] ``sum d d^T`` (``None`` when not paired).
        rows: number of patches (= batch * output pixels).
    """

    aa: torch.Tensor
    ad: torch.Tensor | None = None
    dd: torch.Tensor | None = None
    rows: int = 0

    @classmethod
    def empty(cls, conv: nn.Conv2d, paired: bool) -> PatchStats:
        d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
        aa = torch.zeros(d, d, dtype=_F64, device=conv.weight.device)
        if not paired:
            return cls(aa)
        return cls(aa, torch.zeros_like(aa), torch.zeros_like(aa))

    @property
    def paired(self) -> bool:
        return self.ad is not None

    @property
    def ab(self) -> torch.Tensor:
        """[D, D] ``sum z_a z_b^T``."""
        return self.aa if self.ad is None else self.aa - self.ad

    @property
    def bb(self) -> torch.Tensor:
        """[D, D] ``sum z_b z_b^T``."""
        if self.ad is None or self.dd is None:
            return self.aa
        return self.aa - self.ad - self.ad.T + self.dd

    def update(self, conv: nn.Conv2d, x: torch.Tensor, x_target: torch.Tensor | None = None
               ) -> None:
        """Adds a batch x [B, M, H, W] (and, if paired, the matching original inputs
        x_target of the same shape)."""
        if self.paired != (x_target is not None):
            raise ValueError("PatchStats.update: pass x_target exactly when the statistics were "
                             "created paired")
        if x_target is not None and x_target.shape != x.shape:
            raise ValueError(f"PatchStats.update: x {tuple(x.shape)} and x_target "
                             f"{tuple(x_target.shape)} differ in shape")
        per_sample = max(1, x[:1].numel() * conv.kernel_size[0] * conv.kernel_size[1])
        step = max(1, _CHUNK // per_sample)
        for i in range(0, x.shape[0], step):
            za = _augment(_patches(conv, x[i:i + step]))
            self.aa += za.T @ za
            if x_target is not None and self.ad is not None and self.dd is not None:
                dz = za - _augment(_patches(conv, x_target[i:i + step]))
                self.ad += za.T @ dz
                self.dd += dz.T @ dz
            self.rows += za.shape[0]

    @classmethod
    def collect(cls, conv: nn.Conv2d, inputs: Inputs, target_inputs: Inputs | None = None
                ) -> PatchStats:
        """Statistics of ``inputs`` (a tensor [B, M, H, W] or an iterable of them) and, if
        given, the matching ``target_inputs`` (what the original layer saw, same shapes)."""
        xs = _as_batches(inputs)
        ts = None if target_inputs is None else _as_batches(target_inputs)
        st = cls.empty(conv, paired=ts is not None)
        if ts is None:
            for x in xs:
                st.update(conv, x)
        else:
            if len(ts) != len(xs):
                raise ValueError("PatchStats.collect: inputs and target_inputs differ in length")
            for x, t in zip(xs, ts):
                st.update(conv, x, t)
        if st.rows == 0:
            raise ValueError("PatchStats.collect: no inputs")
        return st


def _augment(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)


def _as_batches(inputs: Inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return list(inputs)


class _Problem:
    """The least-squares view of one layer: kernel (and bias) ``fo`` [N, D] of the original and
    the statistics. Everything float64."""

    def __init__(self, conv: nn.Conv2d, stats: PatchStats, ridge: float) -> None:
        a = _kernel(conv)
        self.n, self.m, self.k = a.shape
        self.a = a
        bias = _bias(conv)
        self.has_bias = bias is not None
        self.fo = torch.cat([a.reshape(self.n, -1), (bias if bias is not None
                             else torch.zeros(self.n, dtype=_F64, device=a.device))[:, None]], 1)
        self.stats = stats
        self.ridge = ridge
        mk = self.m * self.k
        aa = stats.aa
        t = stats.ab @ self.fo.T  # [D, N]: sum_p z_a(p) y_n(p)
        c, c1, rows = aa[:mk, :mk], aa[:mk, mk], aa[mk, mk]
        tz, t1 = t[:mk], t[mk]
        self.c1, self.t1, self.rows = c1, t1, rows
        if self.has_bias:  # the free bias is eliminated by centering
            c = c - torch.outer(c1, c1) / rows
            tz = tz - torch.outer(c1, t1) / rows
        self.c4 = c.reshape(self.m, self.k, self.m, self.k)
        self.t3 = tz.reshape(self.m, self.k, self.n)
        # ||y_n||^2
        self.y2 = torch.einsum("nd,de,ne->n", self.fo, stats.bb, self.fo)

    def bias_for(self, g: torch.Tensor) -> torch.Tensor | None:
        """Optimal bias [N] for kernels g [N, M*K] (None if the layer has none)."""
        if not self.has_bias:
            return None
        return (self.t1 - g @ self.c1) / self.rows

    def errors(self, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Squared response errors [N] of kernels g [N, M*K] with bias [N] (or None):
        ``||Z_a g - Z_b f||^2 = e^T aa e + 2 e^T ad f + f^T dd f`` with e = g - f."""
        ga = torch.cat([g, (bias if bias is not None else torch.zeros_like(g[:, 0]))[:, None]],
                       1)
        st = self.stats
        e = ga - self.fo
        err = torch.einsum("nd,de,ne->n", e, st.aa, e)
        if st.ad is not None and st.dd is not None:
            err = (err + 2.0 * torch.einsum("nd,de,ne->n", e, st.ad, self.fo)
                   + torch.einsum("nd,de,ne->n", self.fo, st.dd, self.fo))
        return err.clamp_min(0.0)

    def rel_error(self, g: torch.Tensor, bias: torch.Tensor | None) -> float:
        return _rel(self.errors(g, bias).sum(), self.y2.sum())

    def solve(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Ridge least squares (h + lam I) x = r for a batch h [..., d, d], r [..., d, q];
        lam = ridge * mean(diag h) per problem."""
        d = h.shape[-1]
        lam = self.ridge * torch.diagonal(h, dim1=-2, dim2=-1).mean(-1)
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        hh = h + lam[..., None, None] * torch.eye(d, dtype=h.dtype, device=h.device)
        try:
            return torch.cholesky_solve(r, torch.linalg.cholesky(hh))
        except RuntimeError:  # pragma: no cover  (numerically indefinite; fall back)
            return torch.linalg.lstsq(hh, r).solution


def _chunks(total: int, per_item: int) -> Iterator[slice]:
    step = max(1, _CHUNK // max(1, per_item))
    for i in range(0, total, step):
        yield slice(i, min(total, i + step))


def _root(g: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Square root of a symmetric PSD g [..., d, d]: (R, R^-1) with R^T R = g + lam I, R = R^T
    (eigenvalues clamped at lam = max(ridge, 1e-10) * mean eigenvalue, so the inverse exists)."""
    g = 0.5 * (g + g.mT)
    ev, q = torch.linalg.eigh(g)
    mean = ev.clamp_min(0).mean(-1, keepdim=True)
    floor = torch.where(mean > 0, max(ridge, 1e-10) * mean, torch.ones_like(mean))
    s = (ev.clamp_min(0) + floor).sqrt()
    return (q * s[..., None, :]) @ q.mT, (q / s[..., None, :]) @ q.mT


# --- BSConv-U -------------------------------------------------------------------------------

def _u_w_step(pb: _Problem, b: torch.Tensor) -> torch.Tensor:
    """Optimal pointwise rows w [N, M] for fixed blueprints b [N, K]."""
    out = torch.empty(pb.n, pb.m, dtype=_F64, device=b.device)
    for sl in _chunks(pb.n, pb.m * pb.m * pb.k):
        bc = b[sl]
        tmp = torch.einsum("akbl,nl->nakb", pb.c4, bc)
        h = torch.einsum("nakb,nk->nab", tmp, bc)
        r = torch.einsum("akn,nk->na", pb.t3[:, :, sl], bc)
        out[sl] = pb.solve(h, r[..., None])[..., 0]
    return out


def _u_b_step(pb: _Problem, w: torch.Tensor) -> torch.Tensor:
    """Optimal (unnormalized) blueprints b [N, K] for fixed pointwise rows w [N, M]."""
    out = torch.empty(pb.n, pb.k, dtype=_F64, device=w.device)
    for sl in _chunks(pb.n, pb.m * pb.k * pb.k):
        wc = w[sl]
        tmp = torch.einsum("akbl,nb->nakl", pb.c4, wc)
        h = torch.einsum("nakl,na->nkl", tmp, wc)
        r = torch.einsum("akn,na->nk", pb.t3[:, :, sl], wc)
        out[sl] = pb.solve(h, r[..., None])[..., 0]
    return out


def _kron_factors(c4: torch.Tensor, iters: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest Kronecker product ``C ~ G_chan (x) G_space`` of the patch Gram c4 [M, K, M, K]
    (Van Loan-Pitsianis: the leading singular pair of the rearranged matrix, by power
    iteration). Returns (G_chan [M, M], G_space [K, K]), both symmetric PSD up to round-off."""
    m, k = c4.shape[0], c4.shape[1]
    rc = c4.permute(0, 2, 1, 3).reshape(m * m, k * k)
    gs = torch.einsum("akal->kl", c4)  # start: channel-averaged spatial Gram
    gc = rc @ gs.reshape(-1)
    for _ in range(iters):
        gs = rc.T @ gc
        gs = gs / gs.norm().clamp_min(1e-300)
        gc = rc @ gs
    gc, gs = gc.reshape(m, m), gs.reshape(k, k)
    if torch.trace(gs) < 0:
        gc, gs = -gc, -gs
    return 0.5 * (gc + gc.T), 0.5 * (gs + gs.T)


def _u_weighted_init(pb: _Problem) -> torch.Tensor:
    """Blueprints [N, K] from the rank-1 SVD of R_c A_n R_s^T (Kronecker-weighted)."""
    gc, gs = _kron_factors(pb.c4)
    rc, _ = _root(gc, pb.ridge)
    rs, rs_inv = _root(gs, pb.ridge)
    _, vs = _rank1(rc @ pb.a @ rs)  # R symmetric: R_c A_n R_s^T
    return vs @ rs_inv  # rows R_s^-1 v_n


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def _u_refine(pb: _Problem, w0: torch.Tensor, b0: torch.Tensor, iters: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Data-driven BSConv-U: returns (w [N, M], b [N, K] unit norm, bias [N] or None).

    Candidates: the data-free factors; then from each of the data-free and the weighted-SVD
    blueprints, the least-squares projection and ``iters`` alternating sweeps. Filters are
    independent, so the best candidate is picked per filter."""
    cands: list[tuple[torch.Tensor, torch.Tensor]] = [(w0, b0)]
    for b in (b0, _unit(_u_weighted_init(pb))):
        w = _u_w_step(pb, b)
        cands.append((w, b))
        for _ in range(iters):
            b = _unit(_u_b_step(pb, w))
            w = _u_w_step(pb, b)
        if iters:
            cands.append((w, b))
    errs = torch.stack([pb.errors(_kernel_u(cw, cb).reshape(pb.n, -1),
                                  pb.bias_for(_kernel_u(cw, cb).reshape(pb.n, -1)))
                        for cw, cb in cands])  # [C, N]
    best = errs.argmin(0)
    idx = torch.arange(pb.n, device=best.device)
    w = torch.stack([c[0] for c in cands])[best, idx]
    b = torch.stack([c[1] for c in cands])[best, idx]
    b, w = _normalize_rows(b, w, dim_w=-1)
    return w, b, pb.bias_for(_kernel_u(w, b).reshape(pb.n, -1))


# --- BSConv-S -------------------------------------------------------------------------------

def _s_features(pb: _Problem, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-filter Gram h [N, M, M] and right-hand side r [N, M] of the features
    t_n = (B_n . Z_m)_m."""
    h = torch.empty(pb.n, pb.m, pb.m, dtype=_F64, device=b.device)
    for sl in _chunks(pb.n, pb.m * pb.m * pb.k):
        bc = b[sl]
        tmp = torch.einsum("akbl,nl->nakb", pb.c4, bc)
        h[sl] = torch.einsum("nakb,nk->nab", tmp, bc)
    r = torch.einsum("akn,nk->na", pb.t3, b)
    return h, r


def _orthonormalize(w2: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product w2 @ w1 with orthonormal rows of w1 (QR of w1^T) and the sign rule."""
    q, r = torch.linalg.qr(w1.T)  # w1^T = q r
    w1n, w2n = q.T, w2 @ r.T
    sg = _sign_fix(w1n)
    return w2n * sg, w1n * sg[:, None]


def _s_w2_step(pb: _Problem, h: torch.Tensor, r: torch.Tensor, w1: torch.Tensor
               ) -> torch.Tensor:
    hh = w1 @ h @ w1.T  # [N, M', M']
    rr = r @ w1.T  # [N, M']
    return pb.solve(hh, rr[..., None])[..., 0]


def _s_w1_step(pb: _Problem, h: torch.Tensor, r: torch.Tensor, w2: torch.Tensor
               ) -> torch.Tensor | None:
    """Optimal shared w1 [M', M] for fixed w2 and blueprints (None when too large)."""
    mid = w2.shape[1]
    d = mid * pb.m
    if d > 4096:
        return None
    big = torch.einsum("nj,nq,nab->jaqb", w2, w2, h).reshape(d, d)
    rhs = torch.einsum("nj,na->ja", w2, r).reshape(d, 1)
    return pb.solve(big, rhs).reshape(mid, pb.m)


def _s_refine(pb: _Problem, w0: torch.Tensor, b0: torch.Tensor, mid: int, iters: int,
              free: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Data-driven BSConv-S from refined BSConv-U blueprints b0 / rows w0. Returns
    (w1 [M', M], w2 [N, M'], b [N, K], bias)."""
    b = b0
    h, r = _s_features(pb, b)
    # weighted subspace: min sum_n (w_n - w'_n)^T H (w_n - w'_n), H = mean_n H_n = L L^T
    lo, lo_inv = _root(h.mean(0), pb.ridge)  # H = L L^T, L symmetric
    u, s, vh = torch.linalg.svd(w0 @ lo, full_matrices=True)
    k = min(mid, *w0.shape)
    w1 = vh[:mid] @ lo_inv  # V^T L^-1
    w2 = torch.zeros(pb.n, mid, dtype=_F64, device=w0.device)
    w2[:, :k] = u[:, :k] * s[:k]
    w2, w1 = _orthonormalize(w2, w1)
    w2 = _s_w2_step(pb, h, r, w1)
    for _ in range(iters):
        b = _unit(_u_b_step(pb, w2 @ w1))
        h, r = _s_features(pb, b)
        w1n = _s_w1_step(pb, h, r, w2)
        if w1n is not None:
            w2, w1 = _orthonormalize(w2, w1n)
        w2 = _s_w2_step(pb, h, r, w1)
    # keep the better of this and the data-free decomposition (with and without a refit)
    fw1, fw2, fb = free
    hf, rf = _s_features(pb, fb)
    cands = [(fw1, fw2, fb), (fw1, _s_w2_step(pb, hf, rf, fw1), fb), (w1, w2, b)]
    errs = []
    for cw1, cw2, cb in cands:
        g = _kernel_u(cw2 @ cw1, cb).reshape(pb.n, -1)
        errs.append(float(pb.errors(g, pb.bias_for(g)).sum()))
    w1, w2, b = cands[min(range(len(cands)), key=errs.__getitem__)]
    b, w2 = _normalize_rows(b, w2, dim_w=-1)
    return w1, w2, b, pb.bias_for(_kernel_u(w2 @ w1, b).reshape(pb.n, -1))


# --- depthwise separable --------------------------------------------------------------------

def _dsc_p_step(pb: _Problem, d: torch.Tensor) -> torch.Tensor:
    """Optimal pointwise weights p [N, M, r] (all jointly) for depthwise kernels d [M, r, K]."""
    m, r, _ = d.shape
    tmp = torch.einsum("ajk,akbl->ajbl", d, pb.c4)
    h = torch.einsum("ajbl,bql->ajbq", tmp, d).reshape(m * r, m * r)
    rhs = torch.einsum("ajk,akn->ajn", d, pb.t3).reshape(m * r, pb.n)
    return pb.solve(h, rhs).T.reshape(pb.n, m, r)


def _dsc_d_step(pb: _Problem, p: torch.Tensor) -> torch.Tensor | None:
    """Optimal depthwise kernels d [M, r, K] (all jointly) for pointwise weights p [N, M, r]
    (None when the system is too large)."""
    _, m, r = p.shape
    d = m * r * pb.k
    if d > 6144:
        return None
    ptp = torch.einsum("naj,nbq->ajbq", p, p)
    big = torch.einsum("ajbq,akbl->ajkbql", ptp, pb.c4).reshape(d, d)
    rhs = torch.einsum("naj,akn->ajk", p, pb.t3).reshape(d, 1)
    return pb.solve(big, rhs).reshape(m, r, pb.k)


def _dsc_weighted_init(pb: _Problem, r: int) -> torch.Tensor:
    """Depthwise kernels [M, r, K]: per channel m, rank-r SVD of R_m S_m^T (He et al.)."""
    g = torch.einsum("akal->akl", pb.c4)  # [M, K, K]: per-channel patch Gram
    rr, rr_inv = _root(g, pb.ridge)  # [M, K, K]
    u, _, _ = torch.linalg.svd(rr @ pb.a.permute(1, 2, 0), full_matrices=False)  # R_m S_m^T
    return (rr_inv @ u[:, :, :r]).transpose(1, 2)  # [M, r, K]: R_m^-1 u_j


def _dsc_refine(pb: _Problem, d0: torch.Tensor, p0: torch.Tensor, iters: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Data-driven depthwise-separable factors (d [M, r, K] unit norm, p [N, M, r], bias):
    the best of the data-free factors and, from each of the data-free and the weighted-SVD
    depthwise kernels, the joint pointwise refit followed by ``iters`` alternating sweeps."""
    r = d0.shape[1]
    cands = [(d0, p0)]
    for d in (d0, _unit(_dsc_weighted_init(pb, r))):
        p = _dsc_p_step(pb, d)
        cands.append((d, p))
        for _ in range(iters):
            dn = _dsc_d_step(pb, p)
            if dn is None:
                break
            d = _unit(dn)
            p = _dsc_p_step(pb, d)
        cands.append((d, p))
    errs = []
    for cd, cp in cands:
        g = _kernel_dsc(cd, cp).reshape(pb.n, -1)
        errs.append(float(pb.errors(g, pb.bias_for(g)).sum()))
    d, p = cands[min(range(len(cands)), key=errs.__getitem__)]
    d, p = _normalize_rows(d, p, dim_w=0)
    return d, p, pb.bias_for(_kernel_dsc(d, p).reshape(pb.n, -1))


# --------------------------------------------------------------------------------------------
# public single-layer API
# --------------------------------------------------------------------------------------------

def _stats_for(conv: nn.Conv2d, inputs: Inputs | None, target_inputs: Inputs | None,
               stats: PatchStats | None) -> PatchStats | None:
    if stats is not None:
        return stats
    if inputs is None:
        if target_inputs is not None:
            raise ValueError("target_inputs needs inputs")
        return None
    return PatchStats.collect(conv, inputs, target_inputs)


def _resp(pb: _Problem | None, kern: torch.Tensor, bias: torch.Tensor | None) -> float | None:
    """Response error of kernel [N, M, K] with the given bias (no refit)."""
    if pb is None:
        return None
    b = bias if bias is not None else None
    return pb.rel_error(kern.reshape(pb.n, -1), b if pb.has_bias else None)


def to_bsconv_u(
    conv: nn.Conv2d,
    *,
    inputs: Inputs | None = None,
    target_inputs: Inputs | None = None,
    stats: PatchStats | None = None,
    ridge: float = 1e-6,
    iters: int = 10,
) -> Decomposition:
    """Converts a trained ``conv`` (weight [N, M, K_h, K_w], groups=1) into a :class:`BSConvU`.

    Data-free: per filter the best rank-1 approximation ``A_n ~ W[n, :]^T B_n`` (blueprint
    ``B_n`` = dw weight [N, 1, K_h, K_w] with unit norm and its largest-|.| entry positive; the
    scale in ``W`` = pw weight [N, M, 1, 1]). Stride, padding (incl. "same"), dilation,
    padding_mode, bias (moved to the depthwise convolution), device, dtype and training mode are
    carried over.

    With ``inputs`` (tensor [B, M, H, W] or iterable of them; optionally ``target_inputs``, the
    inputs the original layer saw, e.g. from an unconverted model), or precomputed ``stats``, the
    blueprints, projection and bias are refined to minimize the response error (module docs);
    ``ridge`` is the relative ridge of the least-squares steps, ``iters`` the number of
    alternating sweeps.

    Returns a :class:`Decomposition` ``(module, kernel_error, response_error, ...)``.
    """
    _check_conv(conv, "to_bsconv_u")
    a = _kernel(conv)
    w, b = _rank1(a)
    kern_svd = _kernel_u(w, b)
    err_svd = _kernel_error(a, kern_svd)
    bias = _bias(conv)
    st = _stats_for(conv, inputs, target_inputs, stats)
    if st is None:
        return Decomposition(_build_u(conv, w, b, bias), err_svd, None, err_svd, None)
    pb = _Problem(conv, st, ridge)
    resp_svd = _resp(pb, kern_svd, bias)
    w, b, bias = _u_refine(pb, w, b, iters)
    kern = _kernel_u(w, b)
    return Decomposition(_build_u(conv, w, b, bias), _kernel_error(a, kern),
                         _resp(pb, kern, bias), err_svd, resp_svd)


def to_bsconv_s(
    conv: nn.Conv2d,
    p: float = 0.25,
    min_mid_channels: int = 4,
    *,
    inputs: Inputs | None = None,
    target_inputs: Inputs | None = None,
    stats: PatchStats | None = None,
    ridge: float = 1e-6,
    iters: int = 10,
) -> Decomposition:
    """Converts a trained ``conv`` into a :class:`BSConvS` with ``M' = mid_channels(M, p,
    min_mid_channels)``.

    Data-free: the BSConv-U factorization, then the truncated SVD of W [N, M] to rank M':
    ``W2 = U S`` (pw2 weight [N, M', 1, 1]), ``W1 = V^T`` (pw1 weight [M', M, 1, 1], orthonormal
    rows). Data-driven refinement as :func:`to_bsconv_u` (the subspace from an SVD weighted by
    the mean projected-feature Gram, then alternating least squares over the blueprints, W1 and
    W2; W1 is re-orthonormalized after each step without changing ``W2 W1``).
    """
    _check_conv(conv, "to_bsconv_s")
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"to_bsconv_s: p must be in [0, 1], got {p!r}")
    a = _kernel(conv)
    mid = mid_channels(a.shape[1], p, min_mid_channels)
    if mid < 1:
        raise ValueError(f"to_bsconv_s: the subspace has {mid} channels; it needs at least one")
    w, b = _rank1(a)
    w2, w1 = _subspace(w, mid)
    kern_svd = _kernel_u(w2 @ w1, b)
    err_svd = _kernel_error(a, kern_svd)
    bias = _bias(conv)
    st = _stats_for(conv, inputs, target_inputs, stats)
    if st is None:
        return Decomposition(_build_s(conv, w1, w2, b, bias, p, min_mid_channels), err_svd,
                             None, err_svd, None)
    pb = _Problem(conv, st, ridge)
    resp_svd = _resp(pb, kern_svd, bias)
    wu, bu, _ = _u_refine(pb, w, b, iters)
    w1r, w2r, br, bias_r = _s_refine(pb, wu, bu, mid, iters, (w1, w2, b))
    kern = _kernel_u(w2r @ w1r, br)
    return Decomposition(_build_s(conv, w1r, w2r, br, bias_r, p, min_mid_channels),
                         _kernel_error(a, kern), _resp(pb, kern, bias_r), err_svd, resp_svd)


def to_depthwise_separable(
    conv: nn.Conv2d,
    rank: int = 1,
    *,
    inputs: Inputs | None = None,
    target_inputs: Inputs | None = None,
    stats: PatchStats | None = None,
    ridge: float = 1e-6,
    iters: int = 10,
) -> Decomposition:
    """Depth-wise decomposition (He et al., 2019) of ``conv`` into ``nn.Sequential(dw, pw)``.

    ``dw``: ``nn.Conv2d(M, M * rank, K, groups=M, bias=False)`` with the conv's stride, padding,
    dilation and padding_mode; output channel ``m * rank + j`` holds the j-th right singular
    vector of the slice F[:, m] [N, K] (unit norm, largest-|.| entry positive). ``pw``:
    ``nn.Conv2d(M * rank, N, 1)`` with the columns ``s_j u_j`` and the conv's bias. Exact for
    ``rank = min(N, K)``; ``1 <= rank <= min(N, K)``.

    Data-driven refinement as :func:`to_bsconv_u`: per-channel weighted SVD, joint least-squares
    refit of the pointwise weights, alternating sweeps over all depthwise kernels jointly.
    """
    _check_conv(conv, "to_depthwise_separable")
    a = _kernel(conv)
    n, _, k = a.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, k):
        raise ValueError(f"to_depthwise_separable: rank must be an int in [1, min(N, K)] = "
                         f"[1, {min(n, k)}], got {rank!r}")
    d, pw = _dsc(a, rank)
    kern_svd = _kernel_dsc(d, pw)
    err_svd = _kernel_error(a, kern_svd)
    bias = _bias(conv)
    st = _stats_for(conv, inputs, target_inputs, stats)
    if st is None:
        return Decomposition(_build_dsc(conv, d, pw, bias), err_svd, None, err_svd, None)
    pb = _Problem(conv, st, ridge)
    resp_svd = _resp(pb, kern_svd, bias)
    d, pw, bias = _dsc_refine(pb, d, pw, iters)
    kern = _kernel_dsc(d, pw)
    return Decomposition(_build_dsc(conv, d, pw, bias), _kernel_error(a, kern),
                         _resp(pb, kern, bias), err_svd, resp_svd)


# --------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------

def matching_rank(conv: nn.Conv2d) -> int:
    """Smallest depthwise-separable rank r whose MACs are at least BSConv-U's for ``conv``:
    BSConv-U costs ``H W N M + Ho Wo N K``, rank-r DSC ``Ho Wo r M (K + N)``, with
    ``H W ~ Ho Wo * stride_h * stride_w``. Clipped to [1, min(N, K)]."""
    n, m = conv.out_channels, conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    s = conv.stride[0] * conv.stride[1]
    r = math.ceil((s * n * m + n * k) / (m * (k + n)) - 1e-12)
    return max(1, min(r, n, k))


@dataclass
class LayerReport:
    """One converted layer.

    ``kernel_error`` / ``response_error`` describe the returned block; the ``_svd`` fields the
    plain SVD decomposition. Response errors are relative (``||Y - Y'||_F / ||Y||_F`` against the
    original model's responses, on the inputs produced by the converted earlier layers);
    ``None`` without data. MACs are per sample (``None`` without data); ``rank`` is the DSC rank,
    M' for BSConv-S and 1 for BSConv-U.
    """

    name: str
    variant: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    rank: int
    kernel_error: float
    kernel_error_svd: float
    response_error: float | None = None
    response_error_svd: float | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _macs(conv: nn.Conv2d, variant: str, rank: int, hw: tuple[int, int, int, int]
          ) -> tuple[int, int]:
    h, w, ho, wo = hw
    n, m = conv.out_channels, conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    before = ho * wo * n * m * k
    if variant == "u":
        after = h * w * n * m + ho * wo * n * k
    elif variant == "s":
        after = h * w * (rank * m + n * rank) + ho * wo * n * k
    else:
        after = ho * wo * rank * m * (k + n)
    return before, after


def _eligible(model: nn.Module, kernel_sizes: Sequence[Any], exclude: Iterable[str]
              ) -> list[tuple[str, nn.Conv2d]]:
    sizes = {(k, k) if isinstance(k, int) else tuple(k) for k in kernel_sizes}
    excl = set(exclude)
    inside_bsconv: set[str] = set()
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (BSConvU, BSConvS)):
            inside_bsconv.add(name + "." if name else "")
            continue
        if any(name.startswith(p) for p in inside_bsconv) or name in excl:
            continue
        if (isinstance(mod, nn.Conv2d) and mod.groups == 1
                and tuple(mod.kernel_size) in sizes):
            out.append((name, mod))
    return out


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replaces every reference to ``old`` among the submodules of ``model``."""
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


class _Capture:
    """Forward pre-hook collecting the inputs of one module (every call)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _mod: nn.Module, args: tuple[Any, ...]) -> None:
        self.inputs.append(args[0].detach())

    def remove(self) -> None:
        self.handle.remove()


def _batch_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("convert_trained: each batch of data must be a tensor or a tuple/list whose "
                    f"first element is the input tensor, got {type(batch).__name__}")


def _run(model: nn.Module, x: torch.Tensor, device: torch.device | None) -> None:
    model(x.to(device) if device is not None else x)


def convert_trained(
    model: nn.Module,
    variant: str = "u",
    data: Iterable[Any] | None = None,
    kernel_sizes: Sequence[int | tuple[int, int]] = (3, 5),
    *,
    rank: int | str | Callable[[nn.Conv2d], int] = 1,
    p: float = 0.25,
    min_mid_channels: int = 4,
    exclude: Iterable[str] = (),
    refine: bool = True,
    ridge: float = 1e-6,
    iters: int = 10,
    max_batches: int | None = None,
    inplace: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, list[LayerReport]]:
    """Converts every eligible convolution of a trained model.

    Eligible: ``nn.Conv2d`` (subclasses included) with ``groups == 1`` whose kernel size is in
    ``kernel_sizes`` (ints mean square kernels, pairs are (K_h, K_w)), not inside a BSConv block
    and whose qualified name is not in ``exclude`` (e.g. the stem conv on RGB input).

    Args:
        model: the trained model (copied unless ``inplace``).
        variant: ``"u"`` (:class:`BSConvU`), ``"s"`` (:class:`BSConvS`) or ``"dsc"``
            (``nn.Sequential(dw, pw)``).
        data: optional re-iterable batches (tensors, or tuples/lists with the input first, as a
            DataLoader yields) of real inputs. With data, layers are processed in execution
            order: each is refitted (``refine``) on the inputs produced by the already converted
            layers against the original model's responses, and response errors and MACs are
            reported. Unreached convs are converted data-free.
        rank: DSC rank: an int, ``"match"`` (:func:`matching_rank`, per layer) or a callable
            ``conv -> int``.
        p, min_mid_channels: BSConv-S subspace width.
        refine: with data, refit (True) or only measure the plain SVD decomposition (False).
        ridge, iters: of the least-squares refinement (see :func:`to_bsconv_u`).
        max_batches: use at most this many batches of ``data``.
        progress: optional callback receiving one line per converted layer.

    Returns:
        ``(model, reports)``: the converted model (same training mode as given) and one
        :class:`LayerReport` per converted layer, in processing order.
    """
    if variant not in ("u", "s", "dsc"):
        raise ValueError(f"convert_trained: variant must be 'u', 's' or 'dsc', got {variant!r}")
    if isinstance(rank, str) and rank != "match":
        raise ValueError(f"convert_trained: rank must be an int, 'match' or a callable, got "
                         f"{rank!r}")
    ref = model
    if not inplace:
        model = copy.deepcopy(model)
    elif data is not None:
        ref = copy.deepcopy(model)
    todo = _eligible(model, kernel_sizes, exclude)
    ref_mods = dict(ref.named_modules())

    batches: list[torch.Tensor] | None = None
    hw: dict[int, tuple[int, int, int, int]] = {}
    modes = {m: m.training for net in (model, ref) for m in net.modules()}
    device = next((q.device for q in model.parameters()), None)
    if data is not None:
        batches = []
        for i, bt in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            batches.append(_batch_input(bt))
        if not batches:
            raise ValueError("convert_trained: data yielded no batches")
        # execution order and spatial sizes from one pass
        order: list[int] = []

        def rec(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if id(mod) not in hw:
                order.append(id(mod))
                x = args[0]
                hw[id(mod)] = (x.shape[-2], x.shape[-1], out.shape[-2], out.shape[-1])

        handles = [c.register_forward_hook(rec) for _, c in todo]
        model.eval()
        try:
            with torch.no_grad():
                _run(model, batches[0], device)
        finally:
            for hd in handles:
                hd.remove()
        pos = {i: k for k, i in enumerate(order)}
        todo.sort(key=lambda t: pos.get(id(t[1]), len(pos)))
        ref.eval()

    reports: list[LayerReport] = []
    try:
        for name, conv in todo:
            if variant == "dsc":
                if rank == "match":
                    r = matching_rank(conv)
                elif callable(rank):
                    r = int(rank(conv))
                else:
                    r = int(rank)
                r = max(1, min(r, conv.out_channels,
                               conv.kernel_size[0] * conv.kernel_size[1]))
            elif variant == "s":
                r = mid_channels(conv.in_channels, p, min_mid_channels)
            else:
                r = 1
            st = None
            if batches is not None and id(conv) in hw:
                ref_conv = ref_mods[name]
                st = PatchStats.empty(conv, paired=True)
                cap_a, cap_b = _Capture(conv), _Capture(ref_conv)
                try:
                    with torch.no_grad():
                        for x in batches:
                            _run(model, x, device)
                            _run(ref, x, device)
                            for xa, xb in zip(cap_a.inputs, cap_b.inputs):
                                st.update(conv, xa, xb)
                            cap_a.inputs.clear()
                            cap_b.inputs.clear()
                finally:
                    cap_a.remove()
                    cap_b.remove()
            kw: dict[str, Any] = {"ridge": ridge, "iters": iters}
            if st is not None and refine:
                kw["stats"] = st
            if variant == "u":
                res = to_bsconv_u(conv, **kw)
            elif variant == "s":
                res = to_bsconv_s(conv, p, min_mid_channels, **kw)
            else:
                res = to_depthwise_separable(conv, r, **kw)
            resp = res.response_error
            resp_svd = res.response_error_svd
            if st is not None and not refine:
                pb = _Problem(conv, st, ridge)
                resp = resp_svd = _resp(pb, _module_kernel(res.module, variant), _bias(conv))
            macs_b = macs_a = None
            if id(conv) in hw:
                macs_b, macs_a = _macs(conv, variant, r, hw[id(conv)])
            rep = LayerReport(
                name=name, variant=variant, in_channels=conv.in_channels,
                out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size), rank=r,
                kernel_error=res.kernel_error,
                kernel_error_svd=(res.kernel_error_svd if res.kernel_error_svd is not None
                                  else res.kernel_error),
                response_error=resp, response_error_svd=resp_svd,
                params_before=_params(conv), params_after=_params(res.module),
                macs_before=macs_b, macs_after=macs_a)
            reports.append(rep)
            res.module.train(modes.get(conv, conv.training))
            _replace(model, conv, res.module)
            if progress is not None:
                progress(_format_report(rep))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return model, reports


def _module_kernel(mod: nn.Module, variant: str) -> torch.Tensor:
    """Equivalent dense kernel [N, M, K] (float64) of a block built here."""
    if variant == "dsc":
        dw, pw = mod.dw, mod.pw
        m = dw.in_channels
        r = dw.out_channels // m
        d = dw.weight.detach().to(_F64).reshape(m, r, -1)
        p = pw.weight.detach().to(_F64).reshape(pw.out_channels, m, r)
        return _kernel_dsc(d, p)
    b = mod.dw.weight.detach().to(_F64).flatten(1)
    if variant == "u":
        w = mod.pw.weight.detach().to(_F64).flatten(1)
    else:
        w = mod.pw2.weight.detach().to(_F64).flatten(1) @ mod.pw1.weight.detach().to(
            _F64).flatten(1)
    return _kernel_u(w, b)


def _format_report(r: LayerReport) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"
    return (f"{r.name}: {r.variant} rank={r.rank} kernel_err={f(r.kernel_error)} "
            f"resp_err svd={f(r.response_error_svd)} -> {f(r.response_error)} "
            f"params {r.params_before}->{r.params_after}")
