"""bsconv_fused.convert: which layers are replaced, what is carried over, the report, reference
BSConv modules converted with their weights, errors."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Iterator

import pytest
import torch
from torch import nn

import bsconv_fused
from bsconv_fused.convert import ConvertReport, convert

bsconv_pytorch = pytest.importorskip("bsconv.pytorch")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # tiny models; two OpenMP threads on a loaded 2-core machine only add barrier waits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallNet(nn.Module):
    """A torchvision-free CNN with convolutions that must and must not be converted."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)                                   # converted
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),                   # converted
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 5, padding="same", dilation=2, padding_mode="reflect"),  # converted
            nn.Conv2d(16, 16, 3, padding=1, groups=16),           # depthwise: kept
            nn.Conv2d(16, 24, 1),                                 # 1x1: kept by default
            nn.Conv2d(24, 24, (1, 3), padding=(0, 1)),            # 1x3: kept by default
        )
        self.heads = nn.ModuleDict(
            {"a": nn.Conv2d(24, 4, 3, padding=1, padding_mode="circular")})      # converted
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.heads["a"](self.body(self.stem(x)))
        return self.fc(x.mean((2, 3)))


CONVERTED = ["stem", "body.0", "body.3", "heads.a"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_convert_u_small_cnn() -> None:
    torch.manual_seed(0)
    net = SmallNet()
    model, report = convert(net, "u")
    assert isinstance(report, ConvertReport)
    assert report.replaced == 4 and [layer.name for layer in report.layers] == CONVERTED
    assert report.params_before == _params(net) and report.params_after == _params(model)
    assert report.params_after < report.params_before
    for name, layer in zip(CONVERTED, report.layers):
        old, new = net.get_submodule(name), model.get_submodule(name)
        assert type(new) is bsconv_fused.BSConvU and layer.target == "BSConvU"
        assert layer.source == "Conv2d" and layer.weights == "fresh"
        assert (layer.in_channels, layer.out_channels) == (old.in_channels, old.out_channels)
        assert layer.params_before == _params(old) and layer.params_after == _params(new)
        pw, dw = new.pw, new.dw
        assert (pw.in_channels, pw.out_channels, dw.out_channels) == \
            (old.in_channels, old.out_channels, old.out_channels)
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(dw, attr) == getattr(old, attr), (name, attr)
        assert (dw.bias is None) == (old.bias is None)
        assert "bn" not in new._modules
    assert model.get_submodule("body.3").dw.padding == "same"
    # everything else is untouched (a copy: inplace=False)
    for name in ("body.4", "body.5", "body.6"):
        assert type(model.get_submodule(name)) is nn.Conv2d
    assert all(type(net.get_submodule(name)) is nn.Conv2d for name in CONVERTED)
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == net(x).shape == (2, 10)
    model(x).sum().backward()
    assert model.stem.pw.weight.grad is not None


@pytest.mark.parametrize("variant", ["u", "s"])
def test_convert_equals_reference_replacer(variant: str) -> None:
    """Same selection, same constructor arguments, same order: with the same seed the converted
    model equals the authors' replacer's model, weights included, and computes the same."""
    torch.manual_seed(0)
    net = SmallNet()
    torch.manual_seed(1)
    if variant == "u":
        ref = bsconv_pytorch.BSConvU_Replacer(with_bn=False).apply(copy.deepcopy(net))
    else:
        ref = bsconv_pytorch.BSConvS_Replacer(p=0.5, with_bn=True).apply(copy.deepcopy(net))
    torch.manual_seed(1)
    ours, report = convert(net, variant, p=0.5, with_bn=variant == "s")
    assert report.replaced == 4
    assert repr(ours) == repr(ref)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)
    ref, ours = ref.double().eval(), ours.double().eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        # float64, fused vs unfused: only the summation order differs (observed ~1e-16)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_convert_s_subspace_size() -> None:
    model, report = convert(SmallNet(), "s", p=0.25, min_mid_channels=3)
    # M' = min(M, max(3, ceil(M / 4))): stem M = 3 -> 3, body.0 M = 8 -> 3, body.3 M = 16 -> 4,
    # heads.a M = 24 -> 6
    mids = [model.get_submodule(n).pw1.out_channels for n in CONVERTED]
    assert mids == [3, 3, 4, 6]
    assert all(layer.target == "BSConvS" for layer in report.layers)
    assert bsconv_fused.orthonormal_loss(model).item() > 0


@pytest.mark.parametrize("kernel_sizes,expected", [
    ((3,), ["stem", "body.0", "heads.a"]),
    (5, ["body.3"]),
    (((1, 3),), ["body.6"]),
    ([(1, 3), 5], ["body.3", "body.6"]),
    (None, ["stem", "body.0", "body.3", "body.5", "body.6", "heads.a"]),  # not the depthwise
])
def test_kernel_size_selection(kernel_sizes, expected) -> None:
    _, report = convert(SmallNet(), "u", kernel_sizes=kernel_sizes)
    assert [layer.name for layer in report.layers] == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_device_and_mode_carried_over(dtype: torch.dtype) -> None:
    net = SmallNet().to(dtype).eval()
    model, _ = convert(net, "s", with_bn=True)
    for name in CONVERTED:
        block = model.get_submodule(name)
        assert not block.training and not any(m.training for m in block.modules())
        assert {p.dtype for p in block.parameters()} == {dtype}
        assert {b.dtype for n, b in block.named_buffers() if "num_batches" not in n} == {dtype}
    with torch.device("meta"):
        meta_net = SmallNet()
    meta_model, _ = convert(meta_net, "u")
    assert {p.device.type for p in meta_model.parameters()} == {"meta"}
    x = torch.randn(1, 3, 16, 16, dtype=dtype)
    assert model(x).dtype == dtype


def test_inplace_and_copy() -> None:
    net = SmallNet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    copied, _ = convert(net, "u")
    assert copied is not net and type(net.stem) is nn.Conv2d
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    same, report = convert(net, "u", kernel_sizes=None, inplace=True)
    assert same is net and type(net.stem) is bsconv_fused.BSConvU and report.replaced == 6
    # converting again finds nothing: fused blocks (and their 1x1 / depthwise convs) stay
    again, report = convert(net, "u", kernel_sizes=None, inplace=True)
    assert again is net and report.replaced == 0
    assert report.params_before == report.params_after


def test_root_and_shared_modules() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    block, report = convert(conv, "u")
    assert type(block) is bsconv_fused.BSConvU and block.dw.bias is None
    assert report.layers[0].name == "" and "(root)" in str(report)
    assert block.pw.weight.dtype == torch.float64

    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted, report = convert(model, "u")
    assert report.replaced == 1 and report.layers[0].name == "0"
    assert converted[0] is converted[2]
    assert report.params_after == _params(converted)


def _reference_blocks_model() -> nn.Module:
    return nn.Sequential(
        bsconv_pytorch.BSConvU(4, 8, 3, padding=1, with_bn=True, bn_kwargs={"eps": 1e-3}),
        nn.ReLU(),
        bsconv_pytorch.BSConvS(8, 12, (3, 5), stride=2, padding=(1, 2), p=0.3, bias=False,
                               with_bn=False),
        nn.Conv2d(12, 12, 3, padding=1),
        bsconv_pytorch.BSConvS(12, 6, 3, padding=1, dilation=2, padding_mode="replicate",
                               with_bn=True, bn_kwargs={"momentum": 0.2, "affine": False}),
    )


def test_reference_modules_keep_their_weights() -> None:
    torch.manual_seed(0)
    ref = _reference_blocks_model().double()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ref.eval()
    model, report = convert(ref, "u", kernel_sizes=(7,))  # variant / kernel sizes do not matter
    assert [(layer.name, layer.source, layer.target, layer.weights) for layer in report.layers] \
        == [("0", "bsconv.BSConvU", "BSConvU", "kept"), ("2", "bsconv.BSConvS", "BSConvS", "kept"),
            ("4", "bsconv.BSConvS", "BSConvS", "kept")]
    assert report.params_before == report.params_after
    assert [type(model[i]) for i in (0, 2, 4)] == \
        [bsconv_fused.BSConvU, bsconv_fused.BSConvS, bsconv_fused.BSConvS]
    assert type(model[3]) is nn.Conv2d  # 3x3 not selected by kernel_sizes=(7,)
    assert model[0].bn.eps == 1e-3 and model[4].bn2.momentum == 0.2 and not model[4].bn2.affine
    assert model[2].pw1.out_channels == max(4, math.ceil(0.3 * 8)) and model[2].dw.bias is None
    assert not any(m.training for m in model.modules())
    ref_sd, our_sd = ref.state_dict(), model.state_dict()
    assert list(ref_sd) == list(our_sd) and all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)
    x = torch.randn(2, 4, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)


def test_reference_zoo_model_converts_to_fused() -> None:
    torch.manual_seed(0)
    ref = bsconv_pytorch.get_model("cifar_resnet20_bsconvs_p1d4", num_classes=10).double().eval()
    model, report = convert(ref, "s")
    assert report.replaced == 19 and {layer.weights for layer in report.layers} == {"kept"}
    assert not any(isinstance(m, (bsconv_pytorch.BSConvU, bsconv_pytorch.BSConvS))
                   for m in model.modules())
    assert sum(isinstance(m, bsconv_fused.BSConvS) for m in model.modules()) == 19
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)
    # the reg_loss the reference replacer bound to the model still sees every BSConv-S block
    torch.testing.assert_close(torch.as_tensor(model.reg_loss()), torch.as_tensor(ref.reg_loss()))


def test_report_text() -> None:
    _, report = convert(SmallNet(), "s")
    text = str(report)
    assert text.startswith("convert: replaced 4 modules")
    assert f"{report.params_before:,} -> {report.params_after:,}" in text
    for name in CONVERTED:
        assert name in text
    assert "BSConvS" in text and "fresh" in text
    _, empty = convert(nn.Linear(2, 2), "u")
    assert empty.replaced == 0 and str(empty).startswith("convert: replaced 0 modules")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"variant": "x"}, ValueError, "variant must be 'u'"),
    ({"variant": None}, ValueError, "variant"),
    ({"kernel_sizes": ()}, ValueError, "kernel_sizes is empty"),
    ({"kernel_sizes": (3, 0)}, ValueError, "positive int"),
    ({"kernel_sizes": (3, (1, 2, 3))}, ValueError, "pair of positive ints"),
    ({"kernel_sizes": (True,)}, ValueError, "kernel_sizes"),
    ({"kernel_sizes": "3"}, TypeError, "kernel_sizes"),
    ({"kernel_sizes": 3.0}, TypeError, "kernel_sizes"),
    ({"variant": "s", "p": 1.5}, ValueError, "p must be a number in"),
    ({"variant": "s", "p": -0.1}, ValueError, "p must be"),
    ({"variant": "s", "p": float("nan")}, ValueError, "p must be"),
    ({"variant": "s", "p": "0.5"}, ValueError, "p must be"),
    ({"variant": "s", "min_mid_channels": 0}, ValueError, "min_mid_channels"),
    ({"bn_kwargs": [("eps", 1e-3)]}, TypeError, "bn_kwargs"),
])
def test_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        convert(SmallNet(), **kwargs)


def test_errors_model() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x)
    with pytest.raises(ValueError, match="lazy"):
        convert(nn.Sequential(nn.LazyConv2d(8, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match="TorchScript"):
        convert(scripted)


def test_altered_reference_module_is_left_alone() -> None:
    block = bsconv_pytorch.BSConvU(4, 8, 3, padding=1, with_bn=True)
    block.bn = nn.Identity()  # not the reference layout any more
    model, report = convert(nn.Sequential(block), "u")
    assert report.replaced == 0 and type(model[0]) is bsconv_pytorch.BSConvU
