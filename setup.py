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


# The builds of the weight-only linear kernels (csrc/cpu/isa/linear_kernels.cpp): (name, floats per vector, flags).
# Each is compiled from the same file with its own flags, and hmt_runtime._C picks one at run time for the CPU it
# runs on (HMT_ISA=avx512|avx2|scalar overrides that); a build whose flags the compiler rejects is left out.
LINEAR_ISA_BUILDS = (
    ("avx512", 16, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma",
                    "-mf16c"]),
    ("avx2", 8, ["-mavx2", "-mfma", "-mf16c"]),
    ("scalar", 4, []),  # the compiler's default target: always built
)


def compile_linear_isa_builds(compiler: list[str], build_temp: Path) -> tuple[list[str], list[tuple[str, None]]]:
    """Compile each build of the linear kernels to an object file; returns (objects, define_macros for _C)."""
    import subprocess

    source = Path("csrc") / "cpu" / "isa" / "linear_kernels.cpp"
    headers = [source, Path("csrc") / "cpu" / "linear_isa.h"]
    build_temp.mkdir(parents=True, exist_ok=True)
    objects, macros = [], []
    for name, floats, flags in LINEAR_ISA_BUILDS:
        obj = build_temp / f"linear_kernels_{name}.o"
        command = [*compiler, "-std=c++17", "-O3", "-ffp-contract=fast", "-fPIC", "-Wno-psabi",
                   f"-DHMT_LINEAR_NS={name}", f"-DHMT_VEC_FLOATS={floats}", *flags, "-c", str(source), "-o", str(obj)]
        stamp = obj.with_suffix(".cmd")
        fresh = (obj.is_file() and stamp.is_file() and stamp.read_text() == " ".join(command)
                 and all(obj.stat().st_mtime >= h.stat().st_mtime for h in headers))
        if not fresh:
            print(" ".join(command), flush=True)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                if not flags:
                    raise RuntimeError(f"compiling {source} failed:\n{result.stderr}")
                print(f"WARNING: hmt: the compiler cannot build the {name} linear kernels ({' '.join(flags)}); "
                      f"leaving them out:\n{result.stderr.strip()[:2000]}", file=sys.stderr)
                continue
            stamp.write_text(" ".join(command))
        objects.append(str(obj))
        if flags:
            macros.append((f"HMT_LINEAR_{name.upper()}", None))
    return objects, macros


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

        def build_extensions(self):
            compiler = getattr(self.compiler, "compiler_cxx", None) or [os.environ.get("CXX", "c++")]
            for ext in self.extensions:
                objects, macros = compile_linear_isa_builds(list(compiler[:1]), Path(self.build_temp))
                ext.extra_objects = list(ext.extra_objects or []) + objects
                ext.define_macros = list(ext.define_macros or []) + macros
            super().build_extensions()

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
