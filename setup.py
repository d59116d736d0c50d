"""Install hmt: the Python packages and, when a compiler is available, the native ops extension hmt_runtime._C.

    pip install -e . --no-build-isolation

(no build isolation: an isolated build would download a CUDA torch to compile against).  The extension holds the
C++ CPU kernels (csrc/cpu) and, when torch has CUDA and a CUDA toolkit is found, the CUDA kernels (csrc/cuda).
If it cannot be built, the pure-Python package is installed anyway with one warning, and HMT runs the torch ops.
Set HMT_BUILD_NATIVE=0 to skip the extension, HMT_BUILD_CUDA=0 to build it without the CUDA kernels.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
BUILD_ONLY = {"pytest", "pytest-benchmark", "ninja", "pybind11"}  # test and build tools, not runtime needs


def requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [line.split("#")[0].strip() for line in lines]
    return [r for r in reqs if r and r.split("=")[0].split("<")[0].split(">")[0].strip() not in BUILD_ONLY]


def warn(message: str) -> None:
    print(f"WARNING: hmt: {message}; installing the pure-Python package (HMT will use the torch ops)",
          file=sys.stderr)


def native_extension():
    """(ext_modules, cmdclass) for hmt_runtime._C, or ([], {}) when it cannot be built here."""
    if os.environ.get("HMT_BUILD_NATIVE", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as err:  # torch missing in the build environment (e.g. an isolated build)
        warn(f"cannot build the native extension without torch in the build environment ({err})")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension (ninja) that turns a failed compile into one warning instead of a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as err:
                warn(f"building the native extension hmt_runtime._C failed ({type(err).__name__}: {err})")
                self.extensions = []  # nothing built: report no outputs, so wheel and editable installs go on

    csrc = Path("csrc")
    sources = [str(csrc / "ops.cpp")] + sorted(str(p) for p in (csrc / "cpu").glob("*.cpp"))
    cxx = ["-O3", "-ffp-contract=fast", "-Wno-psabi"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for runs on torch's OpenMP pool
        link.append("-fopenmp")
    with_cuda = (
        os.environ.get("HMT_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None and CUDA_HOME is not None
    )
    if with_cuda:
        sources += sorted(str(p) for p in (csrc / "cuda").glob("*.cu")) + sorted(str(p) for p in (csrc / "cuda").glob("*.cpp"))
        ext = CUDAExtension(
            "hmt_runtime._C",
            sources,
            define_macros=[("HMT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("hmt_runtime._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()

setup(
    name="hmt",
    version="0.1.0",
    description="Hierarchical Memory Transformer (HMT) runtime: unbounded context with bounded memory",
    packages=find_packages(include=["hmt_runtime", "hmt_runtime.*", "hmt_kernels", "hmt_kernels.*"]),
    package_data={"hmt_runtime": ["weights/default/*.json", "weights/default/*.safetensors",
                                  "weights/default/adapter/*"]},
    python_requires=">=3.10",
    install_requires=requirements(),
    entry_points={"console_scripts": ["hmt = hmt_runtime.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
