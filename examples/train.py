#!/usr/bin/env python
"""Train a BSConv model (fused kernels) on scikit-learn's handwritten digits, end to end.

The data set ships inside scikit-learn (``sklearn.datasets.load_digits``: 1797 grayscale 8x8
images, 10 classes), so nothing is downloaded. The images are upsampled (bilinear) to
``--image-size`` and fed as 3 channels to a CIFAR model of the zoo (``bsconv_fused.models``):
``cifar_resnet20_bsconvu`` for ``--variant u``, ``cifar_resnet20_bsconvs_p1d4`` for ``--variant s``
(any zoo name via ``--arch``).

Recipe of the paper (Haase & Amthor, CVPR 2020) scaled down: SGD with momentum 0.9 and weight
decay 1e-4, cosine learning-rate schedule, random-crop augmentation, and for BSConv-S the
orthonormal regularization ``bsconv_fused.orthonormal_loss(model, alpha)`` added to the loss.

Outputs in ``--out``: ``curves.png`` (loss and accuracy per epoch), ``checkpoint.pt``
(``state_dict``, ``args``, ``history``, ``test_acc``) and ``history.json``. After training the
model is also fused for inference (``bsconv_fused.fuse``) and evaluated again.

    python examples/train.py                      # BSConv-U, defaults (~1-3 min on 2 CPU cores)
    python examples/train.py --variant s --epochs 20 --out runs/digits_s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    import bsconv_fused  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bsconv_fused.fuse import fuse
from bsconv_fused.models import get_model
from bsconv_fused.modules import orthonormal_loss

DEFAULT_ARCH = {"u": "cifar_resnet20_bsconvu", "s": "cifar_resnet20_bsconvs_p1d4"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", choices=["u", "s"], default="u",
                   help="BSConv-U or BSConv-S (with the orthonormal loss)")
    p.add_argument("--arch", default=None,
                   help="zoo architecture; None: cifar_resnet20_bsconvu (u) or "
                        "cifar_resnet20_bsconvs_p1d4 (s)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (cosine decay)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--alpha", type=float, default=0.01,
                   help="weight of the orthonormal loss (BSConv-S only; 0.01 for CIFAR-size "
                        "problems in the paper, 0.1 on ImageNet)")
    p.add_argument("--image-size", type=int, default=16, help="8x8 digits are upsampled to this")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out fraction (stratified split)")
    p.add_argument("--out", default="runs/digits", help="output directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (0: PyTorch's default); 1 is fastest on a busy machine")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop each epoch after this many steps (0: full epochs; for smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Data


def load_digits_tensors(image_size: int, test_fraction: float,
                        seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor]:
    """(x_train, y_train, x_test, y_test): x [n, 3, S, S] float32 normalized with the training
    set's mean / std, y [n] int64. Stratified split, reproducible with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=test_fraction, stratify=digits.target, random_state=seed)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test]


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (replicate padding, then a random crop)."""
    if pad == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


# --------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             device: torch.device) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb)
        total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return total_loss / len(y), correct / len(y)


def save_curves(history: Dict[str, List[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(history["train_loss"]) + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, history["train_loss"], label="train")
    ax1.plot(epochs, history["test_loss"], label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot(epochs, history["train_acc"], label="train")
    ax2.plot(epochs, history["test_acc"], label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.suptitle("BSConv on sklearn digits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Runs the training; returns a summary (``test_acc``, ``fused_test_acc``, ``history``,
    output paths)."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    arch = args.arch or DEFAULT_ARCH[args.variant]

    x_train, y_train, x_test, y_test = load_digits_tensors(args.image_size, args.test_fraction,
                                                           args.seed)
    model = get_model(arch, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    if args.max_steps > 0:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    alpha = args.alpha if args.variant == "s" else 0.0
    gen = torch.Generator().manual_seed(args.seed)
    pad = max(1, args.image_size // 8)

    from tqdm import tqdm

    history: Dict[str, List[float]] = {k: [] for k in (
        "train_loss", "train_acc", "test_loss", "test_acc", "lr", "step_loss")}
    print(f"{arch}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(y_train)} train / {len(y_test)} test images of {args.image_size}x"
          f"{args.image_size}, {args.epochs} epochs x {steps_per_epoch} steps", flush=True)
    start = time.time()
    bar = tqdm(total=args.epochs * steps_per_epoch, disable=args.no_progress, unit="step")
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = random_crop(x_train[idx], pad, gen).to(device)
            yb = y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            total = loss + orthonormal_loss(model, alpha) if alpha > 0 else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            history["step_loss"].append(loss.item())
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            bar.set_description(f"epoch {epoch + 1}/{args.epochs}")
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
        test_loss, test_acc = evaluate(model, x_test, y_test, 256, device)
        history["train_loss"].append(loss_sum / seen)
        history["train_acc"].append(correct / seen)
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
        history["lr"].append(opt.param_groups[0]["lr"])
        bar.write(f"epoch {epoch + 1:3d}: train loss {loss_sum / seen:.4f} acc "
                  f"{correct / seen:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f}")
    bar.close()
    elapsed = time.time() - start

    # Inference model: every BSConv block (and the BatchNorm after it) folded into one op.
    fused, report = fuse(model.eval())
    _, fused_acc = evaluate(fused, x_test, y_test, 256, device)

    curves = os.path.join(args.out, "curves.png")
    ckpt = os.path.join(args.out, "checkpoint.pt")
    save_curves(history, curves)
    test_acc = history["test_acc"][-1]
    torch.save({"arch": arch, "state_dict": model.state_dict(), "args": vars(args),
                "history": history, "test_acc": test_acc}, ckpt)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({"arch": arch, "args": vars(args), "history": history, "test_acc": test_acc,
                   "fused_test_acc": fused_acc, "seconds": elapsed}, f, indent=1)
    print(f"test accuracy {test_acc:.4f} (fused inference model, {report.num_fused} fused "
          f"blocks: {fused_acc:.4f}) after {elapsed:.0f} s; wrote {curves} and {ckpt}")
    return {"test_acc": test_acc, "fused_test_acc": fused_acc, "history": history,
            "curves": curves, "checkpoint": ckpt}


if __name__ == "__main__":
    main()
