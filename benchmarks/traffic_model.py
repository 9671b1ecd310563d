"""Paper performance of the CUDA kernels until a GPU can measure them.

For every layer of the benchmark suite: DRAM bytes and FLOPs of the fused CUDA kernels (with the
halo recompute of the tile sizes the real launcher picks, from the same C++ configuration
function) against the unfused two-layer path, and the roofline-bound times on A100 and H100. The
expected speedup is the ratio of the two bounds: the fused kernels cannot beat their bound, and
the unfused path (cuDNN / PyTorch kernels) at best reaches its own.

    python benchmarks/traffic_model.py [--batch 8] [--dtype float32] [--out benchmarks/TRAFFIC.md]

Model (bytes of the given dtype, weights included once):
  unfused forward   read x, write v, read v, write y       (BSConv-S: + write u, read u)
  fused forward     read x once per channel chunk of a tile (halo included), write y
  unfused backward  autograd of the two layers with v (and u) saved: read gy, v; write gv; read gv,
                    x; write gx (BSConv-S: + gu, u traffic); weight-gradient reads/writes
  fused backward    read x and gy (with the halo of the tile), write gx; v recomputed
FLOPs: 2 per multiply-add; the fused path adds the projection recompute on the halo (forward) and
the recompute of v (backward). A fused launch with fewer blocks than SMs is charged the idle SMs
(peak and bandwidth scaled by blocks / SMs); the unfused path is assumed to fill the GPU.
Published peak figures (NVIDIA datasheets, dense): A100 SXM 80 GB:
19.5 TFLOP/s FP32, 156 TF32, 312 FP16/BF16, 2039 GB/s; H100 SXM: 67 FP32, 495 TF32, 989 FP16/BF16,
3350 GB/s. Shared memory per block with opt-in: 163 KiB (A100), 227 KiB (H100).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bsconv_fused._emu  # noqa: E402,F401  (the C++ launch-configuration function)

from bsconv_fused.bench import Layer, full_suite, select_layers  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    name: str
    fp32: float   # FLOP/s
    tf32: float
    half: float
    bw: float     # bytes/s
    smem: int     # bytes per block (opt-in)
    sms: int


GPUS = [
    Gpu("A100", 19.5e12, 156e12, 312e12, 2039e9, 163 * 1024, 108),
    Gpu("H100", 67e12, 495e12, 989e12, 3350e9, 227 * 1024, 132),
]
PROJ = {"float32": 0, "tf32": 3, "float16": 1, "bfloat16": 2}
ITEMSIZE = {"float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2}


def tiles(layer: Layer, batch: int, proj: int, smem: int, sms: int) -> Dict[str, int]:
    """The tile sizes the CUDA launcher would choose (same C++ function as the real build)."""
    dtype = torch.float16 if proj in (1, 2) else torch.float32
    x = torch.empty(1, 1, 1, 1, dtype=dtype).expand(batch, layer.m, layer.h, layer.w)
    pws = layer.pw_shapes
    pw1 = torch.empty(1, 1, 1, 1, dtype=dtype).expand(pws[0][0], pws[0][1], 1, 1)
    pw2 = (torch.empty(1, 1, 1, 1, dtype=dtype).expand(pws[1][0], pws[1][1], 1, 1)
           if len(pws) > 1 else None)
    dw = torch.empty(1, 1, 1, 1, dtype=dtype).expand(layer.n, 1, layer.k, layer.k)
    p = layer.padding
    cfg = torch.ops.bsconv_fused_emu.config(x, pw1, pw2, dw, [layer.stride] * 2, [p] * 4, [1, 1],
                                            0, proj, smem, False, sms)
    keys = ["f_ok", "f_grid", "f_block", "f_smem", "f_tasks", "b_ok", "b_grid", "b_block",
            "b_smem", "b_tasks", "f_th", "f_tw", "f_nc", "f_ph", "f_pw", "b_th", "b_tw", "f_group"]
    return dict(zip(keys, cfg))


def traffic(layer: Layer, batch: int, itemsize: int, t: Dict[str, int]) -> Dict[str, float]:
    ho, wo = layer.out_hw
    hw, ohw = layer.h * layer.w, ho * wo
    x = batch * layer.m * hw
    v = batch * layer.n * hw
    u = batch * layer.mid * hw
    y = batch * layer.n * ohw
    wts = layer.weight_elems()
    pw_flops = 2.0 * batch * hw * sum(o * i for o, i in layer.pw_shapes)
    dw_flops = 2.0 * batch * ohw * layer.n * layer.k * layer.k
    # Fused forward: every task (image, group of channel chunks, tile) projects its patch (tile +
    # halo) of x. BSConv-U splits W by chunks (the projection is only widened by the halo);
    # BSConv-S computes the M' subspace once per task, i.e. once per group.
    chunks = math.ceil(layer.n / t["f_nc"])
    groups = math.ceil(chunks / t["f_group"])
    tiles_fwd = math.ceil(ho / t["f_th"]) * math.ceil(wo / t["f_tw"])
    recompute = tiles_fwd * t["f_ph"] * t["f_pw"] / hw
    if layer.kind == "S":
        u_flops = 2.0 * batch * hw * layer.mid * layer.m
        fwd_fused_flops = (u_flops * groups + (pw_flops - u_flops)) * recompute + dw_flops
    else:
        fwd_fused_flops = pw_flops * recompute + dw_flops
    # DRAM: x once per image plus its halo; the re-reads of other channel chunks hit L2 (an
    # image's x slab is at most a few MB here, the L2 is 40-50 MB).
    x_dram = x * recompute
    unfused_fwd = x + 2 * v + 2 * u + y + wts
    fused_fwd = x_dram + y + wts
    # Backward (the unfused path keeps v, u from the forward).
    unfused_bwd = y + v + v + v + x + x + 2 * u + 2 * u + 2 * wts
    halo = (t["b_th"] + layer.k - 1) * (t["b_tw"] + layer.k - 1) / (t["b_th"] * t["b_tw"])
    fused_bwd = 2 * x + y * halo + 2 * wts
    bwd_flops = 2.0 * (pw_flops + dw_flops)
    return {
        "unfused_fwd_bytes": itemsize * unfused_fwd, "fused_fwd_bytes": itemsize * fused_fwd,
        "unfused_fwd_flops": pw_flops + dw_flops, "fused_fwd_flops": fwd_fused_flops,
        "unfused_bwd_bytes": itemsize * unfused_bwd, "fused_bwd_bytes": itemsize * fused_bwd,
        "unfused_bwd_flops": bwd_flops, "fused_bwd_flops": bwd_flops + pw_flops,
    }


def bound(flops: float, nbytes: float, peak: float, bw: float) -> float:
    return max(flops / peak, nbytes / bw)


def table_for(layers: List[Layer], batch: int, dtype: str) -> List[str]:
    """The Markdown table of one dtype (float32: exact SIMT; tf32 / float16: tensor cores)."""
    proj, itemsize = PROJ[dtype], ITEMSIZE[dtype]
    lines = [f"Batch {batch}, {dtype}. Bytes in MB, FLOPs in GFLOP; bound = "
             "max(FLOPs / peak, bytes / bandwidth); speedup = unfused bound / fused bound.", "",
             "| layer | shape | fwd MB unfused / fused | fwd GFLOP unfused / fused | "
             "bwd MB unfused / fused | " + " | ".join(
                 f"{g.name} fwd speedup | {g.name} fwd+bwd speedup" for g in GPUS) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(GPUS)]
    for layer in layers:
        cols = []
        for g in GPUS:
            t = tiles(layer, batch, proj, g.smem, g.sms)
            m = traffic(layer, batch, itemsize, t)
            peak = {"float32": g.fp32, "tf32": g.tf32}.get(dtype, g.half)
            # A launch with fewer blocks than SMs can use only that share of the machine.
            uf_ = min(1.0, t["f_tasks"] / g.sms)
            ub_ = min(1.0, t["b_grid"] / g.sms)
            uf = bound(m["unfused_fwd_flops"], m["unfused_fwd_bytes"], peak, g.bw)
            ff = bound(m["fused_fwd_flops"], m["fused_fwd_bytes"], peak * uf_, g.bw * uf_)
            ub = bound(m["unfused_bwd_flops"], m["unfused_bwd_bytes"], peak, g.bw)
            fb = bound(m["fused_bwd_flops"], m["fused_bwd_bytes"], peak * ub_, g.bw * ub_)
            cols.append(f"{uf / ff:.2f}x | {(uf + ub) / (ff + fb):.2f}x")
        lines.append(
            f"| {layer.name} | {layer.describe()} | {m['unfused_fwd_bytes'] / 1e6:.1f} / "
            f"{m['fused_fwd_bytes'] / 1e6:.1f} | {m['unfused_fwd_flops'] / 1e9:.2f} / "
            f"{m['fused_fwd_flops'] / 1e9:.2f} | {m['unfused_bwd_bytes'] / 1e6:.1f} / "
            f"{m['fused_bwd_bytes'] / 1e6:.1f} | " + " | ".join(cols) + " |")
    return lines


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(PROJ), nargs="+",
                    default=["float32", "tf32", "float16"])
    ap.add_argument("--suite", default="default", choices=["default", "full"])
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    layers = select_layers(args.suite, None) if args.suite == "default" else full_suite()
    lines: List[str] = []
    for dtype in args.dtype:
        lines += table_for(layers, args.batch, dtype) + [""]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Traffic model of the CUDA kernels (paper performance)\n\n")
            f.write("Generated by `python benchmarks/traffic_model.py --out "
                    "benchmarks/TRAFFIC.md`; see the script's docstring for the model.\n\n")
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
