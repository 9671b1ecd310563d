"""Model zoo and profiler parity with the authors' bsconv 0.4.0.

For every family and suffix the reference's ``get_model`` accepts: the same module tree (``repr``),
parameter count, ``state_dict`` keys / shapes / dtypes, with the fused modules exactly where the
reference has its BSConv modules. Big models are built on the meta device (no memory, no init).
For a few small models: the same weights for the same seed, and the same outputs (eval, float64)
after loading the reference's ``state_dict`` with ``strict=True``.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Dict, Iterator, List

import pytest
import torch
from torch import nn

import bsconv_fused
from bsconv_fused import functional
from bsconv_fused.models import get_model, list_models
from bsconv_fused.models.mobilenet import ARCHITECTURE_PATTERN as MOBILENET_PATTERN
from bsconv_fused.models.mobilenet import BSConvSLinearBottleneck
from bsconv_fused.models.resnet import ARCHITECTURE_PATTERN as RESNET_PATTERN
from bsconv_fused.models.resnet import UNITS_PER_STAGE
from bsconv_fused.profile import profile

bsconv_pytorch = pytest.importorskip("bsconv.pytorch")
from bsconv.pytorch import modules as ref_modules  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The name space of bsconv.pytorch.get_model (resnet.py / mobilenet.py of bsconv 0.4.0)
# ---------------------------------------------------------------------------------------------

IMAGENET_RESNETS = ["resnet10", "resnet18", "resnet26", "resnet34", "resnet68", "resnet102"]
CIFAR_RESNETS = ["cifar_resnet20", "cifar_resnet56", "cifar_resnet110"]
WRNS = ["cifar_wrn16_1", "cifar_wrn16_8", "cifar_wrn28_10", "cifar_wrn40_4", "cifar_wrn16_3"]
RESNET_SUFFIXES = ["", "_bsconvu", "_bsconvs_p1d4"]


def _resnet_names() -> List[str]:
    bases = []
    for b in IMAGENET_RESNETS + CIFAR_RESNETS:
        bases += [b, b.replace("resnet", "preresnet")]
    names = [b + s for b in bases + WRNS for s in RESNET_SUFFIXES]
    # other BSConv-S fractions (p = 0, 1, 3/4, 1/8, 1/3, leading zeros) on small nets
    names += [f"{b}_bsconvs_{p}" for b in ("cifar_resnet20", "cifar_wrn16_2", "resnet18")
              for p in ("p1d2", "p0d1", "p1d1", "p3d4", "p1d8", "p1d3", "p01d004")]
    # the deepest CIFAR nets (slow to build: one name each)
    names += ["cifar_preresnet302_bsconvs_p1d4", "cifar_resnet602_bsconvu"]
    # a degenerate width the reference builds (zero-channel stages), and parsing quirks: the
    # name is lower-cased, and `$` also matches before a trailing newline
    names += ["cifar_wrn16_0", "CIFAR_PreResNet20_BSConvU", "resnet10\n"]
    return names


def _mobilenet_names() -> List[str]:
    names = []
    for prefix in ("", "cifar_"):
        for version, suffix in (("v1", "_bsconvu"), ("v2", "_bsconvs_p1d6"),
                                ("v3_small", "_bsconvs_p1d6"), ("v3_large", "_bsconvs_p1d6")):
            for width in ("w1", "w3d4", "w1d2", "w7d20", "w5d4", "w2d2"):
                base = f"{prefix}mobilenet{version}_{width}"
                names += [base, base + suffix]
    names += ["mobilenetv1_w1d4_bsconvu", "mobilenetv2_w2", "mobilenetv3_large_w03d2_bsconvs_p1d6"]
    return names


ACCEPTED = _resnet_names() + _mobilenet_names()

REJECTED = [
    "resnet19", "resnet20", "cifar_resnet18", "preresnet", "resnet18_bsconvs",
    "resnet18_bsconvs_p1d0", "resnet18_bsconvs_p5d4", "resnet18_bsconvu_bsconvu",
    "resnet18_bsconvs_p1.5d4", "cifar_wrn16", "cifar_wrn20_2", "cifar_wrn16_2_2", "wrn16_2",
    "cifar_wrn16_0_bsconvu", "mobilenetv2_w1_bsconvu", "mobilenetv1_w1_bsconvs_p1d6",
    "mobilenetv3_small_w1_bsconvs_p1d4", "mobilenetv1_w1d0", "mobilenetv1_w0", "mobilenetv1",
    "mobilenetv4_w1", "mobilenetv3_w1", "cifar_mobilenetv2_w1_bsconvs", "vgg16", "",
    " resnet18", "resnet18 ",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The models here are tiny: one thread is as fast, and on a loaded 2-core machine the
    # OpenMP barriers of two threads make some float64 forwards 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    # zero-element tensors (cifar_wrn16_0) and profiler warnings of the reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _build_pair(name: str, device: str = "meta", seed: int = 0) -> tuple:
    with torch.device(device):
        torch.manual_seed(seed)
        ref = bsconv_pytorch.get_model(name, num_classes=10)
        torch.manual_seed(seed)
        ours = get_model(name, num_classes=10)
    return ref, ours


def _normalized_repr(model: nn.Module) -> str:
    # the one class of ours with another name: the fused linear bottleneck of _bsconvs_p1d6
    return re.sub(r"\bBSConvSLinearBottleneck\(", "LinearBottleneck(", repr(model))


def _bsconv_kinds(model: nn.Module, ref: bool) -> Dict[str, str]:
    u, s = ((ref_modules.BSConvU, ref_modules.BSConvS) if ref
            else (bsconv_fused.BSConvU, bsconv_fused.BSConvS))
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (u, s))}


@pytest.mark.parametrize("name", ACCEPTED)
def test_structure_matches_reference(name: str) -> None:
    ref, ours = _build_pair(name)
    assert _normalized_repr(ours) == _normalized_repr(ref)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in our_sd.items()] == \
        [(k, v.shape, v.dtype) for k, v in ref_sd.items()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # our fused modules exactly where the reference has its BSConv modules ...
    assert _bsconv_kinds(ours, ref=False) == _bsconv_kinds(ref, ref=True)
    # ... and nothing of the reference package in our models
    assert not [type(m) for m in ours.modules() if type(m).__module__.startswith("bsconv.")]
    if "_bsconvs" in name.lower():
        assert callable(getattr(ref, "reg_loss", None)) and callable(ours.reg_loss)
    if "mobilenetv2" in name or "mobilenetv3" in name:
        fused = "_bsconvs" in name
        units = [m for m in ours.modules() if isinstance(m, BSConvSLinearBottleneck)]
        assert bool(units) == fused


@pytest.mark.parametrize("name", REJECTED)
def test_rejected_names(name: str) -> None:
    with torch.device("meta"):
        # the reference raises ValueError, AssertionError (p > 1) or ZeroDivisionError
        with pytest.raises((ValueError, AssertionError, ZeroDivisionError)):
            bsconv_pytorch.get_model(name, num_classes=10)
        with pytest.raises(ValueError):
            get_model(name, num_classes=10)


def test_rejection_messages() -> None:
    with pytest.raises(ValueError, match="only"):
        get_model("mobilenetv2_w1_bsconvu", num_classes=10)
    with pytest.raises(ValueError, match="Y = 0"):
        get_model("cifar_resnet20_bsconvs_p1d0", num_classes=10)
    with pytest.raises(ValueError, match="larger than 1"):
        get_model("cifar_resnet20_bsconvs_p3d2", num_classes=10)
    with pytest.raises(ValueError, match="unknown depth"):
        get_model("cifar_resnet21", num_classes=10)
    with pytest.raises(ValueError, match="not supported"):
        get_model("vgg16", num_classes=10)


def test_keyword_arguments_as_reference() -> None:
    for fn in (bsconv_pytorch.get_model, get_model):
        with pytest.raises(TypeError):
            fn("cifar_resnet20")  # num_classes is required
        with pytest.raises(TypeError):
            fn("cifar_resnet20", 10)  # ... and keyword-only
        with pytest.raises(TypeError):
            fn("cifar_resnet20", num_classes=10, width=2)
    with pytest.raises(TypeError, match="str"):
        get_model(20, num_classes=10)


def test_list_models() -> None:
    names = list_models()
    assert len(names) == len(set(names)) > 100
    for name in names:
        m = RESNET_PATTERN.match(name) or MOBILENET_PATTERN.match(name)
        assert m is not None, name
        if "mobilenet" not in name:
            base = m.group("base")
            key = "_".join(base.split("_")[:2]) if "wrn" in base else \
                base.replace("preresnet", "resnet")
            assert key in UNITS_PER_STAGE
    families = {re.sub(r"[0-9_].*", "", n.replace("cifar_", "")) for n in names}
    assert families == {"resnet", "preresnet", "wrn", "mobilenetv"}


# ---------------------------------------------------------------------------------------------
# Weights and outputs
# ---------------------------------------------------------------------------------------------

def _randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial eval-mode BatchNorm (running statistics and affine parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n, dt = m.num_features, m.running_mean.dtype
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g, dtype=dt))
                m.running_var.copy_(0.75 + 0.5 * torch.rand(n, generator=g, dtype=dt))
                m.weight.copy_(0.75 + 0.5 * torch.rand(n, generator=g, dtype=dt))
                m.bias.copy_(0.1 * torch.randn(n, generator=g, dtype=dt))


# Observed relative errors (max |ours - ref| / max |ref|) are 1e-16 .. 5e-15 in float64: the fused
# op only sums in another order and folds BatchNorm into the projection. 1e-12 leaves a margin of
# more than 100x for other machines / thread counts and still is 5 orders of magnitude below
# float32 rounding, so a wrong weight, index, padding or activation cannot pass.
RTOL_FLOAT64 = 1e-12

OUTPUT_CASES = [
    ("cifar_resnet20_bsconvu", 16),          # BSConv-U, no BN, stride 2, CIFAR stem
    ("cifar_wrn16_2_bsconvs_p1d2", 16),      # BSConv-S + BN (folded), pre-activation units
    ("resnet10_bsconvs_p1d4", 32),           # ImageNet stem (7x7 conv stays), max pool
    ("mobilenetv1_w1d4_bsconvu", 32),        # Sequential(BSConvU, BN, ReLU) blocks
    ("cifar_mobilenetv2_w1d4_bsconvs_p1d6", 16),        # fused expand + BN + ReLU6 + dw
    ("cifar_mobilenetv3_small_w1d2_bsconvs_p1d6", 16),  # ReLU / h-swish, 3x3 / 5x5, SE
    ("mobilenetv3_large_w7d20_bsconvs_p1d6", 32),
    ("cifar_preresnet20", 16),               # a plain model
]


@pytest.mark.parametrize("name,size", OUTPUT_CASES)
def test_same_seed_same_weights_and_outputs(name: str, size: int) -> None:
    ref, ours = _build_pair(name, device="cpu", seed=0)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    for k in ref_sd:  # the same construction and initialization order: bitwise equal
        assert torch.equal(ref_sd[k], our_sd[k]), k

    ref = ref.double()
    _randomize_batchnorm(ref, seed=1)
    ours = ours.double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=g)
    with torch.no_grad():
        y_ref, y = ref(x), ours(x)
    assert y.shape == y_ref.shape == (2, 10)
    err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
    assert err <= RTOL_FLOAT64, err
    if hasattr(ref, "reg_loss"):
        torch.testing.assert_close(ours.reg_loss(alpha=0.1), torch.as_tensor(
            ref.reg_loss(alpha=0.1), dtype=torch.float64), rtol=1e-12, atol=0)
    else:
        assert ours.reg_loss().item() == 0.0


def _count_fused_calls(monkeypatch: pytest.MonkeyPatch) -> Dict[str, int]:
    calls = {"u": 0, "s": 0}
    for variant in ("u", "s"):
        original = getattr(functional, f"bsconv_{variant}")

        def wrapped(*args, _original=original, _variant=variant, **kwargs):
            calls[_variant] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(functional, f"bsconv_{variant}", wrapped)
    return calls


@pytest.mark.parametrize("name,expected", [
    ("cifar_resnet20_bsconvu", {"u": 19, "s": 0}),
    ("cifar_wrn16_1_bsconvs_p1d4", {"u": 0, "s": 13}),
    ("mobilenetv1_w1d4_bsconvu", {"u": 13, "s": 0}),
    ("cifar_mobilenetv2_w1d4_bsconvs_p1d6", {"u": 17, "s": 0}),
    ("cifar_mobilenetv3_small_w1d2_bsconvs_p1d6", {"u": 11, "s": 0}),
    ("cifar_mobilenetv3_small_w1d2", {"u": 0, "s": 0}),  # plain models stay plain
])
def test_eval_forward_runs_the_fused_op(name: str, expected: Dict[str, int],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_model(name, num_classes=10).eval()
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    assert calls == expected


def test_training_step_matches_reference() -> None:
    """Train mode (batch-statistics BN; fused BSConv-U forward and backward): same loss, same
    gradients, same BatchNorm statistics updates."""
    ref, ours = _build_pair("cifar_resnet20_bsconvu", device="cpu", seed=3)
    ref, ours = ref.double().train(), ours.double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for model in (ref, ours):
        model(x).square().sum().backward()
    for (k, p_ref), (_, p) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=k)
    for (k, b_ref), (_, b) in zip(ref.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-14, msg=k)


def test_bottleneck_falls_back_in_training_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_model("cifar_mobilenetv3_small_w1d2_bsconvs_p1d6", num_classes=10).train()
    calls = _count_fused_calls(monkeypatch)
    model(torch.randn(2, 3, 8, 8))
    assert calls == {"u": 0, "s": 0}


# ---------------------------------------------------------------------------------------------
# Profile: cross-check with bsconv.pytorch.ModelProfiler
# ---------------------------------------------------------------------------------------------

def _reference_macs(model: nn.Module, prof) -> Dict[str, int]:
    """MACs per leaf conv / linear of the reference profiler: its "FLOPs" minus the bias adds
    (batch 1, so the output numel is the product of ``out_shape``)."""
    modules = dict(model.named_modules())
    out = {}
    for name, r in prof.module_results.items():
        if r["is_leaf"] and r["type"] in ("Conv2d", "Linear"):
            bias = modules[name].bias is not None
            out[name] = r["flop_count"] - (math.prod(r["out_shape"]) if bias else 0)
    return out


@pytest.mark.parametrize("name,size", [
    ("cifar_resnet20_bsconvu", 32),
    ("cifar_wrn16_2_bsconvs_p1d4", 32),
    ("mobilenetv1_w1d4_bsconvu", 64),
    ("cifar_mobilenetv3_small_w1d2_bsconvs_p1d6", 32),
    ("resnet10", 64),
])
def test_profile_matches_reference_profiler(name: str, size: int) -> None:
    ref, ours = _build_pair(name, device="cpu")
    ref.eval()
    ref_prof = bsconv_pytorch.ModelProfiler(ref, input_size=(1, 3, size, size))
    ref_macs = _reference_macs(ref, ref_prof)
    for model in (ours, ref):  # ours (fused blocks) and the reference model itself
        result = profile(model, (1, 3, size, size))
        assert result.total_params == ref_prof.total_parameter_count
        assert result.total_macs == sum(ref_macs.values())
        assert not result.uncounted
        for row in result.rows:
            if row.type.endswith(("BSConvU", "BSConvS")):
                # one row per block = the sum of the reference's pw / dw conv rows
                assert row.macs == sum(v for k, v in ref_macs.items()
                                       if k.startswith(row.name + ".")), row.name
                assert row.calls == 1
            elif row.name in ref_macs:
                assert row.macs == ref_macs[row.name], row.name


def test_profile_result_and_side_effects() -> None:
    model = get_model("cifar_resnet20_bsconvs_p1d4", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = profile(model, (2, 3, 32, 32))
    # the model is left as it was: training flags, statistics, no hooks
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())

    block = result.row("backbone.stage2.unit1.conv1.conv")
    assert block.type == "BSConvS" and block.info == "BSConv-S 3x3 s2 M'=4"
    assert block.in_shape == (2, 16, 32, 32) and block.out_shape == (2, 32, 16, 16)
    # pw1 16 -> 4 and pw2 4 -> 32 on 2 x 32 x 32 pixels, 3x3 depthwise on 2 x 16 x 16 x 32
    assert block.macs == 2 * 32 * 32 * (16 * 4 + 4 * 32) + 2 * 16 * 16 * 32 * 9
    assert block.params == 16 * 4 + 4 + 4 + 4 * 32 + 32 + 32 + 32 * 9
    assert result.total_params == sum(r.params for r in result.rows) == \
        sum(p.numel() for p in model.parameters())
    assert result.total_macs == sum(r.macs for r in result.rows)
    # the MACs scale with the batch
    assert profile(model, (1, 3, 32, 32)).total_macs * 2 == result.total_macs
    text = str(result)
    assert "backbone.stage2.unit1.conv1.conv" in text and f"{result.total_macs:,}" in text
    assert "BSConv-S 3x3 s2" in text


def test_profile_generic_layers() -> None:
    model = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.ConvTranspose1d(8, 2, 2),
                          nn.Flatten(), nn.LazyLinear(5), nn.GRU(5, 3))
    model[4](torch.zeros(1, 2 * 9))  # materialize the lazy layer
    result = profile(model, (1, 4, 10), dtype=torch.float32)
    assert result.row("0").macs == 8 * 8 * 2 * 3
    assert result.row("2").macs == 8 * 8 * 2 * 2
    assert result.row("4").macs == 18 * 5 and result.row("4").info == "18->5"
    assert result.uncounted == ["5"]  # a GRU: no MAC rule
    with pytest.raises(ValueError, match="input_size"):
        profile(model, (1, -4, 10))
    with pytest.raises(TypeError, match="nn.Module"):
        profile(lambda x: x, (1,))
