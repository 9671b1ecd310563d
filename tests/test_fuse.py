"""bsconv_fused.fuse: finding and fusing pointwise -> [BN] -> [act] -> depthwise chains.

How equality is judged (float32 models; ``check_equivalent``):

1. Per chain, on the chain's real input (captured from the original model), elementwise against
   a float64 run of the original chain modules: the fused module's error must stay within the
   a-priori worst-case rounding bound of its arithmetic, ``2 * n * eps32 * A``, where ``A`` is
   the chain evaluated on absolute values (``|DW| * L (|scale| |W| |x| + |shift|) + |b|``,
   ``L`` = 1.5 the Lipschitz constant of hardswish, 1 otherwise) and ``n`` = (projection length)
   + (taps) + 4 the longest chain of roundings (classic dot-product bound gamma_n <= n * eps,
   doubled for the rounding of the folded constants). The bound holds for any summation order,
   so it does not depend on how the kernel or oneDNN order their sums, and the unfused chain is
   checked against it too. A wrong fold or a wrong activation is an O(1) relative difference.
2. The whole model, float64: the original converted to float64 and fused there must match the
   original in float64 to 1e-9 relative. This checks the folding algebra and that the rewired
   model computes the same function, without float32 noise.
3. The whole model, float32, a sanity check against gross precision loss: at most 10 times as far
   from the float64 oracle as the unfused model. End-to-end errors of deep random networks are
   rounding noise amplified by the network; the ratio between two equally accurate float32
   evaluations varies up to ~3x from seed to seed on these models, and on wide layers the fused
   kernel's projection sums can be up to ~3x less accurate than oneDNN's (still within 1.).
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from helpers import EPS, fused_op_ran, max_err
from torch import nn

from bsconv_fused import reference
from bsconv_fused.fuse import FusedPointwiseDepthwise, FuseReport, fuse
from bsconv_fused.modules import BSConvS, BSConvU

torchvision = pytest.importorskip("torchvision")
from torchvision.ops.misc import Conv2dNormActivation  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # One intra-op thread: these are many small ops, and on a shared 2-core machine busy-waiting
    # worker threads make them many times slower; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibrate_bn(model: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """Gives every BatchNorm random affine parameters and non-trivial running statistics: the
    statistics of one training-mode pass on ``x`` (so activations stay well scaled through a deep
    random network), then randomly perturbed (mean shifted, variance scaled by 0.5..2)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one pass, the batch statistics
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        model.train()
        model(x)
        for m in bns:
            n = m.num_features
            m.running_mean.add_(0.1 * torch.randn(n, generator=g) * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(n, generator=g) * 1.5 + 0.5)
    model.eval()


def _run_chain(mods: list, x: torch.Tensor) -> torch.Tensor:
    for m in mods:
        x = m(x)
    return x


def chain_error_bound(fused: FusedPointwiseDepthwise, x: torch.Tensor) -> torch.Tensor:
    """Elementwise worst-case rounding bound of the fused chain in float32 (see 1. above)."""
    d = {k: (None if t is None else t.detach().double().abs())
         for k, t in fused.named_parameters()}
    for k in ("pw2_weight", "dw_bias", "mid_scale", "mid_shift"):
        d.setdefault(k, None)
    lip = 1.5 if fused.mid_activation == "hardswish" else 1.0
    n_out = d["dw_weight"].shape[0]
    scale = d["mid_scale"] if d["mid_scale"] is not None else torch.ones(n_out, dtype=torch.double)
    shift = d["mid_shift"] if d["mid_shift"] is not None else torch.zeros(n_out,
                                                                          dtype=torch.double)
    pws = [d["pw1_weight"]] + ([d["pw2_weight"]] if d["pw2_weight"] is not None else [])
    opts = dict(stride=fused.stride, padding=fused.padding, dilation=fused.dilation,
                padding_mode=fused.padding_mode, mid_scale=lip * scale, mid_shift=lip * shift)
    if len(pws) == 1:
        mag = reference.bsconv_u(x.double().abs(), pws[0], d["dw_weight"], d["dw_bias"], **opts)
    else:
        mag = reference.bsconv_s(x.double().abs(), *pws, d["dw_weight"], d["dw_bias"], **opts)
    n = sum(w.shape[1] for w in pws) + d["dw_weight"][0].numel() + 4
    return 2 * n * EPS[torch.float32] * mag


def _run_chain(mods: list, x: torch.Tensor) -> torch.Tensor:
    for m in mods:
        x = m(x)
    return x


def check_equivalent(original: nn.Module, fused: nn.Module, x: torch.Tensor,
                     report: FuseReport | None = None) -> None:
    """The three checks of the module docstring (1. only when ``report`` is given)."""
    if report is not None:
        inputs = {}
        hooks = [original.get_submodule(f.modules[0]).register_forward_pre_hook(
                     lambda m, args, key=f.name: inputs.setdefault(key, args[0].detach().clone()))
                 for f in report.fused]
        with torch.no_grad():
            original(x)
        for h in hooks:
            h.remove()
        assert inputs.keys() == {f.name for f in report.fused}
        for f in report.fused:
            inp = inputs[f.name]
            mods = [original.get_submodule(n) for n in f.modules]
            block = fused.get_submodule(f.name)
            with torch.no_grad():
                got = block(inp)
                ref32 = _run_chain(mods, inp.clone())
                ref64 = _run_chain([copy.deepcopy(m).double() for m in mods], inp.double())
                bound = chain_error_bound(block, inp)
            for what, y in (("fused", got), ("unfused", ref32)):
                err = (y.double() - ref64).abs()
                worst = (err / bound.clamp_min(1e-300)).max().item()
                assert worst <= 1.0, f"chain {f.name} ({what}): error {worst:.3g} x the bound"
    with torch.no_grad():
        y32 = original(x)
        yf = fused(x)
        o64 = copy.deepcopy(original).double()
        y64 = o64(x.double())
        yf64 = fuse(o64, warn=False)[0](x.double())
    scale = max(y64.abs().max().item(), 1.0)
    assert max_err(yf64, y64) <= 1e-9 * scale, "float64: the fused model differs"
    err, ref_err = max_err(yf, y64), max_err(y32, y64)
    floor = 4 * EPS[torch.float32] * scale
    assert err <= 10 * max(ref_err, floor), (err, ref_err, floor)


def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


# --------------------------------------------------------------------------------------------
# torchvision models. The expected numbers of chains come from the structure: an inverted
# residual block has an expand half iff its block starts with a 1x1 Conv2dNormActivation
# followed by a depthwise one; the chain is fusable iff the expand activation is ReLU / ReLU6 /
# Hardswish.

FUSIBLE_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish)


def _expand_halves(model: nn.Module) -> list:
    """(expand activation module) for every inverted residual block with an expand 1x1 conv."""
    out = []
    for m in model.modules():
        seq = getattr(m, "block", None) or getattr(m, "conv", None)
        if not isinstance(seq, nn.Sequential) or len(seq) < 2:
            continue
        first, second = seq[0], seq[1]
        if not (isinstance(first, Conv2dNormActivation)
                and isinstance(second, Conv2dNormActivation)):
            continue
        pw, dw = first[0], second[0]
        if pw.kernel_size == (1, 1) and pw.groups == 1 and dw.groups == dw.in_channels > 1:
            out.append(first[2])
    return out


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"])
def test_torchvision_models(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(2, 3, 32, 32)
    calibrate_bn(model, x)
    before = copy.deepcopy(model.state_dict())

    expand = _expand_halves(model)
    n_fusible = sum(isinstance(a, FUSIBLE_ACTS) for a in expand)
    n_other = len(expand) - n_fusible
    assert len(expand) > 10  # the structure probe found the blocks

    fused, report = fuse(model)
    assert report.num_fused == n_fusible
    assert report.num_skipped == n_other
    assert count(fused, FusedPointwiseDepthwise) == n_fusible
    if name == "efficientnet_b0":  # SiLU everywhere: nothing fusable, every chain reported
        assert n_fusible == 0 and n_other == 15
        assert all(s.reason.startswith("SiLU") for s in report.skipped)
    else:
        assert n_other == 0 and n_fusible in (14, 16)
        # The depthwise conv's BatchNorm is folded too.
        assert all(f.folded_bn_after for f in report.fused)
        assert fused_op_ran(lambda: fused(x))
    # The original model is untouched (inplace=False).
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert count(model, FusedPointwiseDepthwise) == 0
    check_equivalent(model, fused, x, report)


def test_mnasnet_flat_sequential():
    """MnasNet keeps conv, BN, ReLU as flat entries of one Sequential."""
    model = torchvision.models.mnasnet0_5(weights=None)
    x = torch.randn(2, 3, 32, 32)
    calibrate_bn(model, x)
    blocks = [m for m in model.modules() if type(m).__name__ == "_InvertedResidual"]
    fused, report = fuse(model)
    assert report.num_fused == len(blocks) and report.num_skipped == 0
    check_equivalent(model, fused, x, report)


# --------------------------------------------------------------------------------------------
# Chains with every option.


def _chain(pw_bias: bool, bn: bool, act: nn.Module | None, dw_kwargs: dict, bn_after: bool,
           m: int = 6, n: int = 10) -> nn.Sequential:
    layers = [nn.Conv2d(m, n, 1, bias=pw_bias)]
    if bn:
        layers.append(nn.BatchNorm2d(n))
    if act is not None:
        layers.append(act)
    layers.append(nn.Conv2d(n, n, groups=n, **dw_kwargs))
    if bn_after:
        layers.append(nn.BatchNorm2d(n))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


DW_OPTIONS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(5, 3), padding=(2, 1), padding_mode="reflect"),
    dict(kernel_size=3, padding="same", dilation=2, padding_mode="circular"),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
    dict(kernel_size=4, padding="same"),
]
ACTS = [None, nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.Hardtanh(0.0, 6.0)]


@pytest.mark.parametrize("dw_kwargs", DW_OPTIONS)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_chain_options(dw_kwargs, act):
    for pw_bias, bn, bn_after in [(False, True, True), (True, False, False), (True, True, False)]:
        torch.manual_seed(0)
        model = _chain(pw_bias, bn, copy.deepcopy(act), dw_kwargs, bn_after)
        x = torch.randn(2, 6, 9, 11)
        calibrate_bn(model, x)
        fused, report = fuse(model)
        assert report.num_fused == 1 and report.num_skipped == 0
        f = report.fused[0]
        assert f.kind == "pw-dw" and f.folded_bn_after == bn_after
        assert len(f.modules) == 2 + bn + (act is not None) + bn_after
        assert isinstance(fused[0], FusedPointwiseDepthwise)
        assert all(type(m) is nn.Identity for m in list(fused)[1:len(f.modules)])
        check_equivalent(model, fused, x, report)


def test_factored_projection_and_authors_modules():
    bsconv = pytest.importorskip("bsconv.pytorch")
    torch.manual_seed(0)
    model = nn.Sequential(
        bsconv.BSConvU(6, 12, 3, padding=1, with_bn=True), nn.BatchNorm2d(12), nn.ReLU(),
        bsconv.BSConvS(12, 16, 3, stride=2, padding=1, with_bn=True), nn.ReLU6(),
        # pw1 -> bn1 -> pw2 -> bn2 -> act -> dw written out flat.
        nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 20, 1),
        nn.BatchNorm2d(20), nn.Hardswish(), nn.Conv2d(20, 20, 3, padding=1, groups=20),
    )
    x = torch.randn(2, 6, 12, 12)
    calibrate_bn(model, x)
    fused, report = fuse(model)
    assert [f.kind for f in report.fused] == ["pw-dw", "pw-pw-dw", "pw-pw-dw"]
    assert [f.folded_bn_after for f in report.fused] == [True, False, False]
    assert report.fused[2].activation == "hardswish"
    assert fused[0][0].pw2_weight is None and fused[3][0].pw2_weight is not None
    check_equivalent(model, fused, x, report)


def test_our_bsconv_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(
        BSConvU(6, 12, 3, padding=1, with_bn=True), nn.BatchNorm2d(12), nn.ReLU(),
        BSConvS(12, 16, 3, stride=2, padding=1, with_bn=True, p=0.5), nn.ReLU6(),
        BSConvU(16, 8, 5, padding=2, padding_mode="reflect"),
        nn.Sequential(BSConvS(8, 8, 3, padding="same", padding_mode="circular")),
    )
    x = torch.randn(2, 6, 12, 12)
    calibrate_bn(model, x)
    fused, report = fuse(model)
    assert [f.kind for f in report.fused] == ["BSConvU", "BSConvS", "BSConvU", "BSConvS"]
    assert [f.folded_bn_after for f in report.fused] == [True, False, False, False]
    assert count(fused, FusedPointwiseDepthwise) == 4
    assert count(fused, BSConvU) + count(fused, BSConvS) + count(fused, nn.BatchNorm2d) == 0
    check_equivalent(model, fused, x, report)

    # A block held by a module with its own forward, and a block as the root.
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = BSConvS(6, 6, 3, padding=1, with_bn=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x)

    holder = Holder()
    calibrate_bn(holder, x)
    fused, report = fuse(holder)
    assert isinstance(fused.conv, FusedPointwiseDepthwise) and report.num_fused == 1
    check_equivalent(holder, fused, x, report)
    root = holder.conv
    fused, report = fuse(root)
    assert isinstance(fused, FusedPointwiseDepthwise) and report.num_fused == 1
    check_equivalent(root, fused, x, report)


def _expected_zoo_chains(model: nn.Module) -> int:
    """BSConv blocks, plus the expand halves (1x1 ConvBlock with a fusable activation, then a
    depthwise ConvBlock) of the zoo's / bsconv's inverted residual units."""
    n = sum(type(m).__name__ in ("BSConvU", "BSConvS") for m in model.modules())  # also bsconv's
    for m in model.modules():
        c1, c2 = getattr(m, "conv1", None), getattr(m, "conv2", None)
        if not (hasattr(c1, "conv") and hasattr(c2, "conv")):
            continue
        pw, dw = c1.conv, c2.conv
        if (isinstance(pw, nn.Conv2d) and pw.kernel_size == (1, 1) and pw.groups == 1
                and isinstance(dw, nn.Conv2d) and dw.groups == dw.in_channels > 1
                and type(getattr(c1, "activation", None)).__name__ in ("ReLU", "ReLU6", "HSwish")):
            n += 1
    return n


# (MobileNetV2's BSConv-S variant has the structure of the plain one plus a regularizer.)
ZOO_NAMES = ["cifar_mobilenetv1_w1d2_bsconvu", "cifar_mobilenetv2_w1d4_bsconvs_p1d6",
             "cifar_mobilenetv3_small_w1d2_bsconvs_p1d6", "cifar_resnet20_bsconvu",
             "cifar_resnet20_bsconvs_p1d4"]


@pytest.mark.parametrize("source", ["zoo", "bsconv"])
@pytest.mark.parametrize("zoo_name", ZOO_NAMES)
def test_zoo_models(zoo_name, source):
    """The model zoo (bsconv_fused.models) and the authors' bsconv 0.4.0 models: every BSConv
    block and every expand half is fused (residual units are traced with torch.fx)."""
    if source == "zoo":
        try:
            get_model = importlib.import_module("bsconv_fused.models").get_model
        except ImportError:
            pytest.skip("bsconv_fused.models is not available")
    else:
        get_model = pytest.importorskip("bsconv.pytorch").get_model
    torch.manual_seed(0)
    model = get_model(zoo_name, num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    calibrate_bn(model, x)
    expected = _expected_zoo_chains(model)
    assert expected >= 3
    fused, report = fuse(model)
    assert report.num_fused == expected and report.num_skipped == 0, str(report)
    check_equivalent(model, fused, x, report)


# --------------------------------------------------------------------------------------------
# What is left alone.


def test_training_mode_is_left_alone():
    model = _chain(False, True, nn.ReLU6(), dict(kernel_size=3, padding=1), True)
    model.append(BSConvU(10, 10, 3, padding=1, with_bn=True))
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        fused, report = fuse(model)
    assert report.num_fused == 0 and report.num_skipped == 2
    assert all(s.reason.startswith("training mode") for s in report.skipped)
    assert count(fused, FusedPointwiseDepthwise) == 0
    # No warning when asked not to, and eval mode fuses.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse(model, warn=False)
        _, report = fuse(model.eval())
    assert report.num_fused == 2


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.Dropout(0.0), nn.MaxPool2d(1)],
                         ids=lambda a: type(a).__name__)
def test_unsupported_module_between(act):
    model = _chain(False, True, act, dict(kernel_size=3, padding=1), True).eval()
    fused, report = fuse(model)
    assert report.num_fused == 0 and report.num_skipped == 1
    assert report.skipped[0].reason.startswith(type(act).__name__)
    assert "not an activation the fused op supports" in str(report)


def test_other_reasons_and_non_chains():
    # Hooks on a member.
    model = _chain(False, True, nn.ReLU(), dict(kernel_size=3, padding=1), True).eval()
    model[1].register_forward_hook(lambda *a: None)
    _, report = fuse(model)
    assert report.num_fused == 0 and "hooks" in report.skipped[0].reason
    # BatchNorm without running statistics normalizes with batch statistics.
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8, track_running_stats=False),
                          nn.Conv2d(8, 8, 3, groups=8)).eval()
    _, report = fuse(model)
    assert report.num_fused == 0 and "running statistics" in report.skipped[0].reason
    # Strided projection.
    model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 3, groups=8)).eval()
    _, report = fuse(model)
    assert report.num_fused == 0 and "strided" in report.skipped[0].reason
    # Not chains at all: depthwise separable (dw -> pw), dense conv before dw, depth multiplier.
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 3, groups=8)).eval()
    _, report = fuse(model)
    assert report.num_fused == 0 and report.num_skipped == 0


def test_idempotent_inplace_and_residual_barrier():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None)
    x = torch.randn(2, 3, 32, 32)
    calibrate_bn(model, x)
    ref = copy.deepcopy(model)
    same, report = fuse(model, inplace=True)
    assert same is model and report.num_fused == 16
    _, again = fuse(model)
    assert again.num_fused == 0 and again.num_skipped == 0
    check_equivalent(ref, model, x, report)
    # The fused model's state_dict round-trips.
    clone = copy.deepcopy(model)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_fused_module_dtype_and_repr():
    model = _chain(True, True, nn.Hardswish(), dict(kernel_size=3, padding=1), True).eval()
    x = torch.randn(1, 6, 8, 8)
    calibrate_bn(model, x)
    fused, _ = fuse(model)
    text = repr(fused[0])
    assert "6->10" in text and "mid_activation='hardswish'" in text
    half = fuse(copy.deepcopy(model).to(torch.bfloat16))[0]
    assert half[0].pw1_weight.dtype == torch.bfloat16
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="mid_activation"):
        FusedPointwiseDepthwise(torch.ones(2, 2, 1, 1), torch.ones(2, 1, 3, 3),
                                mid_activation="silu")


class _DataDependent(nn.Module):
    """A forward torch.fx cannot trace (a branch on a tensor value), holding chains inside."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _chain(False, True, nn.ReLU6(), dict(kernel_size=3, padding=1), True, m=6,
                           n=6)
        self.block = BSConvU(6, 6, 3, padding=1, with_bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if x.sum() > 0:
            x = x * 0.5
        return self.block(x)


def test_untraceable_modules_fall_back_to_containers():
    x = torch.randn(2, 6, 9, 9)
    # The root does not trace: its children are searched one by one.
    model = _DataDependent()
    calibrate_bn(model, x)
    fused, report = fuse(model)
    assert sorted(f.kind for f in report.fused) == ["BSConvU", "pw-dw"]
    assert isinstance(fused.block, FusedPointwiseDepthwise)
    check_equivalent(model, fused, x, report)
    # A Sequential that does not trace (one of its children does not): its flattened children.
    seq = nn.Sequential(_chain(False, True, nn.Hardswish(), dict(kernel_size=3, padding=1), True,
                               m=6, n=6), _DataDependent())
    calibrate_bn(seq, x)
    fused, report = fuse(seq)
    assert report.num_fused == 3 and report.num_skipped == 0
    check_equivalent(seq, fused, x, report)


def test_shared_modules_and_branches_are_not_chains():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), relu,
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), relu).eval()
    _, report = fuse(model)
    assert report.num_fused == 0 and "more than one place" in report.skipped[0].reason

    class Branch(nn.Module):  # the projection's output is also used by a skip connection
        def __init__(self) -> None:
            super().__init__()
            self.pw = nn.Conv2d(4, 4, 1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = self.pw(x)
            return self.dw(v) + v

    _, report = fuse(Branch().eval())
    assert report.num_fused == 0 and report.num_skipped == 0


def test_custom_activation_mapping():
    class MyReLU6(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(0, 6)

    model = _chain(False, True, MyReLU6(), dict(kernel_size=3, padding=1), True)
    x = torch.randn(2, 6, 8, 8)
    calibrate_bn(model, x)
    _, report = fuse(model)
    assert report.num_fused == 0 and report.skipped[0].reason.startswith("MyReLU6")
    fused, report = fuse(model, activations={MyReLU6: "relu6"})
    assert report.num_fused == 1 and report.fused[0].activation == "relu6"
    check_equivalent(model, fused, x, report)
    with pytest.raises(ValueError, match="activations"):
        fuse(model, activations={MyReLU6: "gelu"})
