"""The PyTorch ecosystem around the fused op: torch.compile, torch.export, ONNX, autocast.

Tolerances. Compiled vs eager (float32): ``aot_eager`` runs the same kernels in the same order
except for the summation order of gradient accumulations, inductor also fuses the elementwise ops
around the convolutions; either way results differ by float32 rounding only. Every compared value
is a sum of at most a few thousand products through ~20 layers, so 1e-4 relative (with an
absolute floor of 1e-5 times the largest magnitude, ~100 float32 ulps of the output's scale) has
wide headroom while any real mistake (a dropped term, a wrong layer) is O(1). ONNX Runtime runs
its own float32 convolutions: the same rule against PyTorch. Low precision (bf16 autocast) is
judged against a float64 oracle: the fused model may be at most twice as far from it as the same
model on the pure-PyTorch reference path under the same autocast (that is what nn.Conv2d layers
would give), with a floor of two bf16 ulps at the output's scale.
"""

from __future__ import annotations

import copy
import importlib
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch
from helpers import EPS, fused_op_ran
from torch import nn

import bsconv_fused
from bsconv_fused.export import decompose, export_onnx
from bsconv_fused.fuse import FusedPointwiseDepthwise, fuse
from bsconv_fused.modules import BSConvS, BSConvU


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch._dynamo.reset()
    # One intra-op thread: these are many small ops, and on a shared 2-core machine busy-waiting
    # worker threads make them many times slower; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters, so eval-mode folding is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


def small_net(with_bn: bool = True) -> nn.Sequential:
    """Both variants, every padding mode, strides, BN after blocks, activations."""
    return nn.Sequential(
        BSConvU(3, 8, 3, padding=1, with_bn=with_bn), nn.BatchNorm2d(8), nn.ReLU(),
        BSConvS(8, 12, 3, stride=2, padding=1, with_bn=with_bn, p=0.5), nn.ReLU6(),
        BSConvU(12, 12, 5, padding=2, padding_mode="reflect", with_bn=with_bn), nn.Hardswish(),
        BSConvS(12, 8, 3, padding="same", padding_mode="circular", with_bn=with_bn),
        BSConvU(8, 8, 3, padding=1, padding_mode="replicate"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def zoo(name: str) -> nn.Module:
    try:
        models = importlib.import_module("bsconv_fused.models")
    except ImportError:
        pytest.skip("bsconv_fused.models is not available")
    return models.get_model(name, num_classes=10)


def assert_close32(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """float32 rounding-level agreement (see the module docstring)."""
    scale = max(expected.detach().abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
    """Loss and the gradients of every parameter (by name) for one batch."""
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach(), {n.replace("_orig_mod.", ""): p.grad
                           for n, p in model.named_parameters()}


def check_compiled(model: nn.Module, x: torch.Tensor, num_classes: int,
                   backend: str = "aot_eager") -> None:
    """fullgraph compile (an error on any graph break): same outputs and gradients as eager, in
    training mode (BatchNorm with batch statistics; blocks without BN run the fused op) and in
    eval mode (BN folded into the fused op), and two SGD steps give the same weights."""
    target = torch.randint(0, num_classes, (x.shape[0],))
    eager = model
    compiled_net = copy.deepcopy(model)
    compiled = torch.compile(compiled_net, fullgraph=True, backend=backend)
    for training in (True, False):
        eager.train(training)
        compiled.train(training)
        loss_e, g_e = step(eager, x, target)
        loss_c, g_c = step(compiled, x, target)
        assert_close32(loss_c, loss_e, f"loss (training={training})")
        assert g_e.keys() == g_c.keys()
        for k in g_e:
            if g_e[k] is None:
                assert g_c[k] is None, k
            else:
                assert_close32(g_c[k], g_e[k], f"grad {k} (training={training})")
    # Two training steps (the running statistics move too).
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, compiled_net)]
    for m, opt in zip((eager, compiled), opts):
        m.train()
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled_net.state_dict().items()):
        if a.is_floating_point():
            assert_close32(b, a, f"after two steps: {k}")


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("with_bn", [True, False])
def test_compile_small_net_aot_eager(with_bn):
    model = randomize_bn(small_net(with_bn))
    check_compiled(model, torch.randn(4, 3, 12, 12), num_classes=5)


def test_compile_zoo_model_aot_eager():
    model = randomize_bn(zoo("cifar_resnet20_bsconvu"))
    x = torch.randn(4, 3, 16, 16)
    assert fused_op_ran(lambda: model.train()(x))
    check_compiled(model, x, num_classes=10)


def test_compile_inductor():
    """Inductor (C++ codegen on CPU) around the fused op: the op stays an extern call."""
    model = randomize_bn(small_net(True)).eval()
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="inductor")
    y_e = model(x)
    (gx_e,) = torch.autograd.grad(y_e.square().sum(), x)
    y_c = compiled(x)
    (gx_c,) = torch.autograd.grad(y_c.square().sum(), x)
    assert_close32(y_c, y_e, "output")
    assert_close32(gx_c, gx_e, "grad x")


def test_compile_fused_model():
    """A model rewritten by fuse() compiles without graph breaks and matches it."""
    tv = pytest.importorskip("torchvision")
    model = randomize_bn(tv.models.mobilenet_v3_small(weights=None, num_classes=10)).eval()
    fused, report = fuse(model)
    assert report.num_fused > 0
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close32(compiled(x), fused(x), "compiled fused model")


# --------------------------------------------------------------------------------------------
# torch.export


def _ops(ep: torch.export.ExportedProgram) -> set:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_torch_export_keeps_fused_op_and_decomposes():
    model = randomize_bn(small_net(True)).eval()
    x = torch.randn(2, 3, 12, 12)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert "bsconv_fused.forward.default" in _ops(ep)
    x5 = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        y = model(x5)
        assert_close32(ep.module()(x5), y, "exported")
        dec = decompose(ep)
        assert not any(op.startswith("bsconv_fused") for op in _ops(dec))
        assert "aten.conv2d.default" in _ops(dec) or "aten.convolution.default" in _ops(dec)
        assert_close32(dec.module()(x5), y, "decomposed")
    # The exported program round-trips through save / load.
    import io
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    with torch.no_grad():
        assert_close32(torch.export.load(buf).module()(x5), y, "loaded")


def test_torch_export_training_graph():
    """Capture in training mode: BatchNorm with batch statistics around the fused op (BSConv-U
    blocks without BN run fused in training too), and the exported module computes the same."""
    model = zoo("cifar_resnet20_bsconvu").train()
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(model, (x,))
    assert "bsconv_fused.forward.default" in _ops(ep)
    assert "aten.batch_norm.default" in _ops(ep) or "aten._native_batch_norm_legit_functional" \
        ".default" in _ops(ep)
    reference = copy.deepcopy(model)
    assert_close32(ep.module()(x), reference(x), "exported training graph")


# --------------------------------------------------------------------------------------------
# ONNX (onnxruntime CPU)


def run_ort(path: str, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(out))


def _onnx_ops(path: str) -> set:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(path)
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    return ops


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_small_net(tmp_path, dynamo):
    pytest.importorskip("onnxscript" if dynamo else "onnx")
    model = randomize_bn(small_net(True)).eval()
    x = torch.randn(2, 3, 12, 12)
    path = str(tmp_path / "model.onnx")
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        prog = export_onnx(model, (x,), dynamo=True, dynamic_shapes=({0: batch},))
        prog.save(path)
    else:
        export_onnx(model, (x,), path, dynamo=False, input_names=["x"],
                    dynamic_axes={"x": {0: "batch"}})
    ops = _onnx_ops(path)
    assert "Conv" in ops and not any("bsconv" in op.lower() for op in ops)
    x3 = torch.randn(3, 3, 12, 12)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        assert_close32(run_ort(path, x3), model(x3), "onnxruntime")


def test_onnx_fused_torchvision_model(tmp_path):
    """fuse() -> ONNX (dynamo exporter) -> onnxruntime, on MobileNetV3 (Hardswish and ReLU mid
    activations, stride 2, 5x5 kernels)."""
    pytest.importorskip("onnxscript")
    tv = pytest.importorskip("torchvision")
    model = randomize_bn(tv.models.mobilenet_v3_small(weights=None, num_classes=10)).eval()
    fused, report = fuse(model)
    assert report.num_fused > 0
    acts = {f.activation for f in report.fused}
    assert {"hardswish", "relu"} <= acts
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / "mnv3.onnx")
    export_onnx(fused, (x,)).save(path)
    with torch.no_grad():
        assert_close32(run_ort(path, x), fused(x), "onnxruntime")
        assert_close32(run_ort(path, x), model(x), "onnxruntime vs unfused")


def test_onnx_from_exported_program(tmp_path):
    pytest.importorskip("onnxscript")
    model = randomize_bn(zoo("cifar_mobilenetv3_small_w1d2_bsconvs_p1d6")).eval()
    fused, _ = fuse(model)
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(fused, (x,))
    assert "bsconv_fused.forward.default" in _ops(ep)
    path = str(tmp_path / "ep.onnx")
    export_onnx(ep, (x,)).save(path)
    with torch.no_grad():
        assert_close32(run_ort(path, x), model(x), "onnxruntime")


# --------------------------------------------------------------------------------------------
# Autocast (bfloat16 on CPU)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _autocast_models() -> Dict[str, Callable[[], nn.Module]]:
    # In training mode BSConv blocks with BatchNorm run unfused (batch statistics): the zoo model
    # for training has BSConv-U blocks without BN (fused forward and backward); the one for
    # inference has BSConv-S blocks with BN folded into the op.
    return {"small_net": lambda: randomize_bn(small_net(True)),
            "zoo_eval": lambda: randomize_bn(zoo("cifar_resnet20_bsconvs_p1d4")),
            "zoo_train": lambda: randomize_bn(zoo("cifar_resnet20_bsconvu"))}


@pytest.mark.parametrize("name", ["small_net", "zoo_eval"])
def test_autocast_inference(name):
    model = _autocast_models()[name]().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y64 = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
            assert fused_op_ran(lambda: model(x))
            with bsconv_fused.use_reference():
                r = model(x)
    assert y.dtype == r.dtype  # the same dtype as the unfused layers give
    floor = 2 * EPS[torch.bfloat16] * max(y64.abs().max().item(), 1.0)
    assert _max_err(y, y64) <= 2 * max(_max_err(r, y64), floor)


@pytest.mark.parametrize("name", ["small_net", "zoo_train"])
def test_autocast_training(name):
    """Forward and backward under autocast: fused op in bf16, float32 parameter gradients of
    the accuracy the unfused layers give."""
    model = _autocast_models()[name]().train()
    x = torch.randn(4, 3, 16, 16)
    target = torch.randint(0, 5 if name == "small_net" else 10, (4,))
    m64 = copy.deepcopy(model).double()
    _, g64 = step(m64, x.double(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_op_ran(lambda: model(x))
        _, g = step(model, x, target)
        with bsconv_fused.use_reference():
            _, g_ref = step(model, x, target)
    # Errors relative to the float64 gradient; a gradient that is zero analytically (BSConv-S's
    # mid-BN bias in training mode: BN after pw2 removes the constant it adds) is rounding
    # noise in float64 too (~1e-17 here), so its errors are measured against the gradient
    # scale of the whole model instead (a float64 gradient 1e-8 of that is no real gradient).
    scale = torch.cat([v.double().flatten() for v in g64.values()]).norm().item()
    for k, g_k in g.items():
        assert g_k.dtype == torch.float32, k
        den = g64[k].double().norm().item()
        den = den if den > 1e-8 * scale else scale
        err = (g_k.double() - g64[k].double()).norm().item() / den
        ref_err = (g_ref[k].double() - g64[k].double()).norm().item() / den
        assert err <= 2 * max(ref_err, 2 * EPS[torch.bfloat16]), (k, err, ref_err)


def test_autocast_fused_model():
    """A fuse()d model under autocast behaves like the original under autocast."""
    tv = pytest.importorskip("torchvision")
    model = randomize_bn(tv.models.mobilenet_v2(weights=None, num_classes=10)).eval()
    fused, _ = fuse(model)
    assert any(isinstance(m, FusedPointwiseDepthwise) for m in fused.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y64 = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fused(x)
            r = model(x)
    assert y.dtype == r.dtype == torch.bfloat16
    floor = 2 * EPS[torch.bfloat16] * max(y64.abs().max().item(), 1.0)
    assert _max_err(y, y64) <= 2 * max(_max_err(r, y64), floor)


# --------------------------------------------------------------------------------------------
# examples/train.py


def _load_train_example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train.py"
    spec = importlib.util.spec_from_file_location("bsconv_train_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["u", "s"])
def test_train_example_short_run(tmp_path, variant):
    """One short epoch: the outputs exist, the checkpoint loads, and the loss went down."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    train = _load_train_example()
    threads = torch.get_num_threads()
    try:
        summary = train.main(["--variant", variant, "--epochs", "1", "--max-steps", "25",
                              "--batch-size", "32", "--lr", "0.05", "--out", str(tmp_path),
                              "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    for name in ("curves.png", "checkpoint.pt", "history.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(tmp_path / "checkpoint.pt")
    assert ckpt["args"]["variant"] == variant and ckpt["args"]["epochs"] == 1
    model = zoo(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    losses = summary["history"]["step_loss"]
    assert len(losses) == 25
    # Single batches are noisy: compare the means of the first and the last five steps (about
    # 2.8 -> 2.0 with these settings).
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    assert summary["fused_test_acc"] == pytest.approx(summary["test_acc"], abs=0.01)
