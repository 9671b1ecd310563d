"""Latency benchmark: the fused BSConv ops side by side with the baselines a fair comparison names.

Run ``python -m bsconv_fused.bench`` (or ``benchmarks/bench_latency.py``); ``--help`` lists the
options. For every layer of the suite, batch size and mode (forward, forward + backward) it

1. checks correctness first: every variant's output (and, with backward, its gradients) against a
   float64 evaluation of the reference, as max abs error and relative error (max abs error over
   max abs value of the float64 result); the fused op failing the tolerance of the dtype marks
   the row ``FAIL`` and makes :func:`main` return 1;
2. times all variants interleaved round-robin (one call of each per repeat) so that machine
   noise hits them alike, in orders where every variant directly follows every other one equally
   often (a call runs faster right after a similar one that warmed the caches and threads), and
   reports median and spread;
3. derives speedups of the fused op over the best unfused eager baseline (the faster of NCHW and
   channels_last) and over the NCHW default, and its achieved GFLOP/s, GB/s and fraction of the
   roofline bound given by peaks measured at start (a GEMM probe and a copy probe).

Layer convention: a layer is (M, N, H, W, K, stride) plus, for BSConv-S, M'. The input x is
B x M x H x W; the pointwise projection maps M -> N (BSConv-S: M -> M' -> N) at the input
resolution; then the K x K depthwise conv with stride s, padding K // 2 and a bias gives
B x N x Ho x Wo with Ho = (H - 1) // s + 1. BSConv-U puts the pointwise first, so a MobileNetV1
block "dw 3x3 stride s on M, then pw M -> N" becomes "pw M -> N at the input size, then dw 3x3
stride s on N". BSConv-S uses p = 1/6: M' = min(M, max(4, ceil(M / 6))).

Variants (``VARIANT_HELP`` below): the fused op on NCHW and channels_last input, the reference
(pointwise then depthwise ``F.conv2d``) eager NCHW and channels_last, the reference under
``torch.compile``, and the equivalent dense K x K ``F.conv2d`` with kernel W[n, m] * B_n. On CUDA
also the reference on explicit cuDNN calls and, for float32, every variant but the compiled one
again with TF32 allowed ("+tf32"); the plain names then run with TF32 off. The kernels each
variant ran (CPU: innermost aten ops, CUDA: kernel names) are recorded from one profiled call.

Outputs go to ``--out`` (default ``bench_out/``): ``results.csv``, ``results.json``,
``speedup.png`` and ``results.md`` (also written to ``--markdown PATH``, e.g.
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import functional, reference
from ._extension import extension_available, extension_error, fused_available_for

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in requirements-dev.txt
    tqdm = None

Tensor = torch.Tensor
ForwardFn = Callable[[Tensor, Sequence[Tensor]], Tensor]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# Relative error (max abs error / max abs of the float64 result) above which a row fails.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
MODES = ("fwd", "fwdbwd")
BWD_FLOP_FACTOR = 2.0  # backward costs about twice the forward FLOPs

VARIANT_HELP: dict[str, str] = {
    "fused": "fused op, NCHW input",
    "fused_cl": "fused op, channels_last input",
    "ref_nchw": "reference eager (pointwise then depthwise F.conv2d), NCHW",
    "ref_cl": "reference eager, channels_last",
    "ref_compile": "reference under torch.compile (dynamic=False), NCHW",
    "dense": "equivalent dense KxK F.conv2d, kernel W[n,m]*B_n, NCHW",
    "ref_cudnn": "reference on explicit torch.cudnn_convolution calls (CUDA only)",
    "+tf32": "suffix on CUDA float32: TF32 allowed (cuDNN's default); plain names: TF32 off",
}
EAGER_BASELINES = ("ref_nchw", "ref_cl")


# ----------------------------------------------------------------------------------------------
# Layers and suites
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One benchmarked layer; see the module docstring for the shape convention."""

    name: str
    kind: str  # "U" or "S"
    m: int
    n: int
    h: int
    w: int
    k: int
    stride: int
    count: int = 1  # how often the layer occurs in its network

    @property
    def mid(self) -> int:
        """M' of BSConv-S (p = 1/6, at least 4, at most M); 0 for BSConv-U."""
        return min(self.m, max(4, -(-self.m // 6))) if self.kind == "S" else 0

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        p, k, s = self.padding, self.k, self.stride
        return (self.h + 2 * p - k) // s + 1, (self.w + 2 * p - k) // s + 1

    @property
    def pw_shapes(self) -> list[tuple[int, int]]:
        """(out, in) channels of each pointwise projection, in order."""
        if self.kind == "U":
            return [(self.n, self.m)]
        return [(self.mid, self.m), (self.n, self.mid)]

    def describe(self) -> str:
        chans = f"{self.m}->{self.mid}->{self.n}" if self.kind == "S" else f"{self.m}->{self.n}"
        return f"{chans} {self.h}x{self.w} k{self.k} s{self.stride}"

    def forward_flops(self, batch: int) -> float:
        """Pointwise GEMM(s) on the input grid plus the depthwise on the output grid."""
        ho, wo = self.out_hw
        pw = sum(o * i for o, i in self.pw_shapes)
        return 2.0 * batch * (self.h * self.w * pw + ho * wo * self.n * self.k * self.k)

    def weight_elems(self) -> int:
        return sum(o * i for o, i in self.pw_shapes) + self.n * self.k * self.k + self.n

    def min_bytes(self, batch: int, itemsize: int, mode: str) -> float:
        """Minimum DRAM traffic of a fused implementation (x, weights, y; backward: x, gy, gx)."""
        ho, wo = self.out_hw
        x = batch * self.m * self.h * self.w
        y = batch * self.n * ho * wo
        fwd = x + y + self.weight_elems()
        bwd = 2 * x + y + 2 * self.weight_elems()  # read x, gy, weights; write gx, weight grads
        return float(itemsize * (fwd if mode == "fwd" else fwd + bwd))

    def flops(self, batch: int, mode: str) -> float:
        f = self.forward_flops(batch)
        return f if mode == "fwd" else f * (1.0 + BWD_FLOP_FACTOR)


# MobileNetV1 at 224 px: its 13 depthwise separable blocks as (tag, M, N, H, stride, count).
MOBILENET_V1 = [
    ("b01", 32, 64, 112, 1, 1),
    ("b02", 64, 128, 112, 2, 1),
    ("b03", 128, 128, 56, 1, 1),
    ("b04", 128, 256, 56, 2, 1),
    ("b05", 256, 256, 28, 1, 1),
    ("b06", 256, 512, 28, 2, 1),
    ("b07-11", 512, 512, 14, 1, 5),
    ("b12", 512, 1024, 14, 2, 1),
    ("b13", 1024, 1024, 7, 1, 1),
]
# CIFAR ResNet-20: the 3x3 convs of its three stages (3 basic blocks each, 2 convs per block).
CIFAR_RESNET20 = [
    ("c16", 16, 16, 32, 1, 6),
    ("c16-32s2", 16, 32, 32, 2, 1),
    ("c32", 32, 32, 16, 1, 5),
    ("c32-64s2", 32, 64, 16, 2, 1),
    ("c64", 64, 64, 8, 1, 5),
]
NETWORKS = {"mnv1": MOBILENET_V1, "cifar": CIFAR_RESNET20}

DEFAULT_SUITE = (
    "mnv1-u3.b01", "mnv1-u3.b02", "mnv1-u3.b06", "mnv1-u3.b07-11", "mnv1-u3.b13",
    "cifar-u3.c16", "cifar-u3.c32-64s2", "cifar-u3.c64",
    "mnv1-s3.b03", "mnv1-s3.b07-11", "cifar-s3.c32",
    "mnv1-u5.b05", "cifar-u5.c32", "mnv1-s5.b07-11",
)
QUICK_SUITE = ("mnv1-u3.b05", "mnv1-s3.b07-11", "cifar-u3.c32", "cifar-s5.c64")


def full_suite() -> list[Layer]:
    """Every network x {BSConv-U, BSConv-S} x {K=3, K=5}, named ``net-{u,s}K.tag``."""
    layers = []
    for kind in ("U", "S"):
        for k in (3, 5):
            for net, blocks in NETWORKS.items():
                for tag, m, n, h, s, count in blocks:
                    name = f"{net}-{kind.lower()}{k}.{tag}"
                    layers.append(Layer(name, kind, m, n, h, h, k, s, count))
    return layers


def select_layers(suite: str, patterns: str | None) -> list[Layer]:
    """The named suite's layers, or, with ``patterns`` (comma-separated substrings or regular
    expressions, e.g. ``mnv1-u3,c32$``), every layer of the full suite whose name matches one."""
    layers = full_suite()
    if patterns:
        regexes = [re.compile(p.strip()) for p in patterns.split(",") if p.strip()]
        return [lay for lay in layers if any(r.search(lay.name) for r in regexes)]
    if suite == "full":
        return layers
    names = DEFAULT_SUITE if suite == "default" else QUICK_SUITE
    by_name = {lay.name: lay for lay in layers}
    return [by_name[n] for n in names]


# ----------------------------------------------------------------------------------------------
# Problems and variants
# ----------------------------------------------------------------------------------------------

@dataclass
class Problem:
    """Inputs of one (layer, batch) case, in float64; variants cast and lay them out."""

    layer: Layer
    batch: int
    x: Tensor
    params: list[Tensor]  # pointwise weight(s), depthwise weight, depthwise bias
    dense: list[Tensor]  # dense KxK weight, bias
    gy: Tensor


def make_problem(layer: Layer, batch: int, device: torch.device, seed: int = 0) -> Problem:
    """Random inputs with unit-scale activations (weights scaled by 1 / sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    x = randn(batch, layer.m, layer.h, layer.w)
    pws = [randn(o, i, 1, 1, scale=i ** -0.5) for o, i in layer.pw_shapes]
    dw = randn(layer.n, 1, layer.k, layer.k, scale=1.0 / layer.k)
    bias = randn(layer.n, scale=0.1)
    proj = pws[0][:, :, 0, 0]
    for w in pws[1:]:
        proj = w[:, :, 0, 0] @ proj
    dense = proj[:, :, None, None] * dw  # F[n, m] = (W2 W1)[n, m] * B_n
    gy = randn(batch, layer.n, *layer.out_hw)
    return Problem(layer, batch, x, [*pws, dw, bias], [dense, bias.clone()], gy)


@dataclass(frozen=True)
class Variant:
    """One implementation to time. ``tf32`` None leaves the TF32 flags alone (CPU)."""

    name: str
    kind: str  # "fused", "reference", "compiled", "dense" or "cudnn"
    channels_last: bool = False
    tf32: bool | None = None

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"


def variants_for(device: torch.device, dtype: torch.dtype, compile_ref: bool) -> list[Variant]:
    """The variants benchmarked on ``device``; TF32 twins on CUDA float32."""
    base = [
        Variant("fused", "fused"),
        Variant("fused_cl", "fused", channels_last=True),
        Variant("ref_nchw", "reference"),
        Variant("ref_cl", "reference", channels_last=True),
    ]
    if compile_ref:
        base.append(Variant("ref_compile", "compiled"))
    base.append(Variant("dense", "dense"))
    if device.type != "cuda":
        return base
    base.append(Variant("ref_cudnn", "cudnn"))
    if dtype != torch.float32:
        return base
    out = []
    for v in base:  # plain names: TF32 off; the compiled graph is not re-made with TF32 on
        out.append(Variant(v.name, v.kind, v.channels_last, tf32=False))
        if v.kind != "compiled":
            out.append(Variant(v.name + "+tf32", v.kind, v.channels_last, tf32=True))
    return out


@contextlib.contextmanager
def tf32_mode(enabled: bool | None) -> Iterator[None]:
    """Sets cuDNN's and cuBLAS's TF32 flags for the block (no-op for None)."""
    if enabled is None:
        yield
        return
    prev = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def _bsconv_op(module: Any, layer: Layer) -> Callable[..., Tensor]:
    """``module.bsconv_u`` or ``module.bsconv_s``, looked up now (so tests can patch it)."""
    return getattr(module, "bsconv_u" if layer.kind == "U" else "bsconv_s")


def _cudnn_forward(layer: Layer, tf32: bool) -> ForwardFn:
    def conv(x: Tensor, w: Tensor, stride: int, pad: int, groups: int) -> Tensor:
        return torch.cudnn_convolution(x, w, [pad, pad], [stride, stride], [1, 1], groups,
                                       False, False, tf32)

    def fn(x: Tensor, params: Sequence[Tensor]) -> Tensor:
        *pws, dw, bias = params
        for w in pws:
            x = conv(x, w, 1, 0, 1)
        y = conv(x, dw, layer.stride, layer.padding, layer.n)
        return y + bias.view(1, -1, 1, 1)

    return fn


def forward_fn(variant: Variant, layer: Layer) -> ForwardFn:
    """The callable ``fn(x, params) -> y`` of a variant (params as built by :func:`leaves`)."""
    s, p = layer.stride, layer.padding
    if variant.kind == "dense":
        def fn(x: Tensor, params: Sequence[Tensor]) -> Tensor:
            return F.conv2d(x, params[0], params[1], s, p)
    elif variant.kind == "cudnn":
        fn = _cudnn_forward(layer, bool(variant.tf32))
    else:
        op = _bsconv_op(functional if variant.kind == "fused" else reference, layer)
        if variant.kind == "compiled":
            torch._dynamo.reset()  # a fresh cache per case: no silent fallback at the limit
            op = torch.compile(op, dynamic=False)

        def fn(x: Tensor, params: Sequence[Tensor]) -> Tensor:
            return op(x, *params, stride=s, padding=p)

    if variant.tf32 is None:
        return fn

    def with_tf32(x: Tensor, params: Sequence[Tensor]) -> Tensor:
        with tf32_mode(variant.tf32):
            return fn(x, params)

    return with_tf32


@dataclass
class Case:
    """A variant ready to run: its forward function and its own leaf tensors."""

    variant: Variant
    fn: ForwardFn
    x: Tensor
    params: list[Tensor]
    gy: Tensor

    def forward(self) -> Tensor:
        return self.fn(self.x, self.params)

    def step(self, mode: str) -> None:
        """One timed call: forward (no autograd) or forward + backward."""
        if mode == "fwd":
            with torch.no_grad():
                self.forward()
            return
        for t in (self.x, *self.params):
            t.grad = None
        self.forward().backward(self.gy)


def leaves(problem: Problem, variant: Variant, dtype: torch.dtype, grad: bool) -> Case:
    """Casts the problem's tensors for ``variant`` into fresh leaves (requiring grad if asked)."""
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format

    def leaf(t: Tensor) -> Tensor:
        t = t.to(dtype)
        if t.dim() == 4:
            t = t.contiguous(memory_format=fmt)
        return t.detach().requires_grad_(grad)

    params = problem.dense if variant.is_dense else problem.params
    gy = problem.gy.to(dtype).contiguous(memory_format=fmt)
    return Case(variant, forward_fn(variant, problem.layer), leaf(problem.x),
                [leaf(t) for t in params], gy)


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------

@dataclass
class Check:
    """Errors of one variant against the float64 reference."""

    status: str = "ok"  # "ok", "FAIL" or "n/a: <reason>"
    err_abs: float = float("nan")
    err_rel: float = float("nan")
    grad_err_rel: float = float("nan")

    @property
    def available(self) -> bool:
        return not self.status.startswith("n/a")


def reference64(problem: Problem, mode: str) -> list[Tensor]:
    """[y] or [y, gx, g_pw..., g_dw, g_bias] of the float64 reference."""
    grad = mode != "fwd"
    x = problem.x.detach().clone().requires_grad_(grad)
    params = [t.detach().clone().requires_grad_(grad) for t in problem.params]
    y = _bsconv_op(reference, problem.layer)(x, *params, stride=problem.layer.stride,
                                             padding=problem.layer.padding)
    if not grad:
        return [y.detach()]
    y.backward(problem.gy)
    return [y.detach(), x.grad, *[t.grad for t in params]]


def _rel_err(actual: Tensor, expected: Tensor) -> tuple[float, float]:
    err = (actual.detach().to(torch.float64) - expected).abs().max().item()
    scale = expected.abs().max().item()
    return err, err / scale if scale > 0 else err


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_case(case: Case, expected: list[Tensor], mode: str, tol: float) -> Check:
    """Runs the case once (this also triggers compilation) and compares with ``expected``."""
    try:
        with torch.set_grad_enabled(mode != "fwd"):  # as in the timed steps (compile guards)
            y = case.forward()
        got = [y]
        if mode != "fwd":
            y.backward(case.gy)
            grads = [case.x.grad] if case.variant.is_dense else [case.x.grad] + [
                t.grad for t in case.params]
            got += grads
    except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
        return Check(status=f"n/a: {_one_line(exc)}")
    err_abs, err_rel = _rel_err(got[0], expected[0])
    grad_rel = max((_rel_err(g, e)[1] for g, e in zip(got[1:], expected[1:])), default=0.0)
    worst = max(err_rel, grad_rel)
    status = "ok" if math.isfinite(worst) and worst <= tol else "FAIL"
    return Check(status, err_abs, err_rel, grad_rel if mode != "fwd" else float("nan"))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Wall-time statistics of one variant, in milliseconds."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        ms = sorted(1e3 * t for t in samples)
        if len(ms) >= 2:
            q25, _, q75 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q25 = q75 = ms[0]
        return cls(statistics.median(ms), q25, q75, ms[0], ms[-1], len(ms))

    @property
    def iqr_pct(self) -> float:
        return 100.0 * (self.q75_ms - self.q25_ms) / self.median_ms if self.median_ms else 0.0


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _time_once(step: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which every item directly follows every other item equally
    often (a Williams design: n orders for even n, 2n for odd n).

    Rotating one order would not do: each item would always follow the same neighbour, and a
    call right after a similar one (same weights in cache, threads awake) runs faster.
    """
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    rows = [[(v + r) % n for v in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def time_round_robin(steps: dict[str, Callable[[], None]], sync: Callable[[], None],
                     warmup: int, repeats: int, min_repeats: int,
                     budget: float) -> dict[str, Timing]:
    """Warm-up rounds, then repeats of one call per variant, in the orders of
    :func:`balanced_orders` (cycled).

    The number of repeats is ``repeats``, lowered to fit ``budget`` seconds (estimated from the
    last warm-up round) but never below ``min_repeats``; budget <= 0 means no limit. Python's
    cyclic garbage collector is off while the calls are timed (as :mod:`timeit` does): a
    collection would land on whichever call happened to cross its threshold (the autograd
    graphs of forward+backward steps allocate enough to trigger one every few calls). The
    steps free their tensors by reference counting, so nothing piles up meanwhile.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _round_robin(steps, sync, warmup, repeats, min_repeats, budget)
    finally:
        if enabled:
            gc.enable()


def _round_robin(steps: dict[str, Callable[[], None]], sync: Callable[[], None], warmup: int,
                 repeats: int, min_repeats: int, budget: float) -> dict[str, Timing]:
    names = list(steps)
    round_time = 0.0
    for _ in range(warmup):
        round_time = sum(_time_once(steps[n], sync) for n in names)
    if budget > 0 and round_time > 0:
        repeats = max(min_repeats, min(repeats, int(budget / round_time)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    orders = balanced_orders(len(names))
    for r in range(repeats):
        for i in orders[r % len(orders)]:
            samples[names[i]].append(_time_once(steps[names[i]], sync))
    return {n: Timing.of(s) for n, s in samples.items()}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences fd 2 (the profiler's C++ chatter) for the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_GENERIC_OPS = {"aten::conv2d", "aten::convolution", "aten::_convolution",
                "aten::convolution_backward"}
_KERNEL_HINTS = ("conv", "bsconv", "mm", "gemm", "copy_", "cpp_fused", "triton")


def _interesting(name: str, device: torch.device) -> bool:
    """CUDA: every kernel; CPU: the innermost conv / GEMM / copy / generated-kernel ops (not
    the autograd nodes or the engine's wrappers)."""
    if device.type == "cuda":
        return True
    if name in _GENERIC_OPS or name.startswith("autograd::"):
        return False
    is_op = "::" in name or name.startswith(("cpp_fused", "triton"))
    return is_op and any(h in name.lower() for h in _KERNEL_HINTS)


def backend_of(step: Callable[[], None], device: torch.device) -> str:
    """What one call ran, counted: innermost aten ops (CPU) or kernel names (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    try:
        with _quiet_stderr(), profile(activities=acts) as prof:
            step()
            synchronizer(device)()
    except Exception as exc:  # noqa: BLE001  (the profiler is a diagnostic only)
        return f"unknown ({_one_line(exc, 60)})"
    counts: dict[str, int] = {}
    for ev in prof.events():
        on_gpu = "cuda" in str(getattr(ev, "device_type", "")).lower()
        if on_gpu != (device.type == "cuda") or not _interesting(ev.name, device):
            continue
        name = ev.name if len(ev.name) <= 48 else ev.name[:45] + "..."
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} ({c})" if c > 1 else n for n, c in counts.items()) or "-"


# ----------------------------------------------------------------------------------------------
# Machine peaks
# ----------------------------------------------------------------------------------------------

@dataclass
class Peaks:
    """Measured peak throughput: GEMM FLOP/s and copy bytes/s (read + write)."""

    flops: float
    bytes_per_s: float
    gemm_n: int
    gemm_dtype: str
    copy_bytes: int


def _median_time(fn: Callable[[], Any], sync: Callable[[], None], reps: int) -> float:
    fn()
    return statistics.median(_time_once(fn, sync) for _ in range(reps))


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool) -> Peaks:
    """A GEMM probe and a large ``copy_`` probe (bytes read + written).

    The GEMM rate is the faster of a square ``torch.mm`` and the same FLOPs as a channels-last
    1x1 convolution (n channels in and out, n pixels): on the CPU the first runs on the BLAS,
    the second on oneDNN, and either can be the faster (on the AMD build machine oneDNN's
    reaches ~1.2x MKL's). The GEMM runs in the benchmark dtype; half types on the CPU also in
    float32, and the faster counts: CPUs without native half-type GEMMs compute them in float32
    (the fused kernels too), while on AMX hosts oneDNN's bfloat16 GEMM is ~3-4x its float32 one
    (and the fused bfloat16 projection runs on it).
    """
    sync = synchronizer(device)
    n = 512 if quick else (4096 if device.type == "cuda" else 1536)
    dtypes = [dtype]
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtypes.append(torch.float32)
    t_mm, gemm_dtype = math.inf, dtype
    for dt in dtypes:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        t = _median_time(lambda a=a, b=b: torch.mm(a, b), sync, 3 if quick else 7)
        img = a.reshape(1, n, n // 32, 32).contiguous(memory_format=torch.channels_last)
        w = b.reshape(n, n, 1, 1)
        with torch.no_grad():
            t = min(t, _median_time(lambda i=img, w=w: F.conv2d(i, w), sync,
                                    3 if quick else 7))
        if t < t_mm:
            t_mm, gemm_dtype = t, dt
    elems = (4 if quick else 32) * 2 ** 20  # 16 or 128 MiB of float32: beyond the caches
    src = torch.ones(elems, device=device)
    dst = torch.empty_like(src)
    t_copy = _median_time(lambda: dst.copy_(src), sync, 3 if quick else 7)
    nbytes = 2 * src.numel() * src.element_size()
    return Peaks(2.0 * n ** 3 / t_mm, nbytes / t_copy, n,
                 str(gemm_dtype).replace("torch.", ""), nbytes)


# ----------------------------------------------------------------------------------------------
# Running the suite
# ----------------------------------------------------------------------------------------------

@dataclass
class Row:
    """Everything measured for one (layer, batch, mode)."""

    layer: Layer
    batch: int
    mode: str
    flops: float
    bytes: float
    roofline_ms: float
    checks: dict[str, Check] = field(default_factory=dict)
    timings: dict[str, Timing] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checks.get("fused", Check("n/a")).status == "ok"

    def ms(self, name: str) -> float | None:
        t = self.timings.get(name)
        return t.median_ms if t else None

    def best_eager(self, suffix: str = "") -> float | None:
        """The faster eager baseline; ``suffix="+tf32"`` picks the TF32 twins (CUDA float32)."""
        times = [t for t in (self.ms(n + suffix) for n in EAGER_BASELINES) if t is not None]
        return min(times) if times else None

    def speedup(self, baseline: float | None) -> float | None:
        fused = self.ms("fused")
        return baseline / fused if baseline and fused else None

    @property
    def speedup_best(self) -> float | None:
        return self.speedup(self.best_eager())

    @property
    def speedup_nchw(self) -> float | None:
        return self.speedup(self.ms("ref_nchw"))

    @property
    def speedup_layouts(self) -> float | None:
        """Best eager baseline / the faster of the fused op's two layouts (``fused`` with NCHW,
        ``fused_cl`` with channels_last input): each side in its better memory format."""
        fused = [t for t in (self.ms("fused"), self.ms("fused_cl")) if t]
        best = self.best_eager()
        return best / min(fused) if best and fused else None

    @property
    def speedup_best_tf32(self) -> float | None:
        return self.speedup(self.best_eager("+tf32"))

    def achieved(self) -> dict[str, float | None]:
        fused = self.ms("fused")
        if not fused:
            return {"gflops": None, "gbps": None, "roofline_fraction": None}
        sec = fused / 1e3
        return {"gflops": self.flops / sec / 1e9, "gbps": self.bytes / sec / 1e9,
                "roofline_fraction": self.roofline_ms / fused}


@dataclass
class Settings:
    """Parsed options that the run needs."""

    device: torch.device
    dtype: torch.dtype
    batches: list[int]
    modes: list[str]
    warmup: int
    repeats: int
    min_repeats: int
    budget: float
    compile_ref: bool
    profile_backends: bool


def fused_note(device: torch.device) -> str | None:
    """Why the "fused" variant would silently run the reference path, if it would."""
    if not extension_available():
        return f"extension not loaded ({extension_error()}): 'fused' runs the reference path"
    if not fused_available_for(device):
        return f"no fused kernel for {device.type}: 'fused' runs the reference path"
    return None


def run_case(problem: Problem, expected: list[Tensor], mode: str, cfg: Settings, peaks: Peaks,
             variants: list[Variant]) -> Row:
    """Correctness check against ``expected`` (float64), then round-robin timing of every
    variant that ran, for one (layer, batch, mode)."""
    layer, batch = problem.layer, problem.batch
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    flops = layer.flops(batch, mode)
    nbytes = layer.min_bytes(batch, itemsize, mode)
    roof = 1e3 * max(flops / peaks.flops, nbytes / peaks.bytes_per_s)
    row = Row(layer, batch, mode, flops, nbytes, roof)
    tol = TOLERANCE[cfg.dtype]
    cases: dict[str, Case] = {}
    for v in variants:
        try:
            case = leaves(problem, v, cfg.dtype, grad=mode != "fwd")
        except Exception as exc:  # noqa: BLE001  (reported as n/a, like a failing run)
            row.checks[v.name] = Check(status=f"n/a: {_one_line(exc)}")
            continue
        row.checks[v.name] = check_case(case, expected, mode, tol)
        if row.checks[v.name].available:
            cases[v.name] = case
    steps = {n: (lambda c=c: c.step(mode)) for n, c in cases.items()}
    if cfg.profile_backends:
        row.backends = {n: backend_of(s, cfg.device) for n, s in steps.items()}
    row.timings = time_round_robin(steps, synchronizer(cfg.device), cfg.warmup, cfg.repeats,
                                   cfg.min_repeats, cfg.budget)
    return row


def check_line(row: Row) -> str:
    """One line of correctness results, printed before the timings of the case."""
    parts = [f"check {row.layer.name:<18} B={row.batch:<3} {row.mode:<6}"]
    for name in ("fused", "ref_nchw"):
        c = row.checks.get(name)
        if c is None or not c.available:
            parts.append(f"{name}: {c.status if c else 'n/a'}")
            continue
        grad = f" grad rel {c.grad_err_rel:.1e}" if math.isfinite(c.grad_err_rel) else ""
        parts.append(f"{name}: max|err| {c.err_abs:.1e} rel {c.err_rel:.1e}{grad}")
    na = [n for n, c in row.checks.items() if not c.available]
    if na:
        parts.append("n/a: " + ", ".join(na))
    parts.append("ok" if row.ok else "FAIL")
    return "  ".join(parts)


class _NoBar:
    """Stand-in for tqdm when it is missing or disabled."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(text: str) -> None:
        print(text, flush=True)


def progress(total: int, enabled: bool) -> Any:
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True, leave=False)


def run_suite(layers: list[Layer], cfg: Settings, peaks: Peaks, show_progress: bool) -> list[Row]:
    """All (layer, batch, mode) cases, with a progress bar on stderr. The inputs and the float64
    reference are made once per (layer, batch) and shared by the modes."""
    variants = variants_for(cfg.device, cfg.dtype, cfg.compile_ref)
    bar = progress(len(layers) * len(cfg.batches) * len(cfg.modes), show_progress)
    rows = []
    try:
        for layer in layers:
            for batch in cfg.batches:
                problem = make_problem(layer, batch, cfg.device)
                full = reference64(problem, "fwdbwd" if "fwdbwd" in cfg.modes else "fwd")
                for mode in cfg.modes:
                    if hasattr(bar, "set_description"):
                        bar.set_description(f"{layer.name} B={batch} {mode}")
                    expected = full[:1] if mode == "fwd" else full
                    row = run_case(problem, expected, mode, cfg, peaks, variants)
                    bar.write(check_line(row))
                    rows.append(row)
                    bar.update(1)
    finally:
        bar.close()
    return rows


# ----------------------------------------------------------------------------------------------
# Summaries and reports
# ----------------------------------------------------------------------------------------------

def geomean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def summarize(rows: list[Row]) -> dict[str, Any]:
    """Geometric-mean speedups per mode, per (mode, batch) and overall."""
    groups: dict[str, list[Row]] = {"all": rows}
    for r in rows:
        groups.setdefault(r.mode, []).append(r)
        groups.setdefault(f"{r.mode} B={r.batch}", []).append(r)
    out: dict[str, Any] = {}
    for key, rs in groups.items():
        out[key] = {
            "cases": len(rs),
            "geomean_speedup_vs_best_eager": geomean([r.speedup_best for r in rs]),
            "geomean_speedup_vs_nchw": geomean([r.speedup_nchw for r in rs]),
            "geomean_speedup_best_layouts": geomean([r.speedup_layouts for r in rs]),
            "geomean_roofline_fraction": geomean([r.achieved()["roofline_fraction"]
                                                  for r in rs]),
        }
        tf32 = geomean([r.speedup_best_tf32 for r in rs])
        if tf32 is not None:
            out[key]["geomean_speedup_vs_best_eager_tf32"] = tf32
    out["failures"] = [f"{r.layer.name} B={r.batch} {r.mode}" for r in rows if not r.ok]
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, versions, threads, GPU and cuDNN flags; the git commit if known."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "extension_loaded": extension_available(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_avg_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = {
            "version": torch.backends.cudnn.version(),
            "enabled": torch.backends.cudnn.enabled,
            "benchmark": torch.backends.cudnn.benchmark,
            "deterministic": torch.backends.cudnn.deterministic,
            "allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


# glibc's malloc serves a request above its mmap threshold with a fresh mmap(): its pages are
# faulted in and zeroed by the kernel on every call, and munmap()ed on free. Each such block
# freed raises the threshold to its size (up to 32 MiB on 64-bit, the trim threshold to twice
# that), so a process's timings depend on the largest tensor it happened to free before: on
# the Xeon build machine the channels_last reference of 256->256 28x28 k5 B=8 (6.4 MB
# intermediate) took 7 ms before the first large free and 3 ms after it, in the same process.
# The benchmark pins the thresholds at the values glibc itself settles at in a long-running
# training process (mallopt also turns the adjustment off), so that every run and every case
# times the same allocator, whatever ran first (the peak probes, a --quick run's smaller ones).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
STEADY_MMAP_THRESHOLD = 32 << 20


def c_library() -> ctypes.CDLL:
    """The process's C library (raises OSError where it cannot be loaded)."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


def steady_allocator() -> str:
    """Pins glibc's mmap and trim thresholds at their steady state (see above); returns what the
    allocator is now, for the report ("as is" where the C library is not glibc)."""
    try:
        mallopt = c_library().mallopt
    except (OSError, AttributeError):
        return "as is (no glibc mallopt)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
            and mallopt(M_TRIM_THRESHOLD, 2 * STEADY_MMAP_THRESHOLD)):
        return "as is (mallopt refused)"
    return (f"glibc malloc, mmap threshold {STEADY_MMAP_THRESHOLD >> 20} MiB, trim threshold "
            f"{2 * STEADY_MMAP_THRESHOLD >> 20} MiB (pinned at glibc's steady state)")


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning(load: float | None, cores: int | None) -> str | None:
    """A warning when other processes already keep the cores busy (timings get noisy)."""
    if load is None or not cores or load < 0.5 * cores:
        return None
    return (f"the machine is busy (load average {load:.1f} on {cores} cores): absolute times "
            "are unreliable, and with every core taken each OpenMP barrier can wait for a "
            "time slice; compare ratios, or try --threads 1")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(value: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def table_columns(variant_names: list[str]) -> list[str]:
    return (["layer", "B", "mode", "shape"] + variant_names
            + ["iqr%", "x best", "x nchw", "GFLOP/s", "GB/s", "roof%", "err fused", "ok"])


def table_cells(row: Row, variant_names: list[str]) -> list[str]:
    """One table row: median ms of each variant, the fused op's spread, speedups, throughput,
    error, status."""
    ach = row.achieved()
    spread = row.timings["fused"].iqr_pct if "fused" in row.timings else None
    frac = ach["roofline_fraction"]
    fused = row.checks.get("fused")
    err = _fmt(fused.err_rel, ".1e") if fused and fused.available else "n/a"
    return ([row.layer.name, str(row.batch), row.mode, row.layer.describe()]
            + [_fmt(row.ms(n)) for n in variant_names]
            + [_fmt(spread, ".0f"), _fmt(row.speedup_best, ".2f", "x"),
               _fmt(row.speedup_nchw, ".2f", "x"), _fmt(ach["gflops"], ".1f"),
               _fmt(ach["gbps"], ".1f"), _fmt(None if frac is None else 100 * frac, ".0f"), err,
               "ok" if row.ok else "FAIL"])


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    left = {0, 2, 3}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for key, s in summary.items():
        if key in ("failures", "all") or not isinstance(s, dict):
            continue
        tf32 = s.get("geomean_speedup_vs_best_eager_tf32")
        extra = f", vs best eager with TF32 {_fmt(tf32, '.2f', 'x')}" if tf32 else ""
        roof = s["geomean_roofline_fraction"]
        lines.append(
            f"{key:<12} ({s['cases']} cases): fused vs best eager "
            f"{_fmt(s['geomean_speedup_vs_best_eager'], '.2f', 'x')}, vs NCHW "
            f"{_fmt(s['geomean_speedup_vs_nchw'], '.2f', 'x')}{extra}; best layout vs best "
            f"layout {_fmt(s.get('geomean_speedup_best_layouts'), '.2f', 'x')}; roofline "
            f"{_fmt(None if roof is None else 100 * roof, '.1f', '%')}")
    return lines


def variant_names_of(rows: list[Row]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [n for n in r.checks if n not in names]
    return names


def render_text(rows: list[Row], summary: dict[str, Any], peaks: Peaks) -> str:
    """The terminal report: the table (median ms per variant), geomeans and failures."""
    names = variant_names_of(rows)
    body = [table_cells(r, names) for r in rows]
    title = (f"median wall time per call [ms]; peaks: GEMM {peaks.flops / 1e9:.1f} GFLOP/s, "
             f"copy {peaks.bytes_per_s / 1e9:.1f} GB/s")
    out = [title, text_table(table_columns(names), body), "",
           "geometric means of the fused op's speedup:"]
    out += ["  " + s for s in summary_lines(summary)]
    na = sorted({f"{n}: {c.status}" for r in rows for n, c in r.checks.items()
                 if not c.available})
    if na:
        out += ["", "not available:"] + ["  " + s for s in na]
    if summary["failures"]:
        out += ["", "CORRECTNESS FAILURES (fused op beyond tolerance): "
                + ", ".join(summary["failures"])]
    return "\n".join(out)


def render_markdown(rows: list[Row], summary: dict[str, Any], peaks: Peaks,
                    machine: dict[str, Any], command: str, dtype: str) -> str:
    """A RESULTS.md-style report: machine header, one table per mode, geomeans, definitions."""
    names = variant_names_of(rows)
    gpu = f"- GPU: {machine['gpu']}, cuDNN {machine['cudnn']}\n" if "gpu" in machine else ""
    busy = busy_warning(machine["load_avg_start"], machine["cores"])
    gpu += f"- **Warning**: {busy}\n" if busy else ""
    head = (
        "# bsconv-fused latency results\n\n"
        f"- Command: `{command}`\n"
        f"- Date: {machine['date']}, commit {machine['git_commit'] or 'unknown'}\n"
        f"- CPU: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, "
        f"{machine['torch_threads']} threads; Python {machine['python']}; load average "
        f"{machine['load_avg_start']} at start, {machine.get('load_avg_end')} at end\n"
        f"- Allocator: {machine.get('allocator', 'as is')}\n"
        f"{gpu}"
        f"- Device {machine['device']}, dtype {dtype}; measured peaks: GEMM "
        f"{peaks.flops / 1e9:.1f} GFLOP/s ({peaks.gemm_dtype} {peaks.gemm_n}^3), copy "
        f"{peaks.bytes_per_s / 1e9:.1f} GB/s\n\n"
        "Median wall time per call in ms, all variants interleaved round-robin in one run. "
        "`x best` = best eager baseline (faster of `ref_nchw`, `ref_cl`) / fused; `x nchw` = "
        "`ref_nchw` / fused; `iqr%` = interquartile range of the fused op's times / their "
        "median; `roof%` = roofline bound / fused time; `err fused` = max abs error of the "
        "fused output over max abs value of a float64 reference. The geometric means also give "
        "`best layout vs best layout`: best eager / the faster of `fused`, `fused_cl`.\n"
    )
    parts = [head]
    for mode in MODES:
        rs = [r for r in rows if r.mode == mode]
        if rs:
            title = "Forward" if mode == "fwd" else "Forward + backward"
            parts.append(f"## {title}\n\n"
                         + markdown_table(table_columns(names),
                                          [table_cells(r, names) for r in rs]) + "\n")
    parts.append("## Geometric means\n\n" + "\n".join("- " + s for s in summary_lines(summary))
                 + "\n")
    parts.append("## Variants\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in VARIANT_HELP.items())
                 + "\n")
    return "\n".join(parts)


def row_record(row: Row) -> dict[str, Any]:
    """The JSON form of a row."""
    lay = row.layer
    ho, wo = lay.out_hw
    return {
        "layer": lay.name, "kind": lay.kind, "M": lay.m, "M_mid": lay.mid, "N": lay.n,
        "H": lay.h, "W": lay.w, "Ho": ho, "Wo": wo, "K": lay.k, "stride": lay.stride,
        "count": lay.count, "batch": row.batch, "mode": row.mode, "flops": row.flops,
        "bytes": row.bytes, "roofline_ms": row.roofline_ms, "ok": row.ok,
        "speedup_vs_best_eager": row.speedup_best, "speedup_vs_nchw": row.speedup_nchw,
        "speedup_vs_best_eager_tf32": row.speedup_best_tf32, **row.achieved(),
        "variants": {
            name: {**asdict(check), **(asdict(row.timings[name]) if name in row.timings else {}),
                   "backend": row.backends.get(name)}
            for name, check in row.checks.items()
        },
        "notes": row.notes,
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


CSV_LAYER_FIELDS = ["layer", "kind", "M", "M_mid", "N", "H", "W", "Ho", "Wo", "K", "stride",
                    "count", "batch", "mode", "flops", "bytes", "roofline_ms", "ok",
                    "speedup_vs_best_eager", "speedup_vs_nchw", "gflops", "gbps",
                    "roofline_fraction"]
CSV_VARIANT_FIELDS = ["variant", "status", "err_abs", "err_rel", "grad_err_rel", "median_ms",
                      "q25_ms", "q75_ms", "min_ms", "max_ms", "repeats", "backend"]


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """One line per (case, variant); times in ms."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_LAYER_FIELDS + CSV_VARIANT_FIELDS)
        for rec in records:
            for name, var in rec["variants"].items():
                vals = {**var, "variant": name}
                writer.writerow([rec.get(f) for f in CSV_LAYER_FIELDS]
                                + [vals.get(f) for f in CSV_VARIANT_FIELDS])


def write_plot(path: Path, rows: list[Row]) -> str | None:
    """Bars of the fused speedup over the best eager baseline per layer (fwd and fwdbwd), one
    panel per batch size, log scale with the 1.0 line. Returns an error text if it could not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc}"
    batches = sorted({r.batch for r in rows})
    layers = list(dict.fromkeys(r.layer.name for r in rows))
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(len(batches), 1, squeeze=False,
                             figsize=(max(6.0, 0.55 * len(layers) + 2), 3.2 * len(batches)))
    width = 0.8 / max(1, len(modes))
    for ax, batch in zip(axes[:, 0], batches):
        for j, mode in enumerate(modes):
            by_layer = {r.layer.name: r.speedup_best for r in rows
                        if r.batch == batch and r.mode == mode}
            offset = (j - (len(modes) - 1) / 2) * width
            pts = [(i + offset, by_layer[n]) for i, n in enumerate(layers) if by_layer.get(n)]
            # Bars grow from the 1.0 line: up for a speedup, down for a slowdown.
            ax.bar([x for x, _ in pts], [v - 1.0 for _, v in pts], width, bottom=1.0,
                   label=mode)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup vs best eager")
        ax.set_title(f"fused BSConv, batch {batch}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(out_dir: Path, markdown_path: Path | None, rows: list[Row],
                  summary: dict[str, Any], peaks: Peaks, machine: dict[str, Any],
                  config: dict[str, Any], command: str) -> list[Path]:
    """results.csv / .json / .md and speedup.png in ``out_dir`` (plus the Markdown copy)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [row_record(r) for r in rows]
    doc = {"schema": 1, "command": command, "machine": machine, "config": config,
           "peaks": asdict(peaks), "summary": summary, "results": records}
    paths = [out_dir / "results.csv", out_dir / "results.json", out_dir / "results.md"]
    write_csv(paths[0], records)
    paths[1].write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
    md = render_markdown(rows, summary, peaks, machine, command, config["dtype"])
    paths[2].write_text(md)
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(md)
        paths.append(markdown_path)
    plot = out_dir / "speedup.png"
    error = write_plot(plot, rows)
    if error is None:
        paths.append(plot)
    else:
        print(error, file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


EPILOG = textwrap.fill(
    "layers are named NET-{u,s}K.TAG: NET is mnv1 (MobileNetV1 at 224 px, blocks b01-b13) or "
    "cifar (ResNet-20: c16, c32, c64 and the stride-2 transitions), u = BSConv-U, s = BSConv-S "
    "(p = 1/6), K = depthwise kernel size. The shape column 'M->N HxW kK sS' (BSConv-S: "
    "M->M'->N) describes the layer's input x [B, M, H, W] and its convolutions.", 79
) + "\n\nvariants:\n" + "\n".join(f"  {k:<12} {v}" for k, v in VARIANT_HELP.items())


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a count >= 1, got 0")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:i], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(
            f"expected cpu or cuda[:i], got {text!r}: the benchmark has no {device.type} path")
    return device


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(
        prog="python -m bsconv_fused.bench",
        description="Latency of the fused BSConv ops vs eager NCHW / channels_last, "
                    "torch.compile and dense-conv baselines, with correctness checks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("default", "quick", "full"), default=None,
                   help="layer set (default: 'quick' with --quick, else 'default'); "
                        "--shapes selects from 'full' instead")
    p.add_argument("--shapes", default=None,
                   help="comma-separated substrings (regular expressions) of layer names, e.g. "
                        "'mnv1-u3,cifar-s5.c32$'; --list shows them")
    p.add_argument("--list", action="store_true", help="list the selected layers and exit")
    p.add_argument("--batch", type=_int_list, default=None,
                   help="comma-separated batch sizes (default 1,8; 1 with --quick)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="default float32")
    p.add_argument("--device", type=_device, default=torch.device(default_device),
                   help=f"cpu or cuda[:i] (default {default_device})")
    p.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both",
                   help="forward only, forward + backward, or both (default)")
    p.add_argument("--repeats", type=_positive, default=None,
                   help="timed rounds per case, at most (default 25; 3 with --quick)")
    p.add_argument("--min-repeats", type=_positive, default=None,
                   help="timed rounds per case, at least (default 5; 3 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per case that bound the repeats; 0 = no bound "
                        "(default 1.5; 0.5 with --quick)")
    p.add_argument("--warmup", type=_count, default=None,
                   help="untimed rounds per case, after the checking call (default 1)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-backends", action="store_true",
                   help="skip profiling which kernels each variant ran")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--malloc-as-is", dest="steady_malloc", action="store_false",
                   help="leave glibc's malloc thresholds to their dynamic adjustment (default: "
                   "pinned at its steady state, so that runs do not depend on what ran first)")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="output folder (default bench_out/)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also write the Markdown report here (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small suite, batch 1, few repeats, small peak probes")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """Resolves the quick / default values of the options."""
    quick = args.quick

    def pick(value: Any, normal: Any, fast: Any) -> Any:
        return value if value is not None else (fast if quick else normal)

    return Settings(
        device=args.device,
        dtype=DTYPES[args.dtype],
        batches=pick(args.batch, [1, 8], [1]),
        modes=list(MODES) if args.mode == "both" else [args.mode],
        warmup=pick(args.warmup, 1, 1),
        repeats=pick(args.repeats, 25, 3),
        min_repeats=pick(args.min_repeats, 5, 3),
        budget=pick(args.budget, 1.5, 0.5),
        compile_ref=not args.no_compile,
        profile_backends=not args.no_backends,
    )


def config_record(cfg: Settings, layers: list[Layer]) -> dict[str, Any]:
    """The run's settings, for the JSON report."""
    return {
        "dtype": str(cfg.dtype).replace("torch.", ""), "device": str(cfg.device),
        "batches": cfg.batches, "modes": cfg.modes, "warmup": cfg.warmup,
        "repeats": cfg.repeats, "min_repeats": cfg.min_repeats, "budget_s": cfg.budget,
        "compile": cfg.compile_ref, "layers": [lay.name for lay in layers],
        "tolerance_rel": TOLERANCE[cfg.dtype],
    }


def list_layers(layers: list[Layer], patterns: str | None) -> int:
    """``--list`` (or an empty selection): prints the layers; exit status 2 if there are none."""
    for lay in layers:
        print(f"{lay.name:<20} {lay.describe():<28} x{lay.count}")
    if layers:
        return 0
    print(f"no layer matches --shapes {patterns!r}", file=sys.stderr)
    return 2


def print_header(machine: dict[str, Any], cfg: Settings, note: str | None) -> None:
    """Machine, settings and warnings, before anything runs."""
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), device {cfg.device}, "
          f"dtype {str(cfg.dtype).replace('torch.', '')}")
    print(f"allocator: {machine.get('allocator', 'as is')}")
    if "cudnn" in machine:
        print(f"GPU {machine['gpu']}; cuDNN flags {machine['cudnn']}")
    for warning in (note, busy_warning(machine["load_avg_start"], machine["cores"])):
        if warning:
            print("WARNING: " + warning)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns 1 if the fused op failed a correctness check, else 0
    (2 for unusable options)."""
    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        layers = select_layers(args.suite or ("quick" if args.quick else "default"), args.shapes)
    except re.error as exc:
        print(f"bad --shapes pattern: {exc}", file=sys.stderr)
        return 2
    if args.list or not layers:
        return list_layers(layers, args.shapes)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = settings_from(args)
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if cfg.device.type == "cuda" and (cfg.device.index or 0) >= torch.cuda.device_count():
        print(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA "
              "device(s)", file=sys.stderr)
        return 2
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bsconv_fused.bench"] + [shlex.quote(a) for a in argv_list])
    machine = machine_info(cfg.device)
    machine["allocator"] = steady_allocator() if args.steady_malloc else "as is"
    note = fused_note(cfg.device)
    print_header(machine, cfg, note)
    peaks = measure_peaks(cfg.device, cfg.dtype, args.quick)
    print(f"peaks: GEMM {peaks.flops / 1e9:.1f} GFLOP/s ({peaks.gemm_dtype}, n={peaks.gemm_n}), "
          f"copy {peaks.bytes_per_s / 1e9:.1f} GB/s")
    print(f"{len(layers)} layers x batches {cfg.batches} x modes {cfg.modes}", flush=True)
    rows = run_suite(layers, cfg, peaks, show_progress=not args.no_progress)
    for r in rows:
        r.notes += [note] if note else []
    summary = summarize(rows)
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    machine["load_avg_end"] = load_average()
    print()
    print(render_text(rows, summary, peaks))
    paths = write_outputs(args.out, args.markdown, rows, summary, peaks, machine,
                          config_record(cfg, layers), command)
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({summary['elapsed_s']:.0f} s)")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
