"""BSConvU / BSConvS modules: drop-in parity with the authors' ``bsconv`` 0.4.0 package.

Structure and state_dicts must be interchangeable in both directions; outputs and gradients must
match the reference modules (which run plain nn.Conv2d / nn.BatchNorm2d) to float64 rounding.
"""

from __future__ import annotations

import copy
import itertools
import math

import bsconv.pytorch as ref
import pytest
import torch
from torch import nn

import bsconv_fused
from bsconv_fused import BSConvS, BSConvU, orthonormal_loss

CLASSES = {"U": (BSConvU, ref.BSConvU), "S": (BSConvS, ref.BSConvS)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    # float64 unit roundoff is 1.1e-16. Every value compared here is a sum of at most a few hundred
    # products (M * K_h * K_w <= 8 * 25 taps per output; weight gradients add B * H * W <= 200
    # positions), and the fused path reassociates those sums and folds BatchNorm into
    # scale * v + shift instead of (v - mean) * invstd * w + b. Worst-case forward error bound
    # n * u * sum|terms| is ~1e-13 relative to the magnitude, so rtol 1e-10 with an absolute
    # floor of 1e-12 times the largest magnitude leaves ~100x headroom yet still catches any real
    # mistake (a wrong tap, a missed padding pixel or a BN term is O(1) relative).
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * scale,
                               msg=lambda m: f"{what}: {m}")


def randomize_bn(model: nn.Module) -> None:
    """Random running statistics and affine parameters, so the eval-mode fold is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                for t in (m.weight, m.bias):
                    if t is not None:
                        t.normal_()


def make_pair(variant: str, direction: str, *args, **kwargs):
    """(ours, reference) with identical weights; ``direction`` says which one was loaded from
    the other's state_dict ("from_ref": ours <- reference, "to_ref": reference <- ours)."""
    ours_cls, ref_cls = CLASSES[variant]
    torch.manual_seed(1)
    ours = ours_cls(*args, **kwargs).double()
    torch.manual_seed(2)
    theirs = ref_cls(*args, **kwargs).double()
    src, dst = (theirs, ours) if direction == "from_ref" else (ours, theirs)
    randomize_bn(src)
    dst.load_state_dict(src.state_dict())
    return ours, theirs


def run(model: nn.Module, x: torch.Tensor, gy_seed: int = 3):
    """Output, grad of x and grads of every parameter (by name) for a random cotangent (seeded,
    so two models get the same one). Calls the model exactly once (BatchNorm running stats)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    gen = torch.Generator().manual_seed(gy_seed)
    y.backward(torch.randn(y.shape, generator=gen, dtype=y.dtype))
    grads = {n: p.grad for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads


def check_parity(ours, theirs, x):
    y1, gx1, g1 = run(ours, x)
    y2, gx2, g2 = run(theirs, x)
    assert_close64(y1, y2, "output")
    assert_close64(gx1, gx2, "grad x")
    assert g1.keys() == g2.keys()
    for name in g2:
        assert g1[name] is not None, name
        assert_close64(g1[name], g2[name], f"grad {name}")


# --------------------------------------------------------------------------------------------
# Construction: same submodules, state_dict keys, initialization, repr.

CONFIGS = [
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3},
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1, "with_bn": True},
    {"in_channels": 6, "out_channels": 5, "kernel_size": 5, "stride": 2, "padding": 2,
     "bias": False},
    {"in_channels": 6, "out_channels": 10, "kernel_size": (3, 5), "padding": (1, 2),
     "padding_mode": "reflect", "with_bn": True, "bn_kwargs": {"affine": False}},
    {"in_channels": 12, "out_channels": 7, "kernel_size": 3, "padding": "same", "dilation": 2,
     "padding_mode": "circular", "with_bn": True, "bn_kwargs": {"eps": 1e-3, "momentum": None}},
    {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": "valid",
     "padding_mode": "replicate", "with_bn": True, "bn_kwargs": {"track_running_stats": False}},
]
S_EXTRA = [{}, {"p": 0.5}, {"p": 0.0}, {"p": 1.0}, {"min_mid_channels": 1},
           {"p": 0.1, "min_mid_channels": 16}]


def _cases():
    for cfg in CONFIGS:
        yield "U", cfg
        for extra in S_EXTRA:
            yield "S", {**cfg, **extra}


@pytest.mark.parametrize("variant,cfg", list(_cases()))
def test_structure_matches_reference(variant, cfg):
    ours_cls, ref_cls = CLASSES[variant]
    torch.manual_seed(0)
    theirs = ref_cls(**cfg)
    torch.manual_seed(0)
    ours = ours_cls(**cfg)
    assert isinstance(ours, nn.Sequential)
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert repr(ours) == repr(theirs)
    assert type(ours[0]) is nn.Conv2d and ours[0] is next(iter(ours.children()))
    sd_ours, sd_ref = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for k in sd_ref:
        # Same constructors in the same order consume the RNG identically: same default init.
        assert torch.equal(sd_ours[k], sd_ref[k]), k
    assert (sum(p.numel() for p in ours.parameters())
            == sum(p.numel() for p in theirs.parameters()))
    # Loads both ways with strict=True.
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def test_bsconv_s_mid_channels():
    for m, p, mmc in itertools.product([1, 3, 8, 17, 64], [0.0, 0.1, 0.25, 0.5, 1.0], [1, 4, 8]):
        expected = min(m, max(mmc, math.ceil(p * m)))
        assert BSConvS(m, 4, 3, p=p, min_mid_channels=mmc).pw1.out_channels == expected


@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan"), 2])
def test_bsconv_s_rejects_bad_p(p):
    with pytest.raises(ValueError, match=r"BSConvS: p must be in \[0, 1\]"):
        BSConvS(8, 8, 3, p=p)


def test_bsconv_s_rejects_empty_subspace():
    with pytest.raises(ValueError, match="at least one"):
        BSConvS(8, 8, 3, p=0.0, min_mid_channels=0)


@pytest.mark.parametrize("variant", ["U", "S"])
def test_factory_kwargs(variant):
    cls = CLASSES[variant][0]
    m = cls(4, 6, 3, with_bn=True, dtype=torch.float64)
    assert {t.dtype for t in m.parameters()} == {torch.float64}
    assert {b.dtype for n, b in m.named_buffers() if "num_batches" not in n} == {torch.float64}
    m = cls(4, 6, 3, with_bn=True, device="meta")
    assert {t.device.type for t in itertools.chain(m.parameters(), m.buffers())} == {"meta"}
    # bn_kwargs may override the factory kwargs for the BatchNorm only.
    m = cls(4, 6, 3, with_bn=True, dtype=torch.float64, bn_kwargs={"dtype": torch.float32})
    bns = [b for b in m if isinstance(b, nn.BatchNorm2d)]
    assert bns and all(b.weight.dtype == torch.float32 for b in bns)
    assert m.dw.weight.dtype == torch.float64


def test_slicing_returns_plain_sequential():
    m = BSConvS(8, 8, 3, with_bn=True)
    head = m[:2]
    assert type(head) is nn.Sequential and list(head) == [m.pw1, m.bn1]
    assert m[-1] is m.dw and len(m) == 5


# --------------------------------------------------------------------------------------------
# Numerical parity with the reference package (float64, outputs and every gradient).


@pytest.mark.parametrize("direction", ["from_ref", "to_ref"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("with_bn", [False, True])
@pytest.mark.parametrize("variant", ["U", "S"])
def test_parity_eval(variant, with_bn, kernel_size, stride, padding_mode, direction):
    kwargs = {"stride": stride, "padding": kernel_size // 2, "padding_mode": padding_mode,
                  "with_bn": with_bn}
    if variant == "S":
        kwargs["p"] = 0.5
    ours, theirs = make_pair(variant, direction, 6, 10, kernel_size, **kwargs)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    check_parity(ours, theirs, x)


# nn.Conv2d warns that padding="same" with an even kernel copies the input (reference only).
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("variant", ["U", "S"])
@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "dilation": 2, "padding": 2, "bias": False},
    {"kernel_size": (3, 5), "padding": (1, 2), "stride": (2, 1), "padding_mode": "reflect"},
    {"kernel_size": 4, "padding": "same", "padding_mode": "zeros", "with_bn": True},
    {"kernel_size": 4, "padding": "same", "dilation": (1, 2), "padding_mode": "circular",
     "with_bn": True},
    {"kernel_size": 3, "padding": "valid", "with_bn": True, "bn_kwargs": {"affine": False}},
    {"kernel_size": 3, "padding": 1, "with_bn": True, "bn_kwargs": {"eps": 0.1, "bias": False}},
    {"kernel_size": 5, "padding": 3, "stride": 3, "padding_mode": "replicate", "bias": False},
    {"kernel_size": 1, "with_bn": True},
], ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_parity_eval_more_options(variant, kwargs):
    ours, theirs = make_pair(variant, "from_ref", 5, 7, **kwargs)
    ours.eval()
    theirs.eval()
    check_parity(ours, theirs, torch.randn(3, 5, 8, 10, dtype=torch.float64))


@pytest.mark.parametrize("variant,m,n,kwargs,hw,channels_last", [
    ("U", 19, 37, {"kernel_size": 3, "padding": 1, "with_bn": True}, (45, 70), False),
    ("S", 33, 21, {"kernel_size": 5, "stride": 2, "padding": 2, "padding_mode": "reflect",
                   "with_bn": True}, (38, 41), False),
    ("U", 17, 24, {"kernel_size": 3, "dilation": 2, "padding": 2, "padding_mode": "circular"},
     (35, 33), True),
    ("S", 16, 40, {"kernel_size": 3, "padding": 1, "padding_mode": "replicate", "p": 0.5,
                   "with_bn": True}, (34, 36), True),
], ids=["U-wide", "S-strided-reflect", "U-dilated-cl", "S-replicate-cl"])
def test_parity_multi_tile(variant, m, n, kwargs, hw, channels_last):
    # Images larger than a 32x32 tile and channel counts that are no multiple of any tile size, so
    # tile halos and remainder chunks are exercised; channels_last as models often run it.
    ours, theirs = make_pair(variant, "to_ref", m, n, **kwargs)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, m, *hw, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        ours.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)
    check_parity(ours, theirs, x)


@pytest.mark.parametrize("variant", ["U", "S"])
def test_empty_batch(variant):
    ours, theirs = make_pair(variant, "from_ref", 6, 8, 3, padding=1, with_bn=True)
    ours.eval()
    theirs.eval()
    x = torch.randn(0, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    y = ours(x)
    assert y.shape == theirs(x).shape == (0, 8, 7, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.any() for p in ours.parameters())


@pytest.mark.parametrize("variant", ["U", "S"])
def test_parity_without_bn_in_training_mode(variant):
    # Without BatchNorm, training mode takes the fused path too.
    ours, theirs = make_pair(variant, "to_ref", 6, 8, 3, padding=1, padding_mode="reflect")
    assert ours.training
    check_parity(ours, theirs, torch.randn(2, 6, 7, 7, dtype=torch.float64))


@pytest.mark.parametrize("bn_kwargs", [{}, {"momentum": None}, {"affine": False}],
                         ids=["default", "cumulative", "no_affine"])
@pytest.mark.parametrize("variant", ["U", "S"])
def test_parity_training_with_bn(variant, bn_kwargs):
    ours, theirs = make_pair(variant, "from_ref", 6, 8, 3, stride=2, padding=1, with_bn=True,
                             bn_kwargs=bn_kwargs)
    ours.train()
    theirs.train()
    for step in range(3):
        check_parity(ours, theirs, torch.randn(4, 6, 9, 9, dtype=torch.float64) + step)
        for (n1, b1), (n2, b2) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
            assert n1 == n2
            if b2.dtype == torch.long:
                assert torch.equal(b1, b2), n1
            else:
                assert_close64(b1, b2, n1)
    assert all(b.num_batches_tracked.item() == 3
               for b in ours if isinstance(b, nn.BatchNorm2d))
    # After training, eval (fused, folded) still matches.
    ours.eval()
    theirs.eval()
    check_parity(ours, theirs, torch.randn(2, 6, 9, 9, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["U", "S"])
def test_parity_eval_without_running_stats(variant):
    # track_running_stats=False: BatchNorm normalizes with batch statistics even in eval mode.
    ours, theirs = make_pair(variant, "from_ref", 6, 8, 3, padding=1, with_bn=True,
                             bn_kwargs={"track_running_stats": False})
    ours.eval()
    theirs.eval()
    check_parity(ours, theirs, torch.randn(4, 6, 7, 7, dtype=torch.float64))


def test_parity_mixed_bn_modes():
    # Only one of the two BatchNorms in eval: cannot be folded, must still match.
    ours, theirs = make_pair("S", "from_ref", 6, 8, 3, padding=1, with_bn=True)
    for m in (ours, theirs):
        m.eval()
        m.bn2.train()
    check_parity(ours, theirs, torch.randn(4, 6, 7, 7, dtype=torch.float64))


def test_no_grad_and_float32():
    ours, theirs = make_pair("S", "from_ref", 8, 16, 3, padding=1, with_bn=True)
    ours.float().eval()
    theirs.float().eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["U", "S"])
def test_half_block_with_float32_batchnorm(variant, dtype):
    # A common recipe: the block in half precision, its BatchNorms kept in float32 (which
    # nn.BatchNorm2d accepts). The fold must run and be about as accurate as the reference.
    ours, theirs = make_pair(variant, "from_ref", 16, 24, 3, padding=1, with_bn=True)
    truth = copy.deepcopy(theirs).eval()  # float64
    for m in (ours, theirs):
        m.eval().to(dtype)
        for bn in m:
            if isinstance(bn, nn.BatchNorm2d):
                bn.float()
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = truth(x)
        y_ours, y_ref = ours(x.to(dtype)), theirs(x.to(dtype))
    assert y_ours.dtype == y_ref.dtype == dtype
    err_ours = (y_ours.double() - expected).abs().max().item()
    err_ref = (y_ref.double() - expected).abs().max().item()
    # The fold rounds s1 * W1 and the shifts to the half dtype where the reference rounds the
    # BatchNorm outputs instead: comparable error. As for the low-precision op tests, allow 2x
    # the reference's own error (measured: ours is 0.45x-0.97x of it).
    assert err_ours <= 2 * err_ref, (err_ours, err_ref)


# --------------------------------------------------------------------------------------------
# Modified blocks fall back to the Sequential forward (and still match the reference).


def test_appended_module_runs():
    ours, theirs = make_pair("U", "from_ref", 4, 6, 3, padding=1)
    ours.append(nn.Hardswish())
    theirs.append(nn.Hardswish())
    check_parity(ours, theirs, torch.randn(2, 4, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["U", "S"])
def test_child_hooks_run(variant):
    ours, theirs = make_pair(variant, "from_ref", 4, 6, 3, padding=1, with_bn=True)
    ours.eval()
    theirs.eval()
    seen = []
    ours.dw.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_close64(ours(x), theirs(x))
    assert seen == [torch.Size([2, 6, 6, 6])]


def test_parametrized_weights_stay_fused():
    # Parametrizations (weight_norm, orthogonal, ...) keep Conv2d.forward and expose the
    # effective weight as .weight, so the fused path still applies and must see that weight.
    from torch.nn.utils.parametrizations import weight_norm

    ours, theirs = make_pair("S", "from_ref", 6, 8, 3, padding=1, with_bn=True)
    for m in (ours, theirs):
        m.eval()
        weight_norm(m.pw1)
        weight_norm(m.dw)
    theirs.load_state_dict(ours.state_dict())
    check_parity(ours, theirs, torch.randn(2, 6, 7, 7, dtype=torch.float64))
    if bsconv_fused.extension_available():
        assert "bsconv_fused::forward" in _op_events(lambda: ours(torch.randn(
            1, 6, 5, 5, dtype=torch.float64)))


@pytest.mark.parametrize("variant", ["U", "S"])
def test_conv_attributes_changed_after_construction_are_seen(variant):
    # The fused path reads a plain Conv2d's weight and bias from its parameter dict; a bias
    # given to the projection later makes the block unfusable (the children run), and a
    # depthwise bias replaced by a plain tensor attribute is the one the fused op adds.
    ours, theirs = make_pair(variant, "from_ref", 4, 6, 3, padding=1)
    pw_name = "pw" if variant == "U" else "pw2"
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for m in (ours, theirs):
        del m.dw.bias
        m.dw.bias = torch.linspace(-1, 1, 6, dtype=torch.float64)  # not a Parameter
    assert "bias" not in ours.dw._parameters
    assert_close64(ours(x), theirs(x))
    assert "bsconv_fused::forward" in _op_events(lambda: ours(x))
    for m in (ours, theirs):
        getattr(m, pw_name).bias = nn.Parameter(torch.full((getattr(m, pw_name).out_channels,),
                                                           0.5, dtype=torch.float64))
    assert_close64(ours(x), theirs(x))
    assert "bsconv_fused::forward" not in _op_events(lambda: ours(x))


def test_fx_symbolic_trace():
    ours, theirs = make_pair("S", "from_ref", 4, 6, 3, padding=1, with_bn=True)
    ours.eval()
    theirs.eval()
    gm = torch.fx.symbolic_trace(ours)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_close64(gm(x), theirs(x))


# --------------------------------------------------------------------------------------------
# Orthonormal regularization.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reg_loss_matches_reference(dtype):
    for m_in, p in [(8, 0.25), (16, 0.5), (5, 1.0), (3, 0.25)]:
        theirs = ref.BSConvS(m_in, 12, 3, p=p).to(dtype)
        ours = BSConvS(m_in, 12, 3, p=p).to(dtype)
        ours.load_state_dict(theirs.state_dict())
        expected = theirs._reg_loss()
        got = ours.reg_loss()
        assert got.dim() == 0 and got.dtype == dtype
        torch.testing.assert_close(got, expected.to(dtype))
        torch.testing.assert_close(ours._reg_loss(), got, rtol=0, atol=0)


def test_reg_loss_zero_for_orthonormal_rows():
    m = BSConvS(16, 8, 3, p=0.5).double()
    q, _ = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64))  # 8 orthonormal columns
    with torch.no_grad():
        m.pw1.weight.copy_(q.t().reshape(8, 16, 1, 1))
    assert m.reg_loss().item() < 1e-13


def test_orthonormal_loss_sums_and_scales():
    model = nn.Sequential(
        BSConvS(8, 8, 3, padding=1),
        nn.ReLU(),
        BSConvU(8, 8, 3, padding=1, with_bn=True),
        nn.Sequential(BSConvS(8, 16, 3, p=0.5), ref.BSConvS(16, 4, 3)),
    ).double()
    s_blocks = [model[0], model[3][0], model[3][1]]
    expected = sum(b._reg_loss() for b in s_blocks)
    torch.testing.assert_close(orthonormal_loss(model, alpha=1.0), expected)
    loss = orthonormal_loss(model, alpha=0.01)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, 0.01 * expected)
    torch.testing.assert_close(orthonormal_loss(model), 0.1 * expected)  # default alpha
    loss.backward()
    for b in s_blocks:
        assert b.pw1.weight.grad is not None and b.pw1.weight.grad.abs().sum() > 0
    assert model[0].pw2.weight.grad is None  # only W1 is regularized


def test_orthonormal_loss_gradient_matches_reference():
    theirs = ref.BSConvS(12, 6, 3, p=0.5).double()
    ours = BSConvS(12, 6, 3, p=0.5).double()
    ours.load_state_dict(theirs.state_dict())
    orthonormal_loss(ours, alpha=0.3).backward()
    (0.3 * theirs._reg_loss()).backward()
    assert_close64(ours.pw1.weight.grad, theirs.pw1.weight.grad)


def test_orthonormal_loss_without_bsconv_s():
    loss = orthonormal_loss(nn.Sequential(BSConvU(4, 4, 3)).double())
    assert loss.dim() == 0 and loss.item() == 0.0 and loss.dtype == torch.float64
    assert orthonormal_loss(nn.ReLU()).item() == 0.0


def test_reference_mixin_works_on_our_modules():
    class Net(nn.Sequential, ref.BSConvS_ModelRegLossMixin):
        pass

    net = Net(BSConvS(8, 8, 3), BSConvU(8, 8, 3), BSConvS(8, 8, 3, p=0.5))
    torch.testing.assert_close(net.reg_loss(alpha=0.05), orthonormal_loss(net, alpha=0.05))


# --------------------------------------------------------------------------------------------
# torch.compile and dispatch to the fused op.


def _small_net(with_bn: bool) -> nn.Sequential:
    return nn.Sequential(
        BSConvU(4, 8, 3, padding=1, with_bn=with_bn),
        nn.ReLU(),
        BSConvS(8, 12, 3, stride=2, padding=1, with_bn=with_bn, p=0.5),
        nn.ReLU6(),
        BSConvU(12, 6, 5, padding=2, padding_mode="reflect", with_bn=with_bn),
        BSConvS(6, 6, 3, padding="same", padding_mode="circular", with_bn=with_bn),
    )


@pytest.mark.parametrize("with_bn", [False, True])
def test_torch_compile_fullgraph(with_bn):
    torch._dynamo.reset()
    eager = _small_net(with_bn)
    randomize_bn(eager)
    eager.eval()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True)
    x = torch.randn(2, 4, 10, 10)
    y1, gx1, g1 = run(eager, x)
    y2, gx2, g2 = run(compiled, x)
    # float32 through a few layers of short sums: 1e-5 relative is ~100 ulp.
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(gx2, gx1, **tol)
    assert g1.keys() == {k.replace("_orig_mod.", "") for k in g2}
    for k, g in g2.items():
        torch.testing.assert_close(g, g1[k.replace("_orig_mod.", "")], **tol, msg=k)


def _op_events(fn) -> set:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events if e.name.startswith("bsconv_fused::")}


def _fwd_bwd(model, x):
    def fn():
        model(x).sum().backward()
    return fn


@pytest.mark.parametrize("variant", ["U", "S"])
@pytest.mark.parametrize("mode", ["no_bn_train", "no_bn_eval", "bn_eval"])
def test_fused_op_is_used(variant, mode):
    assert bsconv_fused.extension_available(), (
        f"the compiled extension must be built: {bsconv_fused.extension_error()}")
    with_bn = mode == "bn_eval"
    model = CLASSES[variant][0](6, 8, 3, padding=1, with_bn=with_bn)
    model.train(mode == "no_bn_train")
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    assert _op_events(_fwd_bwd(model, x)) == {"bsconv_fused::forward", "bsconv_fused::backward"}
    with bsconv_fused.use_reference():
        assert _op_events(_fwd_bwd(model, x)) == set()


@pytest.mark.parametrize("variant", ["U", "S"])
def test_training_bn_takes_reference_path(variant):
    model = CLASSES[variant][0](6, 8, 3, padding=1, with_bn=True).train()
    assert _op_events(_fwd_bwd(model, torch.randn(2, 6, 8, 8))) == set()
