"""Upper bounds on the fused op's speedup, from a benchmark run's results.json.

The fused kernels never store the intermediate v = W x, so the backward recomputes it: a
forward + backward runs four projection GEMMs (forward, recompute, gx, weight gradient) where
the unfused path runs three. A GEMM cannot run faster than the machine's measured GEMM peak, so
for every case

    fused time >= projection FLOPs x (1 forward, 4 forward + backward) / peak GEMM rate,

and the best speedup any fused kernel of this design can reach over the measured best eager
baseline is best_eager_ms / that bound. Where the bound is below an issue target, the target is
out of reach for that shape on this machine, whatever the depthwise and memory code does.

    python benchmarks/bounds.py bench_results/results.json [--markdown OUT]

The peak is that of one large square GEMM; the narrow GEMMs of real layers run slower.
``--measure`` replaces the peak by a measurement: for every case of the suite it times, side by
side in one round-robin run, the eager baselines, the fused op and the design's projection
GEMMs alone (each the faster of ``torch.mm`` into a preallocated output and the channels-last 1x1
convolution of the layer's images, i.e. the kernels eager runs; the shapes the fused kernels run:
per projection one GEMM forward; forward + backward adds the recompute, the input gradient and
the weight gradient). Best eager / GEMMs-alone bounds the speedup of this design at the rate the
libraries reach on the layer's shapes: a fused op beats it only by running its GEMMs faster than
MKL and oneDNN do (``fused / GEMMs`` below 1):

    python benchmarks/bounds.py --measure [--threads N] [--shapes RE] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
from bsconv_fused import bench  # noqa: E402  (its option parsers; --measure runs its layers)


def projection_flops(r: dict) -> float:
    """FLOPs of the projection GEMM(s) of one forward call."""
    macs = r["M"] * r["M_mid"] + r["M_mid"] * r["N"] if r["M_mid"] else r["M"] * r["N"]
    return 2.0 * r["batch"] * r["H"] * r["W"] * macs


def bound_rows(data: dict) -> list[dict]:
    peak = data["peaks"]["flops"]
    rows = []
    for r in data["results"]:
        v = r["variants"]
        eager = [v[k]["median_ms"] for k in ("ref_nchw", "ref_cl")
                 if v.get(k, {}).get("median_ms") is not None]
        fused = v.get("fused", {}).get("median_ms")
        if not eager or fused is None:
            continue
        gemms = 1 if r["mode"] == "fwd" else 4
        floor_ms = gemms * projection_flops(r) / peak * 1e3
        best = min(eager)
        rows.append({
            "layer": r["layer"], "batch": r["batch"], "mode": r["mode"],
            "best_eager_ms": best, "fused_ms": fused, "gemm_floor_ms": floor_ms,
            "speedup": best / fused, "max_speedup": best / floor_ms,
        })
    return rows


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def render(rows: list[dict], data: dict) -> str:
    peak = data["peaks"]["flops"] / 1e9
    out = [f"GEMM peak {peak:.1f} GFLOP/s ({data['machine'].get('torch_threads')} threads); "
           "max x = best eager / (projection GEMMs at peak: 1 forward, 4 forward+backward)", "",
           "| layer | B | mode | best eager ms | fused ms | GEMM floor ms | x best | max x |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layer']} | {r['batch']} | {r['mode']} | {r['best_eager_ms']:.3g} | "
                   f"{r['fused_ms']:.3g} | {r['gemm_floor_ms']:.3g} | {r['speedup']:.2f}x | "
                   f"{r['max_speedup']:.2f}x |")
    out.append("")
    for mode in ("fwd", "fwdbwd"):
        sel = [r for r in rows if r["mode"] == mode]
        out.append(f"- {mode}: geomean x best {geomean([r['speedup'] for r in sel]):.2f}x; "
                   f"geomean of the bound {geomean([r['max_speedup'] for r in sel]):.2f}x; "
                   f"cases whose bound is below 2x: "
                   f"{sum(r['max_speedup'] < 2 for r in sel)} of {len(sel)}")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# --measure: the projection GEMMs alone, timed beside the baselines

def gemm_plan(pw_shapes: list[tuple[int, int]], pixels: int, mode: str) -> list[tuple[str, int,
                                                                                    int, int]]:
    """The projection GEMMs of one call of the fused design as (role, rows, inner, cols).

    ``pw_shapes``: (out, in) channels per projection, first to last; ``pixels``: B * H * W of
    the input grid (the projections run before the depthwise's stride). Forward: each
    projection [pixels, in] x [in, out]. Forward + backward: the forward, its recompute, then
    from the last projection back the weight gradient [out, pixels] x [pixels, in] and the
    input gradient [pixels, out] x [out, in].
    """
    fwd = [("proj", pixels, i, o) for o, i in pw_shapes]
    if mode == "fwd":
        return fwd
    back = []
    for o, i in reversed(pw_shapes):
        back += [("wgrad", o, pixels, i), ("igrad", pixels, o, i)]
    return fwd + [("recompute", r, k, c) for _, r, k, c in fwd] + back


def _gemm_candidates(role: str, rows: int, inner: int, cols: int, gen: object,
                     image: tuple[int, int, int] | None = None
                     ) -> list[tuple[str, Callable[[], object]]]:
    """Ways to run one GEMM of the plan: ``torch.mm`` (MKL) into a preallocated output, and the
    1x1 convolution that is this GEMM on channels-last images (oneDNN, the kernels eager runs):
    its forward for the pixels-major products, its weight gradient for ``wgrad``. ``image``:
    (batch, height, width) of the pixels (default: one column of ``rows`` or ``inner`` pixels).
    """
    import torch

    pixels = inner if role == "wgrad" else rows
    b, h, w = image if image is not None else (1, pixels, 1)
    if b * h * w != pixels:
        raise ValueError(f"image {image} does not hold {pixels} pixels")

    def channels_last(mat: torch.Tensor) -> torch.Tensor:  # [pixels, c] -> [b, c, h, w]
        c = mat.shape[1]
        return mat.reshape(b, h, w, c).permute(0, 3, 1, 2)

    if role == "wgrad":  # G^T [out, pixels] x X [pixels, in]
        g_pix = torch.randn(inner, rows, generator=gen)
        x_pix = torch.randn(inner, cols, generator=gen)
        a, bm = g_pix.t(), x_pix
        out = torch.empty(rows, cols)
        weight = torch.empty(rows, cols, 1, 1)
        g_img, x_img = channels_last(g_pix), channels_last(x_pix)
        return [("mm", lambda: torch.mm(a, bm, out=out)),
                ("conv1x1_wgrad", lambda: torch.ops.aten.convolution_backward(
                    g_img, x_img, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                    [False, True, False])[1])]
    a = torch.randn(rows, inner, generator=gen)  # [pixels, in] x W^T
    w_mat = torch.randn(cols, inner, generator=gen)
    bm = w_mat.t()
    out = torch.empty(rows, cols)
    image_in, weight = channels_last(a), w_mat.reshape(cols, inner, 1, 1)
    return [("mm", lambda: torch.mm(a, bm, out=out)),
            ("conv1x1", lambda: torch.nn.functional.conv2d(image_in, weight))]


def gemm_step(plan: list[tuple[str, int, int, int]], seed: int = 0, probe_reps: int = 5,
              image: tuple[int, int, int] | None = None) -> tuple[Callable[[], None], list[str]]:
    """One call of the plan's GEMMs (float32), each run the faster of its candidates (picked
    by a few timed calls now), and the names picked. Operands are laid out as the fused
    kernels hold them (pixels-major activations)."""
    import time

    import torch

    gen = torch.Generator().manual_seed(seed)
    chosen, names = [], []
    for role, rows, inner, cols in plan:
        best = None
        for name, fn in _gemm_candidates(role, rows, inner, cols, gen, image):
            fn()
            times = []
            for _ in range(probe_reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            t = sorted(times)[len(times) // 2]
            if best is None or t < best[0]:
                best = (t, name, fn)
        chosen.append(best[2])
        names.append(best[1])

    def step() -> None:
        for fn in chosen:
            fn()

    return step, names


def measure_rows(layers: list, batches: list[int], modes: list[str], repeats: int,
                 budget: float, progress: Callable[[str], None]) -> list[dict]:
    """best eager, fused and GEMMs-alone medians per case, all timed in one round-robin."""
    import torch

    variants = [bench.Variant("ref_nchw", "reference"),
                bench.Variant("ref_cl", "reference", channels_last=True),
                bench.Variant("fused", "fused"),
                bench.Variant("fused_cl", "fused", channels_last=True)]
    rows = []
    for layer in layers:
        for batch in batches:
            problem = bench.make_problem(layer, batch, torch.device("cpu"))
            for mode in modes:
                plan = gemm_plan(layer.pw_shapes, batch * layer.h * layer.w, mode)
                steps: dict[str, Callable[[], None]] = {}
                for v in variants:
                    case = bench.leaves(problem, v, torch.float32, mode != "fwd")
                    steps[v.name] = lambda case=case, mode=mode: case.step(mode)
                steps["gemms"], picked = gemm_step(plan, image=(batch, layer.h, layer.w))
                t = bench.time_round_robin(steps, lambda: None, warmup=1, repeats=repeats,
                                           min_repeats=min(5, repeats), budget=budget)
                med = {k: v.median_ms for k, v in t.items()}
                best = min(med["ref_nchw"], med["ref_cl"])
                rows.append({
                    "layer": layer.name, "batch": batch, "mode": mode, "gemms": len(plan),
                    "gemm_flops": sum(2.0 * r * k * c for _, r, k, c in plan),
                    "best_eager_ms": best, "fused_ms": med["fused"],
                    "fused_cl_ms": med["fused_cl"], "gemms_ms": med["gemms"],
                    "speedup": best / med["fused"], "max_speedup": best / med["gemms"],
                })
                progress(f"{layer.name} B={batch} {mode}: x best {rows[-1]['speedup']:.2f}, "
                         f"max x {rows[-1]['max_speedup']:.2f}")
    return rows


def call_floor_ms(rounds: int = 9, calls: int = 500) -> float:
    """Median time of the cheapest eager forward + backward with four leaf tensors found: a
    ``torch.cat`` of four one-to-nine-element leaves (the fused op's x, weight, taps and bias),
    then ``backward``. The Python call, the graph, the autograd engine and four gradient
    accumulations: what every call of an eager op with four parameters pays whatever its kernels
    do (``F.conv2d`` on a 1-pixel image cost as much or more on the build machine)."""
    import statistics
    import time

    import torch

    leaves = [torch.randn(shape, requires_grad=True)
              for shape in ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1, 3, 3), (1,))]
    grad = torch.ones(12)

    def step() -> None:
        for t in leaves:
            t.grad = None
        torch.cat([t.view(-1) for t in leaves]).backward(grad)

    for _ in range(calls):
        step()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def floor_bound(rows: list[dict], floor_ms: float) -> float:
    """Geomean over forward + backward rows of best eager / (GEMMs alone + floor_ms)."""
    return geomean([r["best_eager_ms"] / (r["gemms_ms"] + floor_ms) for r in rows
                    if r["mode"] == "fwdbwd"])


def render_measured(rows: list[dict], threads: int, floor_ms: float | None = None) -> str:
    out = [f"{threads} thread(s); `GEMMs ms` = the projection GEMMs alone (per projection 1 "
           "forward, 4 forward+backward; each the faster of torch.mm (MKL) and the channels-last "
           "1x1 convolution of the layer's images (oneDNN: its forward, or its weight gradient)), "
           "timed in the same round-robin as the "
           "baselines; max x = best eager / GEMMs alone; fused / GEMMs: how far the fused op "
           "is above that floor", "",
           "| layer | B | mode | best eager ms | fused ms | fused_cl ms | GEMMs ms | GFLOP/s of "
           "the GEMMs | x best | max x | fused / GEMMs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["gemm_flops"] / r["gemms_ms"] / 1e6
        out.append(f"| {r['layer']} | {r['batch']} | {r['mode']} | {r['best_eager_ms']:.3g} | "
                   f"{r['fused_ms']:.3g} | {r['fused_cl_ms']:.3g} | {r['gemms_ms']:.3g} | "
                   f"{rate:.1f} | {r['speedup']:.2f}x | {r['max_speedup']:.2f}x | "
                   f"{r['fused_ms'] / r['gemms_ms']:.2f} |")
    out.append("")
    limits = {"fwd": (0.95, 1.3), "fwdbwd": (0.9, 2.0)}
    for mode in ("fwd", "fwdbwd"):
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        floor, target = limits[mode]
        below = [f"{r['layer']} B={r['batch']} ({r['max_speedup']:.2f}x)" for r in sel
                 if r["max_speedup"] < floor]
        out.append(f"- {mode}: geomean x best {geomean([r['speedup'] for r in sel]):.2f}x; "
                   f"geomean of the bound {geomean([r['max_speedup'] for r in sel]):.2f}x "
                   f"(target {target}x); cases whose bound is below {floor}x: {len(below)} of "
                   f"{len(sel)}" + (": " + ", ".join(below) if below else ""))
    if floor_ms is not None and any(r["mode"] == "fwdbwd" for r in rows):
        out.append(f"- fwdbwd with the autograd round trip of a 4-leaf eager op "
                   f"({floor_ms * 1e3:.0f} us, call_floor_ms) added to every case's GEMMs: "
                   f"geomean of the bound {floor_bound(rows, floor_ms):.2f}x (target 2.0x)")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="?",
                   help="results.json written by the benchmark (bound at the GEMM peak)")
    p.add_argument("--measure", action="store_true",
                   help="time the projection GEMMs alone beside the baselines instead")
    p.add_argument("--shapes", default=None, help="with --measure: layers, as the benchmark's")
    p.add_argument("--batch", type=bench._int_list, default=[1, 8],
                   help="with --measure: batch sizes (default 1,8)")
    p.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both")
    p.add_argument("--threads", type=bench._positive, default=None, help="torch.set_num_threads")
    p.add_argument("--repeats", type=bench._positive, default=15,
                   help="with --measure: rounds per case")
    p.add_argument("--budget", type=float, default=1.5,
                   help="with --measure: seconds of timing per case that bound the repeats")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    if args.measure == (args.results is not None):
        p.error("give either a results.json or --measure")
    if args.measure:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"allocator: {bench.steady_allocator()}", file=sys.stderr)  # as the benchmark
        try:
            layers = bench.select_layers("default", args.shapes)
        except re.error as exc:
            p.error(f"argument --shapes: bad pattern: {exc}")
        if not layers:
            p.error(f"argument --shapes: no layer matches {args.shapes!r}")
        modes = ["fwd", "fwdbwd"] if args.mode == "both" else [args.mode]
        rows = measure_rows(layers, args.batch, modes, args.repeats, args.budget,
                            lambda line: print(line, file=sys.stderr, flush=True))
        floor_ms = call_floor_ms() if "fwdbwd" in modes else None
        text = render_measured(rows, torch.get_num_threads(), floor_ms)
    else:
        data = json.loads(args.results.read_text())
        text = render(bound_rows(data), data)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
