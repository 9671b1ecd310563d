"""The latency benchmark's plumbing: it runs, writes its reports and flags wrong results.

Runs ``bsconv_fused.bench.main`` in ``--quick`` mode on two tiny layers with torch.compile off,
so the whole file takes seconds. No assertion is made about the timings themselves.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bsconv_fused import bench, functional

TINY = ("cifar-u3.c64", "cifar-s3.c32")  # 64->64 at 8x8 and 32->6->32 at 16x16
FAST = ["--quick", "--no-compile", "--no-progress", "--batch", "1", "--repeats", "2",
        "--min-repeats", "2", "--warmup", "1"]


def run_bench(out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    md = out / "RESULTS.md"
    code = bench.main([*FAST, "--out", str(out), "--markdown", str(md), *extra])
    return code, json.loads((out / "results.json").read_text())


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    code, doc = run_bench(out, "--shapes", ",".join(n + "$" for n in TINY),
                          "--mode", "both")
    return code, out, doc


def test_writes_all_reports(both_modes: tuple[int, Path, dict[str, Any]]) -> None:
    code, out, _ = both_modes
    assert code == 0
    for name in ("results.csv", "results.json", "results.md", "speedup.png", "RESULTS.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "RESULTS.md").read_text()
    assert "## Forward" in md and "## Forward + backward" in md and "CPU:" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["variant"] for r in rows} >= {"fused", "ref_nchw", "ref_cl", "dense"}
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}


def test_json_fields_are_sane(both_modes: tuple[int, Path, dict[str, Any]]) -> None:
    _, _, doc = both_modes
    assert {"machine", "config", "peaks", "summary", "results"} <= doc.keys()
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["torch"] == torch.__version__
    assert positive(doc["peaks"]["flops"]) and positive(doc["peaks"]["bytes_per_s"])
    assert doc["summary"]["failures"] == []
    for key in ("fwd", "fwdbwd"):
        g = doc["summary"][key]
        # the faster fused layout can only raise the fused side's speed
        assert g["geomean_speedup_best_layouts"] >= g["geomean_speedup_vs_best_eager"] > 0
    results = doc["results"]
    assert {(r["layer"], r["mode"]) for r in results} == {
        (name, mode) for name in TINY for mode in ("fwd", "fwdbwd")}
    for r in results:
        assert r["ok"] is True
        for key in ("flops", "bytes", "roofline_ms", "gflops", "gbps", "roofline_fraction",
                    "speedup_vs_best_eager", "speedup_vs_nchw"):
            assert positive(r[key]), (r["layer"], key, r[key])
        assert "ref_compile" not in r["variants"]
        for name, v in r["variants"].items():
            assert v["status"] == "ok", (name, v["status"])
            for key in ("median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms"):
                assert positive(v[key]), (name, key, v[key])
            assert v["min_ms"] <= v["median_ms"] <= v["max_ms"]
            assert 0 <= v["err_rel"] < 1e-4
            if r["mode"] == "fwdbwd":
                assert 0 <= v["grad_err_rel"] < 1e-4
        assert r["variants"]["fused"]["backend"].startswith("bsconv_fused::")
    s = results[0]
    assert s["M_mid"] == 0 and s["Ho"] == 8 and s["K"] == 3
    sub = next(r for r in results if r["kind"] == "S")
    assert sub["M_mid"] == 6  # max(4, ceil(32 / 6))


def test_flags_a_wrong_fused_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    real = functional.bsconv_u

    def perturbed(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(functional, "bsconv_u", perturbed)
    code, doc = run_bench(tmp_path, "--shapes", "cifar-u3.c64", "--mode", "fwd",
                          "--no-backends")
    assert code == 1
    (row,) = doc["results"]
    assert row["ok"] is False
    assert row["variants"]["fused"]["status"] == "FAIL"
    assert row["variants"]["fused"]["err_rel"] > 1e-3
    assert row["variants"]["ref_nchw"]["status"] == "ok"
    assert doc["summary"]["failures"] == ["cifar-u3.c64 B=1 fwd"]
    assert "CORRECTNESS FAILURES" in capsys.readouterr().out


def test_a_failing_baseline_is_reported_not_fatal(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench.forward_fn

    def broken_dense(variant: bench.Variant, layer: bench.Layer) -> bench.ForwardFn:
        def fail(x: torch.Tensor, params: Any) -> torch.Tensor:
            raise RuntimeError("no kernel for this shape")

        return fail if variant.kind == "dense" else real(variant, layer)

    monkeypatch.setattr(bench, "forward_fn", broken_dense)
    code, doc = run_bench(tmp_path, "--shapes", "cifar-u3.c64", "--mode", "fwd",
                          "--no-backends")
    assert code == 0
    dense = doc["results"][0]["variants"]["dense"]
    assert dense["status"].startswith("n/a: RuntimeError: no kernel")
    assert "median_ms" not in dense


@pytest.mark.parametrize("argv, named", [
    (["--device", "mps"], "--device"), (["--device", "cuda:x"], "--device"),
    (["--device", "meta"], "--device"), (["--batch", "0"], "--batch"),
    (["--batch", "2,x"], "--batch"), (["--repeats", "0"], "--repeats"),
    (["--threads", "-1"], "--threads"), (["--dtype", "int8"], "--dtype"),
    (["--mode", "bwd"], "--mode")])
def test_bad_arguments_name_themselves(argv: list[str], named: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--list", *argv])
    assert exc.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err


def test_unknown_shape_pattern_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--shapes", "no-such-layer"]) == 2
    assert "no layer matches" in capsys.readouterr().err
    assert bench.main(["--shapes", "b0[1"]) == 2
    assert "bad --shapes pattern" in capsys.readouterr().err


def test_layer_shapes_and_suites() -> None:
    full = {lay.name: lay for lay in bench.full_suite()}
    assert len(full) == 2 * 2 * (len(bench.MOBILENET_V1) + len(bench.CIFAR_RESNET20))
    b02 = full["mnv1-u3.b02"]
    assert (b02.m, b02.n, b02.h, b02.stride, b02.out_hw) == (64, 128, 112, 2, (56, 56))
    assert full["mnv1-s5.b13"].mid == 171 and full["cifar-s3.c16"].mid == 4
    assert sum(b[5] for b in bench.MOBILENET_V1) == 13  # the 13 separable blocks
    assert all(n in full for n in bench.DEFAULT_SUITE + bench.QUICK_SUITE)
    assert b02.forward_flops(1) == 2 * (112 * 112 * 64 * 128 + 56 * 56 * 128 * 9)
    assert [lay.name for lay in bench.select_layers("default", "b13")] == [
        "mnv1-u3.b13", "mnv1-u5.b13", "mnv1-s3.b13", "mnv1-s5.b13"]


def test_round_robin_timing_counts() -> None:
    calls: list[str] = []
    steps = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    timings = bench.time_round_robin(steps, lambda: None, warmup=1, repeats=6, min_repeats=2,
                                     budget=0)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    # Within the rounds every variant directly follows every other one equally often.
    pairs = [(r[i], r[i + 1]) for r in rounds for i in range(2)]
    assert {p: pairs.count(p) for p in pairs} == {
        (a, b): 2 for a in "abc" for b in "abc" if a != b}
    assert all(t.repeats == 6 and t.min_ms <= t.median_ms <= t.max_ms for t in timings.values())


def test_round_robin_times_with_gc_off() -> None:
    import gc
    seen: list[bool] = []
    steps = {"a": lambda: seen.append(gc.isenabled())}

    def failing() -> None:
        raise RuntimeError("step failed")

    assert gc.isenabled()
    bench.time_round_robin(steps, lambda: None, warmup=1, repeats=3, min_repeats=1, budget=0)
    assert seen == [False] * 4 and gc.isenabled()
    with pytest.raises(RuntimeError, match="step failed"):
        bench.time_round_robin({"f": failing}, lambda: None, warmup=1, repeats=1,
                               min_repeats=1, budget=0)
    assert gc.isenabled()  # restored when a step raises too


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_balanced_orders(n: int) -> None:
    orders = bench.balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    pairs = [(o[i], o[i + 1]) for o in orders for i in range(n - 1)]
    counts = {p: pairs.count(p) for p in pairs}
    assert len(counts) == n * (n - 1) and len(set(counts.values())) <= 1


def test_cuda_variants_without_running_them() -> None:
    names = [v.name for v in bench.variants_for(torch.device("cuda"), torch.float32, True)]
    assert names.count("ref_compile") == 1 and "ref_compile+tf32" not in names
    for base in ("fused", "ref_nchw", "ref_cl", "dense", "ref_cudnn"):
        assert base in names and base + "+tf32" in names
    half = bench.variants_for(torch.device("cuda"), torch.float16, False)
    assert not any("tf32" in v.name or v.kind == "compiled" for v in half)
    assert [v.name for v in bench.variants_for(torch.device("cpu"), torch.float32, False)] == [
        "fused", "fused_cl", "ref_nchw", "ref_cl", "dense"]


def test_report_names_the_allocator(both_modes: tuple[int, Path, dict[str, Any]]) -> None:
    _, out, doc = both_modes
    allocator = doc["machine"]["allocator"]
    assert allocator.startswith(("glibc malloc, mmap threshold 32 MiB", "as is ("))
    assert f"- Allocator: {allocator}\n" in (out / "RESULTS.md").read_text()


def test_steady_allocator_calls_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    monkeypatch.setattr(bench, "c_library", lambda: SimpleNamespace(mallopt=mallopt))
    text = bench.steady_allocator()
    assert calls == [(bench.M_MMAP_THRESHOLD, 32 << 20), (bench.M_TRIM_THRESHOLD, 64 << 20)]
    assert "32 MiB" in text and "64 MiB" in text
    monkeypatch.setattr(bench, "c_library", lambda: SimpleNamespace())  # no mallopt
    assert bench.steady_allocator().startswith("as is")


# mallinfo2().hblks: the blocks glibc's malloc currently serves by mmap.
_MALLINFO_PROBE = r"""
import ctypes, sys
from bsconv_fused import bench
libc = bench.c_library()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def mapped(nbytes):
    p = libc.malloc(nbytes)
    n = libc.mallinfo2().hblks
    libc.free(p)
    return n - libc.mallinfo2().hblks
if sys.argv[1] == "pin":
    print(bench.steady_allocator())
print(mapped(1 << 20), mapped(24 << 20), mapped(40 << 20))
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(bench.c_library(), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(),
                    reason="glibc's malloc (2.33 or newer, for mallinfo2)")
def test_steady_allocator_keeps_blocks_below_32_mib_off_mmap() -> None:
    def probe(mode: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _MALLINFO_PROBE, mode], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])
        return out.stdout.split()

    # A process that has freed no block that large maps a 24 MiB block (importing torch
    # raises the threshold past 1 MiB already)...
    assert probe("as-is")[1:] == ["1", "1"]
    # ... the pinned one serves it from the heap, as a process that freed a 32 MiB block does.
    assert probe("pin")[-3:] == ["0", "0", "1"]
