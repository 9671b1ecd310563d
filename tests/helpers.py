"""Shared test helpers: random BSConv problems and the accuracy rule against a float64 oracle."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import bsconv_fused
from bsconv_fused import functional, reference

EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


@dataclass
class Problem:
    """One BSConv call: tensors (float64 masters) and keyword options."""

    variant: str
    x: torch.Tensor
    pws: List[torch.Tensor]
    dw_weight: torch.Tensor
    dw_bias: Optional[torch.Tensor]
    mid_scale: Optional[torch.Tensor]
    mid_shift: Optional[torch.Tensor]
    kwargs: Dict = field(default_factory=dict)

    def tensors(self) -> List[Optional[torch.Tensor]]:
        return [self.x, *self.pws, self.dw_weight, self.dw_bias, self.mid_scale, self.mid_shift]

    def cast(self, dtype: torch.dtype, memory_format=torch.contiguous_format,
             requires_grad: bool = True) -> "Problem":
        def c(t):
            if t is None:
                return None
            t = t.detach().to(dtype)
            if t.dim() == 4:
                t = t.contiguous(memory_format=memory_format)
            return t.requires_grad_(requires_grad)

        return Problem(self.variant, c(self.x), [c(w) for w in self.pws], c(self.dw_weight),
                       c(self.dw_bias), c(self.mid_scale), c(self.mid_shift), dict(self.kwargs))

    def inputs(self) -> List[torch.Tensor]:
        return [t for t in self.tensors() if t is not None]

    def call(self, impl) -> torch.Tensor:
        fn = impl.bsconv_u if self.variant == "u" else impl.bsconv_s
        return fn(self.x, *self.pws, self.dw_weight, self.dw_bias, mid_scale=self.mid_scale,
                  mid_shift=self.mid_shift, **self.kwargs)

    def fused(self) -> torch.Tensor:
        return self.call(functional)

    def reference(self) -> torch.Tensor:
        return self.call(reference)


def make_problem(variant: str = "u", B: int = 2, M: int = 5, N: int = 6, mid: int = 3,
                 H: int = 9, W: int = 7, K: Sequence[int] = (3, 3), bias: bool = True,
                 mid_affine: bool = False, seed: int = 0, **kwargs) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = r(B, M, H, W)
    if variant == "u":
        pws = [r(N, M, 1, 1, scale=M ** -0.5)]
    else:
        pws = [r(mid, M, 1, 1, scale=M ** -0.5), r(N, mid, 1, 1, scale=mid ** -0.5)]
    dw = r(N, 1, *K, scale=(K[0] * K[1]) ** -0.5)
    b = r(N) if bias else None
    scale = (1 + 0.5 * r(N)) if mid_affine else None
    shift = r(N) * 0.5 if mid_affine else None
    return Problem(variant, x, pws, dw, b, scale, shift, kwargs)


def grads(out: torch.Tensor, inputs: Sequence[torch.Tensor], gy: torch.Tensor):
    return torch.autograd.grad(out, inputs, gy.to(out.dtype))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def magnitudes(p, gy):
    """Output and gradients of the float64 reference on absolute values (|x|, |weights|, |gy|,
    no activation): elementwise sums of |terms| behind every result, the scale of their rounding
    errors (bounds under activations with |f(z)| <= |z| and slopes at most 1, ReLU and ReLU6;
    hardswish's slope reaches 1.5). A TF32 projection rounds both factors of each product to 10
    mantissa bits (2 * 2^-11 relative), and BSConv-S chains two such products, so its results
    are within 2^-9 of these magnitudes."""
    a = p.cast(torch.float64)
    absd = a.__class__(a.variant, a.x.abs(), [w.abs() for w in a.pws], a.dw_weight.abs(),
                       *(None if t is None else t.abs() for t in (a.dw_bias, a.mid_scale,
                                                                 a.mid_shift)),
                       dict(a.kwargs, mid_activation=None))
    for t in absd.inputs():
        t.detach_().requires_grad_()
    y = absd.reference()
    return y.detach(), [g.detach() for g in torch.autograd.grad(y, absd.inputs(), gy.abs())]


@dataclass
class BackwardCase:
    """A float32 problem, its float64 twin and reference output, a float64 grad_y in the layout
    of x, and the float32 inputs that require gradients (``which``: all, x, dw or w)."""
    p: Problem
    r: Problem
    yr: torch.Tensor
    gy: torch.Tensor
    q: Problem
    want: List[torch.Tensor]

    def reference_grads(self) -> Tuple[List[int], List[torch.Tensor], List[torch.Tensor]]:
        """Indices into inputs() of the inputs in ``want``, their float64 reference gradients
        and the magnitudes behind them."""
        idx = [k for k, t in enumerate(self.q.inputs()) if t.requires_grad]
        gref = torch.autograd.grad(self.yr, [self.r.inputs()[k] for k in idx], self.gy)
        _, mags = magnitudes(self.p, self.gy)
        return idx, list(gref), [mags[k] for k in idx]


def backward_case(case: tuple, seed: int, fmt: torch.memory_format, mid: int) -> BackwardCase:
    """``case`` = (variant, B, M, N, H, W, K, padding, stride, options, which); options may set
    mid_affine (then with a ReLU)."""
    v, B, M, N, H, W, K, pad, stride, opts, which = case
    p = make_problem(v, B=B, M=M, N=N, mid=mid, H=H, W=W, K=K, padding=pad, stride=stride,
                     seed=seed, **opts)
    if opts.get("mid_affine"):
        p.kwargs["mid_activation"] = "relu"
    r = p.cast(torch.float64)
    yr = r.reference()
    gy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(100 + seed),
                     dtype=torch.float64).contiguous(memory_format=fmt)
    q = p.cast(torch.float32, fmt, requires_grad=False)
    want = {"all": q.inputs(), "x": [q.x], "dw": [q.dw_weight], "w": [q.pws[0]]}[which]
    for t in want:
        t.requires_grad_()
    return BackwardCase(p, r, yr, gy, q, want)


def backward_case_runs(cases: Sequence[tuple], counter) -> list:
    """Per case of ``cases`` (see backward_case) and layout (NCHW, channels-last): the fused
    gradients, the float64 reference's, their magnitudes, how far the ``counter`` op moved
    during the first backward, and whether one thread gave the same bits as the default
    thread count."""
    out = []
    threads = torch.get_num_threads()
    for i, case in enumerate(cases):
        for fmt in (torch.contiguous_format, torch.channels_last):
            c = backward_case(case, i, fmt, mid=16)
            before = counter()
            g = torch.autograd.grad(c.q.fused(), c.want, c.gy.float())
            taken = counter() - before
            torch.set_num_threads(1)
            try:
                g1 = torch.autograd.grad(c.q.fused(), c.want, c.gy.float())
            finally:
                torch.set_num_threads(threads)
            same = all(torch.equal(a, b) for a, b in zip(g, g1))
            _, gref, mags = c.reference_grads()
            out.append([list(g), gref, mags, torch.tensor(taken), torch.tensor(same)])
    return out


def assert_accurate(name: str, fused: torch.Tensor, ref_lowp: torch.Tensor,
                    ref64: torch.Tensor, magnitude: Optional[torch.Tensor] = None) -> None:
    """The fused result may be at most twice as far from the float64 oracle as the reference
    computed in the same dtype. Floor: two ulps of the output's dtype at the oracle's scale, the
    spread that a different (equally valid) summation order alone produces, so that a reference
    which happens to be nearly exact does not demand the impossible. The rounding error of a sum
    scales with the sum of its terms' magnitudes, not with the (possibly cancelling) result:
    when ``magnitude`` (elementwise sums of |terms|) is given, the floor takes that scale."""
    assert fused.shape == ref64.shape, (name, fused.shape, ref64.shape)
    assert fused.dtype == ref_lowp.dtype, (name, fused.dtype, ref_lowp.dtype)
    err = max_err(fused, ref64)
    ref_err = max_err(ref_lowp, ref64)
    scale = ref64 if magnitude is None else magnitude
    floor = 2 * EPS[fused.dtype] * max(scale.abs().max().item() if scale.numel() else 0.0, 1.0)
    bound = 2 * max(ref_err, floor)
    assert err <= bound, f"{name}: fused error {err:.3g} > bound {bound:.3g} (ref {ref_err:.3g})"


def fused_op_ran(fn) -> bool:
    """Runs fn under the autograd profiler and tells whether the fused forward op ran."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return any(e.name == "bsconv_fused::forward" for e in prof.function_events)


assert bsconv_fused.extension_available(), (
    f"the compiled extension is expected in the tests: {bsconv_fused.extension_error()}")


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
