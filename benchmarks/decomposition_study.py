"""Decomposition study: are trained convolutions closer to BSConv (intra-kernel) or to DSC
(cross-kernel) separation?

1. Train a small regular CNN on scikit-learn's digits (8x8 upsampled to 16x16; packaged, no
   download).
2. Measure the paper's PCA statistic (Haase & Amthor 2020, Sec. 3.1) on its kernels, along depth
   (blueprints) and across filters (what DSC exploits), next to the random initialization.
3. Decompose every 3x3 conv except the stem (one input channel) into (a) BSConv-U and (b)
   depthwise separable with r = 1 and with the smallest r whose MACs reach BSConv-U's, each
   data-free (SVD) and data-driven (refit on a few batches, :mod:`bsconv_fused.decompose`).
   Report per layer the relative response error isolated (original inputs) and cumulative
   (inputs from the converted earlier layers), MACs, params, test accuracy right after the
   conversion and after a short fixed fine-tune, next to the same architectures trained from
   scratch with the original's recipe.

Usage (the default run takes a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/decomposition_study.py [--seeds 0 1 2] [--doc docs/decomposition.md]

Outputs go to ``--out`` (default ``bench_out/decomposition``): ``results.json``, ``tables.md``
and ``blueprint_variance.png``. With ``--doc`` the tables replace the block between
``<!-- study:begin -->`` and ``<!-- study:end -->`` in that file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bsconv_fused import BSConvS, BSConvU, analysis, decompose  # noqa: E402

WIDTHS = (16, 32, 32, 64, 64)  # conv widths; max-pool after the 2nd and 4th conv
POOL_AFTER = (1, 3)


# ------------------------------------------------------------------------------------- data

def load_data(size: int = 16, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as [B, 1, size, size] float32 (standardized), stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    itr, ite = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed,
                                stratify=d.target)
    return x[itr], y[itr], x[ite], y[ite]


# ------------------------------------------------------------------------------------- models

Block = Callable[[int, int], nn.Module]


def regular_block(cin: int, cout: int) -> nn.Module:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


def bsconv_u_block(cin: int, cout: int) -> nn.Module:
    return BSConvU(cin, cout, 3, padding=1, bias=False)


def dsc_block(rank: int | str) -> Block:
    def make(cin: int, cout: int) -> nn.Module:
        r = decompose.matching_rank(regular_block(cin, cout)) if rank == "match" else int(rank)
        return nn.Sequential(OrderedDict([
            ("dw", nn.Conv2d(cin, cin * r, 3, padding=1, groups=cin, bias=False)),
            ("pw", nn.Conv2d(cin * r, cout, 1, bias=False))]))
    return make


def make_cnn(block: Block = regular_block) -> nn.Sequential:
    """conv-BN-ReLU x 5 (stem always regular), two max-pools, global average pool, linear."""
    chans = (1, *WIDTHS)
    layers: list[nn.Module] = []
    for i in range(len(WIDTHS)):
        make = regular_block if i == 0 else block
        layers += [make(chans[i], chans[i + 1]), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        if i in POOL_AFTER:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTHS[-1], 10)]
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
          seed: int, bs: int = 64, wd: float = 5e-4) -> nn.Module:
    """AdamW with a one-cycle schedule (the same recipe for every model)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(x) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean()) * 100.0


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of convolutions (regular, grouped, BSConv) and linear layers."""
    total = 0
    handles = []

    def conv_hook(m: nn.Conv2d, _a: Any, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += out.shape[-2] * out.shape[-1] * m.out_channels * m.in_channels // m.groups * k

    def bs_hook(m: nn.Module, a: Any, out: torch.Tensor) -> None:
        nonlocal total
        h, w = a[0].shape[-2:]
        for name in ("pw", "pw1", "pw2"):
            if name in m._modules:
                c = m._modules[name]
                total += h * w * c.in_channels * c.out_channels
        dw = m._modules["dw"]
        total += out.shape[-2] * out.shape[-1] * dw.out_channels * dw.kernel_size[0] * \
            dw.kernel_size[1]

    def lin_hook(m: nn.Linear, _a: Any, _o: Any) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    inside: set[int] = set()
    for m in model.modules():
        if isinstance(m, (BSConvU, BSConvS)):
            handles.append(m.register_forward_hook(bs_hook))
            inside.update(id(c) for c in m.modules() if c is not m)
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(lin_hook))
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return total


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- study

VARIANTS: "OrderedDict[str, dict[str, Any]]" = OrderedDict([
    ("BSConv-U", {"variant": "u", "kw": {}, "block": bsconv_u_block}),
    ("DSC r=1", {"variant": "dsc", "kw": {"rank": 1}, "block": dsc_block(1)}),
    ("DSC r=match", {"variant": "dsc", "kw": {"rank": "match"}, "block": dsc_block("match")}),
])


def isolated_errors(model: nn.Module, calib: list[torch.Tensor], names: list[str]
                    ) -> dict[str, dict[str, tuple[float, float]]]:
    """Per variant and layer: (data-free, data-driven) response error on the original inputs."""
    mods = dict(model.named_modules())
    caps: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = [mods[n].register_forward_pre_hook(
        lambda _m, a, n=n: caps[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        for x in calib:
            model(x)
    for h in hs:
        h.remove()
    out: dict[str, dict[str, tuple[float, float]]] = {v: {} for v in VARIANTS}
    for n in names:
        conv = mods[n]
        st = decompose.PatchStats.collect(conv, caps[n])
        for label, spec in VARIANTS.items():
            if spec["variant"] == "u":
                r = decompose.to_bsconv_u(conv, stats=st)
            else:
                rank = spec["kw"]["rank"]
                rank = decompose.matching_rank(conv) if rank == "match" else rank
                r = decompose.to_depthwise_separable(conv, rank, stats=st)
            out[label][n] = (float(r.response_error_svd), float(r.response_error))
    return out


def run_seed(seed: int, args: argparse.Namespace, data: tuple[torch.Tensor, ...],
             log: Callable[[str], None]) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    calib = [xtr[i:i + 128] for i in range(0, min(args.calib, len(xtr)), 128)]
    res: dict[str, Any] = {"seed": seed}
    torch.manual_seed(seed)
    init = make_cnn()
    base = train(copy.deepcopy(init), xtr, ytr, args.epochs, args.lr, seed)
    res["original"] = {"acc": accuracy(base, xte, yte), "macs": count_macs(base, xte),
                       "params": n_params(base)}
    log(f"[seed {seed}] original: {res['original']['acc']:.2f} %")

    # PCA statistic of the kernels (trained vs init)
    bv = {}
    for tag, net in (("trained", base), ("init", init)):
        for axis in ("depth", "filters"):
            r = analysis.blueprint_variance(net, axis=axis, example_input=xtr[:2])
            bv[f"{tag}/{axis}"] = analysis.summarize_variance(r)
            if tag == "trained" and axis == "depth" and seed == args.seeds[0]:
                analysis.plot_blueprint_variance(
                    r, os.path.join(args.out, "blueprint_variance.png"),
                    title="digits CNN: depth-slice variance explained by PC 1")
    res["blueprint_variance"] = bv

    names = [n for n, m in base.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "0"]
    res["layers"] = names
    res["shapes"] = {n: [dict(base.named_modules())[n].in_channels,
                         dict(base.named_modules())[n].out_channels] for n in names}
    res["isolated"] = isolated_errors(base, calib, names)
    res["variants"] = {}
    for label, spec in VARIANTS.items():
        entry: dict[str, Any] = {}
        for mode in ("free", "driven"):
            t0 = time.time()
            conv_model, reps = decompose.convert_trained(
                base, spec["variant"], calib, kernel_sizes=(3,), exclude=("0",),
                refine=(mode == "driven"), **spec["kw"])
            acc0 = accuracy(conv_model, xte, yte)
            ft = train(conv_model, xtr, ytr, args.finetune_epochs, args.finetune_lr, seed + 1000)
            entry[mode] = {
                "acc": acc0, "acc_finetuned": accuracy(ft, xte, yte),
                "cumulative": {r.name: r.response_error for r in reps},
                "kernel_error": {r.name: r.kernel_error for r in reps},
                "rank": {r.name: r.rank for r in reps},
                "layer_macs": {r.name: [r.macs_before, r.macs_after] for r in reps},
                "macs": count_macs(conv_model, xte), "params": n_params(conv_model),
            }
            log(f"[seed {seed}] {label} {mode}: {acc0:.2f} % -> fine-tuned "
                f"{entry[mode]['acc_finetuned']:.2f} % ({time.time() - t0:.0f} s)")
        torch.manual_seed(seed)
        scratch = train(make_cnn(spec["block"]), xtr, ytr, args.epochs, args.lr, seed)
        entry["scratch"] = {"acc": accuracy(scratch, xte, yte),
                            "macs": count_macs(scratch, xte), "params": n_params(scratch)}
        log(f"[seed {seed}] {label} from scratch: {entry['scratch']['acc']:.2f} %")
        res["variants"][label] = entry
    return res


# ------------------------------------------------------------------------------------- tables

def _ms(vals: list[float], fmt: str = "{:.1f}") -> str:
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def tables(results: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    r0 = results[0]
    names = r0["layers"]
    last = names[-1]
    lines: list[str] = []
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines.append(
        f"Setup: digits (scikit-learn), 8x8 upsampled to 16x16, 1257 train / 540 test images; "
        f"CNN conv{WIDTHS} (3x3, BN, ReLU, two max-pools, GAP, linear), trained {args.epochs} "
        f"epochs (AdamW, one-cycle, lr {args.lr}); refinement data: the first {args.calib} "
        f"training images; fine-tune: {args.finetune_epochs} epochs (lr {args.finetune_lr}), "
        f"identical for every row; from scratch: the original's recipe. Seeds: {seeds} "
        f"(mean ± std over seeds where more than one). Runtime {seconds / 60:.1f} min "
        f"({platform.machine()}, {torch.get_num_threads()} thread(s)).")
    lines.append("")
    o = [r["original"]["acc"] for r in results]
    lines.append("| model | MACs / image | params | test acc. after conversion: SVD / "
                 "data-driven | after fine-tune: SVD / data-driven | same architecture from "
                 "scratch |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    lines.append(f"| regular 3x3 convs (original) | {r0['original']['macs'] / 1e6:.2f} M | "
                 f"{r0['original']['params'] / 1e3:.1f} k | {_ms(o)} | - | {_ms(o)} |")
    for label in VARIANTS:
        v0 = r0["variants"][label]
        f = [r["variants"][label]["free"]["acc"] for r in results]
        d = [r["variants"][label]["driven"]["acc"] for r in results]
        ff = [r["variants"][label]["free"]["acc_finetuned"] for r in results]
        df = [r["variants"][label]["driven"]["acc_finetuned"] for r in results]
        sc = [r["variants"][label]["scratch"]["acc"] for r in results]
        lines.append(f"| {label} | {v0['driven']['macs'] / 1e6:.2f} M | "
                     f"{v0['driven']['params'] / 1e3:.1f} k | {_ms(f)} / {_ms(d)} | "
                     f"{_ms(ff)} / {_ms(df)} | {_ms(sc)} |")
    lines.append("")
    lines.append("Relative response error ||Y - Y'|| / ||Y|| of each converted conv (pre-BN "
                 "output), SVD -> data-driven. *Isolated*: the layer alone, on the original "
                 "inputs. *Cumulative*: all earlier layers converted too (data-driven: refitted "
                 "layer by layer on the converted model's inputs against the original "
                 "responses). Kernel error: relative Frobenius error of the SVD kernel.")
    lines.append("")
    hdr = "| layer (M -> N) | " + " | ".join(
        f"{lab}: kernel err. | {lab}: isolated | {lab}: cumulative" for lab in VARIANTS) + " |"
    lines.append(hdr)
    lines.append("|---" * (1 + 3 * len(VARIANTS)) + "|")
    for n in names:
        m_, n_ = r0["shapes"][n]
        cells = [f"{n} ({m_} -> {n_})"]
        for label in VARIANTS:
            ke = [r["variants"][label]["free"]["kernel_error"][n] for r in results]
            i0 = [r["isolated"][label][n][0] for r in results]
            i1 = [r["isolated"][label][n][1] for r in results]
            c0 = [r["variants"][label]["free"]["cumulative"][n] for r in results]
            c1 = [r["variants"][label]["driven"]["cumulative"][n] for r in results]
            rank = r0["variants"][label]["free"]["rank"][n]
            tag = f" (r={rank})" if label == "DSC r=match" else ""
            cells += [f"{_ms(ke, '{:.3f}')}{tag}", f"{_ms(i0, '{:.3f}')} -> {_ms(i1, '{:.3f}')}",
                      f"{_ms(c0, '{:.3f}')} -> {_ms(c1, '{:.3f}')}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("MACs per image of the converted convs (original -> converted): " + "; ".join(
        f"{lab}: " + ", ".join(
            f"{r0['variants'][lab]['free']['layer_macs'][n][0] / 1e3:.0f}k -> "
            f"{r0['variants'][lab]['free']['layer_macs'][n][1] / 1e3:.0f}k" for n in names)
        for lab in VARIANTS) + f" (layers {', '.join(names)}; final layer {last}).")
    lines.append("")
    lines.append("Share of variance explained by the first principal component (paper, Sec. "
                 "3.1), mean per stage: along depth (per filter: the M slices, what BSConv "
                 "exploits) and across filters (per input channel: the N slices, what DSC "
                 "exploits), trained vs. random initialization (the stem, one input channel, has "
                 "no depth axis).")
    lines.append("")
    stages = list(r0["blueprint_variance"]["trained/depth"])
    lines.append("| stage | depth, trained | depth, init | across filters, trained | "
                 "across filters, init |")
    lines.append("|---|---:|---:|---:|---:|")
    for s in stages:
        cells = [s]
        for key in ("trained/depth", "init/depth", "trained/filters", "init/filters"):
            cells.append(_ms([r["blueprint_variance"][key][s]["mean"] for r in results],
                             "{:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_doc(path: str, text: str) -> None:
    begin, end = "<!-- study:begin -->", "<!-- study:end -->"
    doc = pathlib.Path(path).read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    pathlib.Path(path).write_text(f"{head}{begin}\n{text}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--calib", type=int, default=256, help="training images used for refinement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "decomposition"))
    ap.add_argument("--doc", default=None, help="markdown file whose study block is replaced")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = load_data()
    t0 = time.time()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args, data, lambda s: print(s, flush=True)))
    text = tables(results, args, time.time() - t0)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1, default=float)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(text)
    if args.doc:
        update_doc(args.doc, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
