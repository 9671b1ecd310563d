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
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="results.json written by the benchmark")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args()
    data = json.loads(args.results.read_text())
    text = render(bound_rows(data), data)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
