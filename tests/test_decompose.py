"""Decomposition of trained convolutions (bsconv_fused.decompose) and kernel statistics
(bsconv_fused.analysis)."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsconv_fused import BSConvS, BSConvU
from bsconv_fused import analysis as A
from bsconv_fused import decompose as D

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small float64 problems: one thread avoids oversubscription on shared CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv(n, m, k=3, seed=0, dtype=F64, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(m, n, k, dtype=dtype, **kw)


def _set_kernel(conv: nn.Conv2d, kernel: torch.Tensor) -> nn.Conv2d:
    with torch.no_grad():
        conv.weight.copy_(kernel.reshape(conv.weight.shape))
    return conv


def _rank1_conv(n, m, k=3, seed=0, **kw) -> nn.Conv2d:
    """Conv whose filters are exactly w[n, m] * B_n."""
    conv = _conv(n, m, k, seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    kh, kw_ = conv.kernel_size
    w = torch.randn(n, m, generator=g, dtype=F64)
    b = torch.randn(n, kh * kw_, generator=g, dtype=F64)
    return _set_kernel(conv, w[:, :, None] * b[:, None, :])


def _smooth_inputs(b, m, h, w=None, seed=0) -> torch.Tensor:
    """Spatially and cross-channel correlated inputs (like feature maps, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    w = h if w is None else w
    base = torch.randn(b, 3, h // 2 + 1, w // 2 + 1, generator=g, dtype=F64)
    base = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    mix = torch.randn(m, 3, generator=g, dtype=F64)
    x = torch.einsum("mc,bchw->bmhw", mix, base)
    return torch.relu(x + 0.3 * torch.randn(b, m, h, w, generator=g, dtype=F64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _u_kernel(mod: BSConvU) -> torch.Tensor:
    return mod.pw.weight.flatten(1)[:, :, None] * mod.dw.weight.flatten(1)[:, None, :]


def _s_kernel(mod: BSConvS) -> torch.Tensor:
    w = mod.pw2.weight.flatten(1) @ mod.pw1.weight.flatten(1)
    return w[:, :, None] * mod.dw.weight.flatten(1)[:, None, :]


def _dsc_kernel(mod: nn.Sequential) -> torch.Tensor:
    m = mod.dw.in_channels
    r = mod.dw.out_channels // m
    d = mod.dw.weight.reshape(m, r, -1)
    p = mod.pw.weight.reshape(mod.pw.out_channels, m, r)
    return torch.einsum("nmj,mjk->nmk", p, d)


# ---------------------------------------------------------------------------------- exactness

def test_bsconv_u_exact_on_rank1_kernels():
    conv = _rank1_conv(12, 8, padding=1)
    res = D.to_bsconv_u(conv)
    assert isinstance(res.module, BSConvU)
    assert res.kernel_error < 1e-14
    x = torch.randn(2, 8, 9, 9, dtype=F64)
    torch.testing.assert_close(res.module(x), conv(x), rtol=1e-12, atol=1e-12)


def test_bsconv_s_exact_when_projection_has_low_rank():
    conv = _conv(12, 16, padding=1)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 4, generator=g, dtype=F64) @ torch.randn(4, 16, generator=g, dtype=F64)
    b = torch.randn(12, 9, generator=g, dtype=F64)
    _set_kernel(conv, w[:, :, None] * b[:, None, :])
    res = D.to_bsconv_s(conv, p=0.25)  # M' = 4
    assert isinstance(res.module, BSConvS) and res.module.pw1.out_channels == 4
    assert res.kernel_error < 1e-13
    x = torch.randn(2, 16, 7, 7, dtype=F64)
    torch.testing.assert_close(res.module(x), conv(x), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("n,m,k", [(6, 5, 3), (16, 4, 3), (3, 4, 5)])
def test_dsc_exact_at_full_rank(n, m, k):
    conv = _conv(n, m, k, padding=k // 2)
    r = min(n, k * k)
    res = D.to_depthwise_separable(conv, rank=r)
    assert res.kernel_error < 1e-13
    x = torch.randn(2, m, 8, 8, dtype=F64)
    torch.testing.assert_close(res.module(x), conv(x), rtol=1e-11, atol=1e-11)


def test_dsc_rank1_exact_on_cross_kernel_rank1():
    conv = _conv(10, 6, padding=1)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(10, 6, generator=g, dtype=F64)
    d = torch.randn(6, 9, generator=g, dtype=F64)
    _set_kernel(conv, p[:, :, None] * d[None, :, :])
    res = D.to_depthwise_separable(conv, rank=1)
    assert res.kernel_error < 1e-14


# ------------------------------------------------------------------------ optimality vs numpy

def test_bsconv_u_matches_direct_svd_and_conventions():
    conv = _conv(9, 7, 3)
    a = conv.weight.detach().reshape(9, 7, 9).numpy()
    res = D.to_bsconv_u(conv)
    mod = res.module
    expect2, approx = 0.0, []
    for n in range(9):
        u, s, vt = np.linalg.svd(a[n])
        expect2 += float((s[1:] ** 2).sum())
        approx.append(s[0] * np.outer(u[:, 0], vt[0]))
    assert res.kernel_error == pytest.approx(math.sqrt(expect2 / (a ** 2).sum()), rel=1e-12)
    np.testing.assert_allclose(_u_kernel(mod).detach().numpy(), np.stack(approx), atol=1e-12)
    # convention: unit-norm blueprint, largest-|.| entry positive, scale in W
    b = mod.dw.weight.detach().flatten(1)
    torch.testing.assert_close(b.norm(dim=1), torch.ones(9, dtype=F64))
    idx = b.abs().argmax(1)
    assert (b[torch.arange(9), idx] > 0).all()
    w = mod.pw.weight.detach().flatten(1)
    s1 = torch.tensor([np.linalg.svd(a[n], compute_uv=False)[0] for n in range(9)], dtype=F64)
    torch.testing.assert_close(w.norm(dim=1), s1)
    # a local perturbation of the optimum cannot lower the error
    g = torch.Generator().manual_seed(0)
    aa = conv.weight.detach().reshape(9, 7, 9)
    for _ in range(5):
        w2 = w + 1e-3 * torch.randn(w.shape, generator=g, dtype=F64)
        b2 = b + 1e-3 * torch.randn(b.shape, generator=g, dtype=F64)
        e2 = (aa - w2[:, :, None] * b2[:, None, :]).norm() / aa.norm()
        assert e2 >= res.kernel_error


def test_bsconv_s_matches_direct_svd():
    conv = _conv(20, 24, 3, seed=4)
    a = conv.weight.detach().reshape(20, 24, 9).numpy()
    res = D.to_bsconv_s(conv, p=0.25, min_mid_channels=4)  # M' = 6
    mod = res.module
    assert mod.pw1.out_channels == D.mid_channels(24, 0.25, 4) == 6
    # given blueprints, the error is the rank-1 error plus the truncation error of W
    rank1_err2, rows = 0.0, []
    for n in range(20):
        u, s, vt = np.linalg.svd(a[n])
        rank1_err2 += float((s[1:] ** 2).sum())
        rows.append(s[0] * u[:, 0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))]))
    sw = np.linalg.svd(np.stack(rows), compute_uv=False)
    expect2 = rank1_err2 + float((sw[6:] ** 2).sum())
    assert res.kernel_error == pytest.approx(math.sqrt(expect2 / (a ** 2).sum()), rel=1e-10)
    w1 = mod.pw1.weight.detach().flatten(1)
    torch.testing.assert_close(w1 @ w1.T, torch.eye(6, dtype=F64), atol=1e-12, rtol=0)
    assert float(mod.reg_loss().detach()) < 1e-12
    direct = np.linalg.norm(a - _s_kernel(mod).detach().numpy()) / np.linalg.norm(a)
    assert res.kernel_error == pytest.approx(direct, rel=1e-10)


def test_bsconv_s_subspace_wider_than_output():
    conv = _conv(3, 16, 3, seed=5)
    res = D.to_bsconv_s(conv, p=0.5)  # M' = 8 > N = 3
    w1 = res.module.pw1.weight.detach().flatten(1)
    torch.testing.assert_close(w1 @ w1.T, torch.eye(8, dtype=F64), atol=1e-12, rtol=0)
    # W has rank <= 3 < M': the subspace step is lossless
    assert res.kernel_error == pytest.approx(D.to_bsconv_u(conv).kernel_error, rel=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_dsc_matches_direct_svd(rank):
    conv = _conv(8, 5, 3, seed=6)
    a = conv.weight.detach().reshape(8, 5, 9).numpy()
    res = D.to_depthwise_separable(conv, rank=rank)
    mod = res.module
    assert list(mod._modules) == ["dw", "pw"]
    assert mod.dw.groups == 5 and mod.dw.out_channels == 5 * rank and mod.dw.bias is None
    expect2 = 0.0
    dw = mod.dw.weight.detach().reshape(5, rank, 9)
    for m in range(5):
        _, s, vt = np.linalg.svd(a[:, m])
        expect2 += float((s[rank:] ** 2).sum())
        for j in range(rank):  # channel m*r + j holds the j-th right singular vector
            v = vt[j] * np.sign(vt[j][np.argmax(np.abs(vt[j]))])
            np.testing.assert_allclose(dw[m, j].numpy(), v, atol=1e-12)
    assert res.kernel_error == pytest.approx(math.sqrt(expect2 / (a ** 2).sum()), rel=1e-12)
    # the module computes exactly the approximated kernel
    x = torch.randn(2, 5, 7, 7, dtype=F64)
    ref = F.conv2d(x, _dsc_kernel(mod).reshape(8, 5, 3, 3).detach(), conv.bias)
    torch.testing.assert_close(mod(x), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- options carried over

CONFIGS = [
    dict(k=3, stride=1, padding=1, dilation=1, padding_mode="zeros", bias=True),
    dict(k=3, stride=2, padding=0, dilation=1, padding_mode="zeros", bias=False),
    dict(k=3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="zeros", bias=True),
    dict(k=(3, 5), stride=1, padding="same", dilation=1, padding_mode="zeros", bias=True),
    dict(k=5, stride=1, padding="valid", dilation=1, padding_mode="zeros", bias=True),
    dict(k=3, stride=1, padding=1, dilation=1, padding_mode="reflect", bias=True),
    dict(k=3, stride=2, padding=1, dilation=1, padding_mode="replicate", bias=False),
    dict(k=3, stride=1, padding=2, dilation=2, padding_mode="circular", bias=True),
    dict(k=2, stride=1, padding="same", dilation=1, padding_mode="zeros", bias=True),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("variant", ["u", "s", "dsc"])
def test_options_carried_over(cfg, variant):
    cfg = dict(cfg)
    k = cfg.pop("k")
    conv = _rank1_conv(6, 4, k, **cfg) if variant != "dsc" else _conv(6, 4, k, **cfg)
    if variant == "u":
        res = D.to_bsconv_u(conv)
        dw = res.module.dw
    elif variant == "s":
        res = D.to_bsconv_s(conv, p=1.0)  # M' = M: exact for rank-1 kernels
        dw = res.module.dw
    else:
        res = D.to_depthwise_separable(conv, rank=min(6, math.prod(conv.kernel_size)))
        dw = res.module.dw
    assert res.kernel_error < 1e-13
    assert dw.kernel_size == conv.kernel_size and dw.stride == conv.stride
    assert dw.padding == conv.padding and dw.dilation == conv.dilation
    assert dw.padding_mode == conv.padding_mode
    has_bias = [p for n, p in res.module.named_parameters() if n.endswith("bias")]
    assert bool(has_bias) == (conv.bias is not None)
    if conv.bias is not None:
        torch.testing.assert_close(has_bias[0], conv.bias)
    x = torch.randn(2, 4, 11, 10, dtype=F64)
    torch.testing.assert_close(res.module(x), conv(x), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("variant", ["u", "s", "dsc"])
def test_dtype_and_training_mode_carried_over(variant):
    conv = nn.Conv2d(8, 8, 3, padding=1, dtype=torch.float32).eval()
    fn = {"u": D.to_bsconv_u, "s": D.to_bsconv_s, "dsc": D.to_depthwise_separable}[variant]
    res = fn(conv)
    assert all(p.dtype == torch.float32 for p in res.module.parameters())
    assert all(p.device == conv.weight.device for p in res.module.parameters())
    assert not any(m.training for m in res.module.modules())
    y = res.module(torch.randn(1, 8, 6, 6))
    assert y.dtype == torch.float32 and y.shape == (1, 8, 6, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="groups"):
        D.to_bsconv_u(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError):
        D.to_bsconv_u(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="rank"):
        D.to_depthwise_separable(nn.Conv2d(4, 4, 3), rank=10)
    with pytest.raises(ValueError, match="p must"):
        D.to_bsconv_s(nn.Conv2d(4, 4, 3), p=1.5)
    with pytest.raises(ValueError, match="variant"):
        D.convert_trained(nn.Sequential(nn.Conv2d(4, 4, 3)), variant="x")


def test_zero_filter_is_harmless():
    conv = _conv(4, 3)
    with torch.no_grad():
        conv.weight[1] = 0
    for fn in (D.to_bsconv_u, D.to_bsconv_s, D.to_depthwise_separable):
        res = fn(conv)
        assert all(torch.isfinite(p).all() for p in res.module.parameters())


# -------------------------------------------------------------------- patch statistics

@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_patch_stats_match_direct_computation(mode, monkeypatch):
    monkeypatch.setattr(D, "_CHUNK", 500)  # force several chunks
    conv = _conv(5, 3, 3, stride=2, padding=1, padding_mode=mode)
    xa = torch.randn(5, 3, 8, 9, dtype=F64)
    xb = xa + 0.1 * torch.randn_like(xa)
    st = D.PatchStats.collect(conv, [xa[:2], xa[2:]], [xb[:2], xb[2:]])

    def z(x):
        pad = conv._reversed_padding_repeated_twice
        xp = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
        cols = F.unfold(xp, 3, stride=2).transpose(1, 2).reshape(-1, 27)
        return torch.cat([cols, torch.ones(len(cols), 1, dtype=F64)], 1)

    za, zb = z(xa), z(xb)
    assert st.rows == za.shape[0]
    torch.testing.assert_close(st.aa, za.T @ za)
    torch.testing.assert_close(st.ab, za.T @ zb)
    torch.testing.assert_close(st.bb, zb.T @ zb)
    # the Gram form of the response error equals the direct one
    res = D.to_bsconv_u(conv, stats=st, iters=2)
    direct = _rel(res.module(xa), conv(xb))
    assert res.response_error == pytest.approx(direct, rel=1e-9)


# ------------------------------------------------------------------------------ refinement

@pytest.mark.parametrize("variant,kw", [("u", {}), ("s", {}), ("dsc", {"rank": 1}),
                                        ("dsc", {"rank": 3})])
@pytest.mark.parametrize("bias", [True, False])
def test_refinement_lowers_response_error(variant, kw, bias):
    conv = _conv(16, 12, 3, seed=7, padding=1, bias=bias)
    x = _smooth_inputs(16, 12, 12)
    fn = {"u": D.to_bsconv_u, "s": D.to_bsconv_s, "dsc": D.to_depthwise_separable}[variant]
    free = fn(conv, **kw)
    ref = fn(conv, inputs=x, **kw)
    y = conv(x)
    e_free = _rel(free.module(x), y)
    e_ref = _rel(ref.module(x), y)
    assert ref.response_error_svd == pytest.approx(e_free, rel=1e-9)
    assert ref.response_error == pytest.approx(e_ref, rel=1e-9)
    assert e_ref < 0.8 * e_free
    assert ref.kernel_error_svd == pytest.approx(free.kernel_error, rel=1e-12)
    # on held-out inputs of the same distribution the refit still wins
    x2 = _smooth_inputs(8, 12, 12, seed=1)
    assert _rel(ref.module(x2), conv(x2)) < _rel(free.module(x2), conv(x2))


def test_refinement_never_worse_and_keeps_exact_fits():
    conv = _rank1_conv(8, 6, padding=1)
    x = _smooth_inputs(4, 6, 10)
    res = D.to_bsconv_u(conv, inputs=x)
    assert res.response_error < 1e-10
    torch.testing.assert_close(res.module(x), conv(x), rtol=1e-9, atol=1e-9)
    for iters in (0, 1, 10):
        for fn in (D.to_bsconv_u, D.to_bsconv_s, D.to_depthwise_separable):
            r = fn(_conv(8, 6, padding=1, seed=iters), inputs=x, iters=iters)
            assert r.response_error <= r.response_error_svd + 1e-12


def test_refit_on_converted_inputs_beats_refit_on_original_inputs():
    """The multi-layer case: the converted layer sees x_a (perturbed by earlier conversions);
    its target is the original layer on x_b."""
    conv = _conv(12, 8, 3, seed=8, padding=1)
    xb = _smooth_inputs(12, 8, 10, seed=2)
    g = torch.Generator().manual_seed(9)
    mix = torch.eye(8, dtype=F64) + 0.3 * torch.randn(8, 8, generator=g, dtype=F64)
    xa = torch.einsum("ij,bjhw->bihw", mix, xb)  # a systematic distortion of the inputs
    y = conv(xb)
    paired = D.to_bsconv_u(conv, inputs=xa, target_inputs=xb)
    naive = D.to_bsconv_u(conv, inputs=xb)
    e_paired = _rel(paired.module(xa), y)
    assert paired.response_error == pytest.approx(e_paired, rel=1e-9)
    assert e_paired < 0.85 * _rel(naive.module(xa), y)


# --------------------------------------------------------------------------- whole models

class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, dtype=F64)
        self.body = nn.Sequential(OrderedDict([
            ("c1", nn.Conv2d(8, 12, 3, padding=1, bias=False, dtype=F64)),
            ("bn", nn.BatchNorm2d(12, dtype=F64)),
            ("act", nn.ReLU()),
            ("c2", nn.Conv2d(12, 12, 5, padding=2, stride=2, dtype=F64)),
            ("grouped", nn.Conv2d(12, 12, 3, padding=1, groups=3, dtype=F64)),
            ("point", nn.Conv2d(12, 16, 1, dtype=F64)),
            ("big", nn.Conv2d(16, 16, 7, padding=3, dtype=F64)),
        ]))
        self.head = nn.Conv2d(16, 10, 3, padding=1, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.body(x)
        return self.head(torch.relu(x)).mean((2, 3))


def test_convert_trained_data_free_selects_layers():
    net = _Net().eval()
    before = copy.deepcopy(net.state_dict())
    out, reps = D.convert_trained(net, "u", exclude=("stem",))
    assert [r.name for r in reps] == ["body.c1", "body.c2", "head"]
    assert isinstance(out.body.c1, BSConvU) and isinstance(out.body.c2, BSConvU)
    assert isinstance(out.head, BSConvU) and isinstance(out.stem, nn.Conv2d)
    assert type(out.body.grouped) is nn.Conv2d and type(out.body.big) is nn.Conv2d
    for k, v in net.state_dict().items():  # the input model is untouched
        torch.testing.assert_close(v, before[k])
    r = reps[1]
    assert r.kernel_size == (5, 5) and r.params_before == 12 * 12 * 25 + 12
    assert r.params_after == 12 * 12 + 12 * 25 + 12
    assert r.response_error is None and r.macs_before is None
    assert out(torch.randn(2, 3, 8, 8, dtype=F64)).shape == (2, 10)
    # repeated conversion finds nothing new (BSConv children are not eligible)
    _, again = D.convert_trained(out, "u", exclude=("stem",))
    assert again == []


def test_convert_trained_variants_and_ranks():
    net = _Net().eval()
    out, reps = D.convert_trained(net, "dsc", kernel_sizes=(3, (7, 7)), rank="match")
    names = [r.name for r in reps]
    assert names == ["stem", "body.c1", "body.big", "head"]
    for r in reps:
        conv = dict(net.named_modules())[r.name]
        assert r.rank == D.matching_rank(conv)
    assert D.matching_rank(nn.Conv2d(32, 32, 3)) == 1
    assert D.matching_rank(nn.Conv2d(32, 64, 3)) == 2
    _, reps = D.convert_trained(net, "dsc", rank=lambda c: 2)
    assert all(r.rank == 2 for r in reps)
    out, reps = D.convert_trained(net, "s", p=0.5, min_mid_channels=2)
    assert isinstance(out.head, BSConvS) and out.head.pw1.out_channels == 8
    assert [r.rank for r in reps] == [2, 4, 6, 8]  # stem, c1, c2 (5x5), head


def test_convert_trained_with_data_matches_direct_measurement():
    net = _Net().eval()
    torch.manual_seed(1)
    data = [(torch.randn(6, 3, 10, 10, dtype=F64), torch.zeros(6)) for _ in range(2)]
    net.train()  # the mode is restored afterwards; conversion runs in eval mode
    out, reps = D.convert_trained(net, "u", data, exclude=("stem",))
    assert out.training and net.training and out.head.training
    assert all(r.response_error is not None and r.macs_after is not None for r in reps)
    assert all(r.response_error <= r.response_error_svd + 1e-12 for r in reps)
    assert reps[-1].response_error < 0.8 * reps[-1].response_error_svd
    r = reps[1]  # body.c2: 12 -> 12, 5x5, stride 2, input 10x10 -> 5x5
    assert r.macs_before == 5 * 5 * 12 * 12 * 25
    assert r.macs_after == 10 * 10 * 12 * 12 + 5 * 5 * 12 * 25
    # the reported cumulative error of the last layer equals the directly measured one
    net.eval()
    out.eval()
    outs = {}
    net.head.register_forward_hook(lambda m, a, o: outs.__setitem__("ref", o))
    out.head.register_forward_hook(lambda m, a, o: outs.__setitem__("new", o))
    xs = torch.cat([x for x, _ in data])
    net(xs)
    out(xs)
    assert reps[-1].response_error == pytest.approx(_rel(outs["new"], outs["ref"]), rel=1e-8)


def test_convert_trained_measure_only_and_inplace():
    net = _Net().eval()
    data = [torch.randn(4, 3, 8, 8, dtype=F64)]
    out, reps = D.convert_trained(net, "dsc", data, refine=False, inplace=True)
    assert out is net and isinstance(net.head, nn.Sequential)
    assert all(r.response_error == r.response_error_svd for r in reps)
    assert all(r.kernel_error == r.kernel_error_svd for r in reps)


def test_convert_trained_shared_module_replaced_everywhere():
    conv = nn.Conv2d(4, 4, 3, padding=1, dtype=F64)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    out, reps = D.convert_trained(net, "u", [torch.randn(2, 4, 6, 6, dtype=F64)])
    assert len(reps) == 1 and out[0] is out[2] and isinstance(out[0], BSConvU)


# ------------------------------------------------------------------------------ analysis

def test_blueprint_variance_matches_sklearn_pca():
    PCA = pytest.importorskip("sklearn.decomposition").PCA

    conv = _conv(6, 10, 3, seed=11)
    net = nn.Sequential(conv)
    res = A.blueprint_variance(net)
    (stage, layers), = res.items()
    share = layers["0"]
    a = conv.weight.detach().reshape(6, 10, 9).numpy()
    expect = [PCA(n_components=1).fit(a[n]).explained_variance_ratio_[0] for n in range(6)]
    np.testing.assert_allclose(share.numpy(), expect, rtol=1e-10)
    cross = A.blueprint_variance(net, axis="filters")[stage]["0"]
    expect = [PCA(n_components=1).fit(a[:, m]).explained_variance_ratio_[0] for m in range(10)]
    np.testing.assert_allclose(cross.numpy(), expect, rtol=1e-10)


def test_blueprint_variance_uncentered_is_rank1_energy():
    net = nn.Sequential(_rank1_conv(5, 4), nn.ReLU(), _conv(7, 5, seed=2))
    res = A.blueprint_variance(net, center=False)
    torch.testing.assert_close(res["0"]["0"], torch.ones(5, dtype=F64))
    # 1 - share = per-filter squared relative error of the BSConv-U decomposition
    conv = net[2]
    mod = D.to_bsconv_u(conv).module
    a = conv.weight.detach().reshape(7, 5, 9)
    err2 = ((a - _u_kernel(mod).detach()) ** 2).sum((1, 2)) / (a ** 2).sum((1, 2))
    torch.testing.assert_close(1 - res["2"]["2"], err2)


def test_blueprint_variance_stages_and_plot(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1),
                        nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=2, padding=1))
    res = A.blueprint_variance(net, example_input=torch.randn(1, 1, 8, 8))
    assert list(res) == ["stage 1 (8x8)", "stage 2 (4x4)"]
    assert list(res["stage 1 (8x8)"]) == ["1"]  # stem (M = 1), 1x1 and grouped convs skipped
    assert res["stage 2 (4x4)"]["3"].shape == (8,)
    assert net[0].training  # modes restored
    summ = A.summarize_variance(res)
    assert summ["stage 2 (4x4)"]["filters"] == 8.0
    assert 0.0 < summ["stage 2 (4x4)"]["mean"] <= 1.0
    res2 = A.blueprint_variance(net, stage_of=lambda n: "all")
    assert list(res2) == ["all"] and list(res2["all"]) == ["1", "3"]
    path = A.plot_blueprint_variance(res, tmp_path / "bv.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------- end to end (digits)

def _digits():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    return x[tr], y[tr], x[te], y[te]


def _small_cnn() -> nn.Sequential:
    """conv(1->16)-pool-conv(16->32)-conv(32->64)-pool-conv(64->64), BN + ReLU after each
    conv, global average pool, linear."""
    layers: list[nn.Module] = []
    chans = (1, 16, 32, 64, 64)
    for i in range(4):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                   nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        if i in (0, 2):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], 10)]
    return nn.Sequential(*layers)


@torch.no_grad()
def _acc(model, x, y) -> float:
    return float((model.eval()(x).argmax(1) == y).double().mean()) * 100


def test_end_to_end_digits():
    """Train a small CNN on digits (about 10 s on one CPU thread), convert its three 3x3 convs
    after the stem with data refinement and compare accuracies (numbers in
    docs/decomposition.md)."""
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(0)
    model = _small_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(8):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = _acc(model, xte, yte)
    data = [(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, 256, 128)]
    results = {}
    for variant in ("u", "dsc"):
        free, rf = D.convert_trained(model, variant, data, exclude=("0",), refine=False)
        ref, rr = D.convert_trained(model, variant, data, exclude=("0",))
        results[variant] = (_acc(free, xte, yte), _acc(ref, xte, yte),
                            [r.response_error_svd for r in rf],
                            [r.response_error for r in rr])
    print(f"\ndigits e2e: original {acc:.2f} %; " + "; ".join(
        f"{v}: SVD {a0:.2f} % -> refined {a1:.2f} %, final-layer response error "
        f"{e0[-1]:.3f} -> {e1[-1]:.3f}" for v, (a0, a1, e0, e1) in results.items()))
    assert acc > 93.0
    for acc_free, acc_ref, e_free, e_ref in results.values():
        assert acc_ref >= acc - 5.0
        assert acc_ref > acc_free
        assert all(a < b for a, b in zip(e_ref, e_free))
