"""Builds bsconv_fused._C: the CPU kernels always; the CUDA kernels when CUDA is available or
FORCE_CUDA=1 (no GPU is needed to compile them; see shared/design/environment.md)."""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_cuda() -> bool:
    """FORCE_CUDA=1 / 0 decides; otherwise build the CUDA kernels whenever nvcc is there (a GPU is
    not needed to compile them)."""
    force = os.environ.get("FORCE_CUDA", "")
    if force in ("0", "1"):
        return force == "1"
    home = cpp_extension.CUDA_HOME
    return torch.version.cuda is not None and home is not None and os.path.exists(
        os.path.join(home, "bin", "nvcc"))


def _cuda_wheel_includes():
    """torch's CUDA headers include cuBLAS/cuSPARSE headers that ship in the nvidia-* wheels, not
    in a runtime-only toolkit."""
    found = []
    for base in {os.path.dirname(os.path.dirname(torch.__file__))}:
        found += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(found))


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    includes = [os.path.join(ROOT, "csrc")]
    if not _build_cuda():
        return CppExtension("bsconv_fused._C", sources, include_dirs=includes,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-Wall"]
    return CUDAExtension(
        "bsconv_fused._C",
        sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        include_dirs=includes + _cuda_wheel_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


def _host_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f.read().replace("\n", " ")
    except OSError:
        return False


def _emulator_extension():
    """The CUDA kernels built by the host compiler under the CUDA emulator (tests only)."""
    # nvcc contracts a * b + c into fused multiply-adds by default; doing the same here keeps the
    # emulated numerics close to the GPU's (the extension is built and run on the same machine).
    fma = ["-mfma", "-ffp-contract=fast"] if _host_has_fma() else []
    return CppExtension(
        "bsconv_fused._emu",
        sorted(glob.glob(os.path.join("csrc", "emu_ext", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc")],
        # The same half / bfloat16 restrictions torch's nvcc flags impose, so that code relying on
        # implicit conversions fails here as it would on the GPU build.
        define_macros=[(m, None) for m in (
            "__CUDA_NO_HALF_OPERATORS__", "__CUDA_NO_HALF_CONVERSIONS__",
            "__CUDA_NO_BFLOAT16_OPERATORS__", "__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "__CUDA_NO_HALF2_OPERATORS__")],
        extra_compile_args={"cxx": ["-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas"] + fma},
        extra_link_args=["-pthread"],
    )


setup(
    name="bsconv-fused",
    version="0.1.0",
    description="Fused Blueprint Separable Convolutions (BSConv-U/S) for PyTorch",
    packages=find_packages(include=["bsconv_fused", "bsconv_fused.*"]),
    ext_modules=[_extension(), _emulator_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
)
