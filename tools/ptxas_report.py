"""Static quality report of the CUDA kernels: registers, spills, stack and shared memory per
kernel and architecture, from `nvcc -Xptxas -v` (no GPU needed). Exits non-zero on any spill or
local-memory stack use, which would mean slow local-memory traffic on the GPU.

    python tools/ptxas_report.py [--arch 80 --arch 90] [--out report.md]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FUNC_RE = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'")
STACK_RE = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
                      r"(?P<ld>\d+) bytes spill loads")
USED_RE = re.compile(r"Used (?P<regs>\d+) registers(?:, used \d+ barriers)?(?:, (?P<smem>\d+) "
                     r"bytes smem)?")


def demangle(names: List[str]) -> Dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def compile_one(source: str, archs: List[str], nvcc: str, includes: List[str]) -> str:
    cmd = [nvcc, "-c", source, "-o", os.devnull, "-std=c++20", "-O3", "-Xptxas", "-v",
           "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__"]
    for a in archs:
        cmd += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    for inc in includes:
        cmd += ["-I", inc]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"nvcc failed on {source}")
    return res.stderr + res.stdout


def parse(log: str) -> List[dict]:
    rows: List[dict] = []
    current = None
    for line in log.splitlines():
        m = FUNC_RE.search(line)
        if m:
            current = {"name": m["name"], "arch": m["arch"], "regs": None, "stack": 0,
                       "spill_st": 0, "spill_ld": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = STACK_RE.search(line)
        if m:
            current.update(stack=int(m["stack"]), spill_st=int(m["st"]), spill_ld=int(m["ld"]))
        m = USED_RE.search(line)
        if m:
            current["regs"] = int(m["regs"])
            current["smem"] = int(m["smem"] or 0)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", default=None, help="e.g. 80 (repeatable)")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    archs = args.arch or ["80", "90"]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    import torch  # noqa: PLC0415  (only for its include paths)

    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    includes = [os.path.join(ROOT, "csrc"), torch_inc,
                os.path.join(torch_inc, "torch", "csrc", "api", "include"),
                sysconfig.get_paths()["include"]] + glob.glob(
                    os.path.join(site, "nvidia", "cu*", "include"))
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "instantiate_*.cu")))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        logs = list(pool.map(lambda s: compile_one(s, archs, nvcc, includes), sources))
    rows = [r for log in logs for r in parse(log)]
    names = demangle(sorted({r["name"] for r in rows}))
    lines = ["| kernel | arch | registers | stack bytes | spill stores | spill loads | "
             "static smem |",
             "|---|---|---|---|---|---|---|"]
    bad = []
    for r in sorted(rows, key=lambda r: (names[r["name"]], r["arch"])):
        pretty = re.sub(r"bsconv::cuda::", "", names[r["name"]])
        pretty = re.sub(r"\(bsconv::cuda::\w+Params<[^>]*>\)", "", pretty)
        lines.append(f"| `{pretty}` | {r['arch']} | {r['regs']} | {r['stack']} | "
                     f"{r['spill_st']} | {r['spill_ld']} | {r['smem']} |")
        if r["stack"] or r["spill_st"] or r["spill_ld"]:
            bad.append(pretty + " " + r["arch"])
    table = "\n".join(lines)
    print(table)
    print(f"\n{len(rows)} kernel images; {len(bad)} with spills or stack use")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if not rows:
        print("no kernels found in the ptxas output", file=sys.stderr)
        return 1
    for b in bad:
        print(f"SPILL/STACK: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
