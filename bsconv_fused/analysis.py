"""Kernel statistics of trained models: how close are their convolutions to BSConv?

Haase & Amthor (CVPR 2020, Sec. 3.1, Fig. 3) run a principal component analysis of every filter
kernel of trained CNNs along the depth axis: the ``M`` slices ``F[n, m]`` (``K_h x K_w`` each)
of filter ``n`` are the samples, and the share of their variance explained by the first
principal component measures how well one blueprint, scaled along depth, represents the filter.
:func:`blueprint_variance` computes that share per filter (``axis="depth"``, intra-kernel) and,
for comparison, the cross-kernel counterpart that a depthwise-separable convolution relies on
(``axis="filters"``: per input channel ``m``, the ``N`` slices ``F[:, m]``).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["blueprint_variance", "plot_blueprint_variance", "summarize_variance"]

def _first_pc_share(slices: torch.Tensor, center: bool) -> torch.Tensor:
    """slices [B, S, K] (B groups of S samples with K features) -> [B] share of the variance
    explained by the first principal component (NaN where the variance is zero)."""
    if center:
        slices = slices - slices.mean(dim=1, keepdim=True)
    s = torch.linalg.svdvals(slices)
    energy = s.square()
    total = energy.sum(-1)
    share = energy[..., 0] / total
    return torch.where(total > 0, share, torch.full_like(share, math.nan))


def _eligible(mod: nn.Module, kernel_sizes: Sequence[Any] | None) -> bool:
    if not isinstance(mod, nn.Conv2d) or mod.groups != 1:
        return False
    kh, kw = mod.kernel_size
    if kernel_sizes is None:
        return kh * kw > 1 and mod.in_channels > 1
    sizes = {(k, k) if isinstance(k, int) else tuple(k) for k in kernel_sizes}
    return (kh, kw) in sizes


def blueprint_variance(
    model: nn.Module,
    *,
    axis: str = "depth",
    center: bool = True,
    kernel_sizes: Sequence[int | tuple[int, int]] | None = None,
    example_input: torch.Tensor | None = None,
    stage_of: Callable[[str], str] | None = None,
) -> OrderedDict[str, OrderedDict[str, torch.Tensor]]:
    """Per filter, the share of variance explained by the first principal component.

    For every ``nn.Conv2d`` with ``groups == 1`` (and, by default, a kernel larger than 1x1 and
    more than one input channel; or exactly the sizes in ``kernel_sizes``), with weight
    [N, M, K_h, K_w]:

    * ``axis="depth"`` (the paper's measure): for each filter n the M slices [K_h * K_w] are the
      samples; result [N].
    * ``axis="filters"`` (cross-kernel, what DSC exploits): for each input channel m the N slices
      F[:, m] are the samples; result [M].

    ``center=True`` is PCA proper (the slices' mean is removed first); ``center=False`` gives the
    energy share of the best rank-1 approximation, i.e. ``1 - e^2`` with ``e`` the per-filter
    relative kernel error of :func:`bsconv_fused.decompose.to_bsconv_u`.

    Grouping into stages: by ``stage_of(name)`` if given; else, with ``example_input`` (one
    forward pass), by the layer's output resolution in order of appearance ("stage 1 (16x16)",
    ...); else by the first component of the qualified name.

    Returns ``{stage: {layer name: shares (float64 tensor)}}``; shares are NaN for all-zero
    kernels.
    """
    if axis not in ("depth", "filters"):
        raise ValueError(f"blueprint_variance: axis must be 'depth' or 'filters', got {axis!r}")
    convs = [(n, m) for n, m in model.named_modules() if _eligible(m, kernel_sizes)]
    res_of: dict[int, tuple[int, int]] = {}
    if stage_of is None and example_input is not None:
        handles = []

        def rec(mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
            res_of.setdefault(id(mod), (out.shape[-2], out.shape[-1]))

        for _, m in convs:
            handles.append(m.register_forward_hook(rec))
        was = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                model(example_input)
        finally:
            for h in handles:
                h.remove()
            for m, t in was.items():
                m.training = t
        convs.sort(key=lambda c: list(res_of).index(id(c[1])) if id(c[1]) in res_of
                   else len(res_of))
    stage_names: dict[tuple[int, int], str] = {}
    out: OrderedDict[str, OrderedDict[str, torch.Tensor]] = OrderedDict()
    for name, m in convs:
        w = m.weight.detach().to(torch.float64)
        w = w.reshape(w.shape[0], w.shape[1], -1)
        if axis == "filters":
            w = w.transpose(0, 1)
        share = _first_pc_share(w, center).cpu()
        if stage_of is not None:
            stage = stage_of(name)
        elif res_of:
            hw = res_of.get(id(m))
            if hw is None:
                stage = "not reached"
            else:
                if hw not in stage_names:
                    stage_names[hw] = f"stage {len(stage_names) + 1} ({hw[0]}x{hw[1]})"
                stage = stage_names[hw]
        else:
            stage = name.split(".")[0] if name else "model"
        out.setdefault(stage, OrderedDict())[name] = share
    return out


def summarize_variance(result: OrderedDict[str, OrderedDict[str, torch.Tensor]]
                       ) -> OrderedDict[str, dict[str, float]]:
    """Per stage: number of filters, mean and median share (NaNs ignored), and the fraction of
    filters whose first component explains more than half of the variance."""
    out: OrderedDict[str, dict[str, float]] = OrderedDict()
    for stage, layers in result.items():
        v = torch.cat(list(layers.values()))
        v = v[~torch.isnan(v)]
        n = v.numel()
        out[stage] = {
            "filters": float(n),
            "mean": float(v.mean()) if n else math.nan,
            "median": float(v.median()) if n else math.nan,
            "above_half": float((v > 0.5).double().mean()) if n else math.nan,
        }
    return out


def plot_blueprint_variance(
    result: OrderedDict[str, OrderedDict[str, torch.Tensor]],
    path: str | os.PathLike[str],
    *,
    bins: int = 20,
    title: str | None = None,
) -> str:
    """Writes histograms of the shares (one panel per stage, like the paper's Fig. 3) as a PNG
    to ``path`` (matplotlib, Agg backend). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    stages = list(result)
    if not stages:
        raise ValueError("plot_blueprint_variance: no layers to plot")
    cols = min(4, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                             sharex=True)
    edges = torch.linspace(0, 1, bins + 1).tolist()
    for ax, stage in zip(axes.flat, stages):
        v = torch.cat(list(result[stage].values()))
        v = v[~torch.isnan(v)]
        weights = [1.0 / max(1, v.numel())] * v.numel()
        ax.hist(v.tolist(), bins=edges, weights=weights, color="tab:blue", alpha=0.85)
        if v.numel():
            ax.axvline(float(v.median()), color="tab:red", lw=1, ls="--", label="median")
        ax.set_title(f"{stage} ({v.numel()} filters)", fontsize=9)
        ax.set_xlim(0, 1)
    for ax in axes.flat[len(stages):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("variance explained by PC 1")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of filters")
    fig.suptitle(title or "Variance of the depth slices explained by the first PC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
