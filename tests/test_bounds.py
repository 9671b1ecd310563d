"""benchmarks/bounds.py: the GEMM plan of the fused design and the --measure plumbing.

The plan is what the bounds rest on, so its GEMM count and FLOPs are checked against the
layer's projection FLOPs; the measurement itself is only run on one tiny layer (no assertion on
timings).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from bsconv_fused import bench

ROOT = Path(__file__).resolve().parent.parent


def _load_bounds():
    spec = importlib.util.spec_from_file_location("bounds", ROOT / "benchmarks" / "bounds.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bounds"] = module
    spec.loader.exec_module(module)
    return module


bounds = _load_bounds()


@pytest.mark.parametrize("name", ["mnv1-u3.b02", "mnv1-s3.b07-11", "cifar-s5.c32"])
@pytest.mark.parametrize("mode, factor, per_projection", [("fwd", 1, 1), ("fwdbwd", 4, 4)])
def test_plan_runs_the_design_gemms(name: str, mode: str, factor: int,
                                    per_projection: int) -> None:
    layer = bench.select_layers("full", name + "$")[0]
    batch = 3
    plan = bounds.gemm_plan(layer.pw_shapes, batch * layer.h * layer.w, mode)
    assert len(plan) == per_projection * len(layer.pw_shapes)
    flops = sum(2.0 * r * k * c for _, r, k, c in plan)
    record = {"M": layer.m, "M_mid": layer.mid, "N": layer.n, "batch": batch, "H": layer.h,
              "W": layer.w}
    assert flops == pytest.approx(factor * bounds.projection_flops(record))
    roles = [role for role, *_ in plan]
    assert roles.count("wgrad") == roles.count("igrad") == (mode != "fwd") * len(layer.pw_shapes)
    if mode == "fwdbwd":
        # The input gradient of the first projection is gx: [pixels, M].
        role, rows, inner, cols = plan[-1]
        assert (role, rows, cols) == ("igrad", batch * layer.h * layer.w, layer.m)


@pytest.mark.parametrize("image", [None, (2, 4, 5)])
def test_gemm_candidates_compute_the_same_product(image) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    (mm_name, mm), (conv_name, conv) = bounds._gemm_candidates("proj", 40, 16, 24, gen, image)
    assert (mm_name, conv_name) == ("mm", "conv1x1")
    product = mm()
    assert product.shape == (40, 24)
    out = conv()  # [b, cols, h, w] channels-last: pixels-major it is the product
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(40, 24), product, rtol=1e-5,
                               atol=1e-5)
    (mm_name, mm), (conv_name, conv) = bounds._gemm_candidates("wgrad", 24, 40, 16, gen, image)
    assert (mm_name, conv_name) == ("mm", "conv1x1_wgrad")
    torch.testing.assert_close(conv()[:, :, 0, 0], mm(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not hold 40 pixels"):
        bounds._gemm_candidates("proj", 40, 16, 24, gen, (1, 4, 5))
    step, picked = bounds.gemm_step([("proj", 40, 16, 24), ("wgrad", 24, 40, 16)], probe_reps=1,
                                    image=image)
    assert picked[0] in ("mm", "conv1x1") and picked[1] in ("mm", "conv1x1_wgrad")
    step()


def test_measure_one_tiny_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "bounds.md"
    code = bounds.main(["--measure", "--shapes", "cifar-u3.c64$", "--batch", "1",
                        "--repeats", "2", "--budget", "0.1", "--markdown", str(md)])
    assert code == 0
    text = md.read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| cifar-u3.c64 |")]
    assert [r.split(" | ")[2] for r in rows] == ["fwd", "fwdbwd"]
    assert "cases whose bound is below 0.9x" in text
    assert "- fwdbwd with the autograd round trip of a 4-leaf eager op" in text


def test_floor_bound_adds_the_call_floor() -> None:
    rows = [{"mode": "fwdbwd", "best_eager_ms": 2.0, "gemms_ms": 0.5},
            {"mode": "fwdbwd", "best_eager_ms": 0.3, "gemms_ms": 0.05},
            {"mode": "fwd", "best_eager_ms": 9.0, "gemms_ms": 1.0}]
    # (2 / 0.55 * 0.3 / 0.1) ** 0.5: the forward row does not count.
    assert bounds.floor_bound(rows, 0.05) == pytest.approx((2 / 0.55 * 3.0) ** 0.5)
    assert bounds.floor_bound(rows, 0.0) == pytest.approx((4.0 * 6.0) ** 0.5)
    floor = bounds.call_floor_ms(rounds=3, calls=20)
    assert 0.0 < floor < 50.0  # milliseconds: a round trip, not a hang


@pytest.mark.parametrize("argv", [[], ["x.json", "--measure"], ["--measure", "--batch", "0"],
                                  ["--measure", "--threads", "0"],
                                  ["--measure", "--shapes", "no-such-layer"],
                                  ["--measure", "--shapes", "b0[1"]])
def test_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bounds.main(argv)
    assert exc.value.code == 2
