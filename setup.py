"""Builds dgp_kernels._C (C++17 + OpenMP CPU kernels) against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against
the torch already in the environment (an isolated build would pull its own torch).
CUDA sources under csrc/cuda/ are compiled only when the installed torch has CUDA.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError:  # pragma: no cover - build needs torch
    sys.exit(
        "dgp_kernels: building the extension needs torch installed first: "
        "`pip install torch==2.13.0` then `pip install --no-build-isolation -e .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    debug = os.environ.get("DGP_DEBUG", "0") == "1"
    cxx = ["-O1" if debug else "-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden",
           "-DPy_LIMITED_API=0x030b0000"]
    if debug:
        cxx += ["-g", "-fno-omit-frame-pointer"]
    if os.environ.get("DGP_ASAN", "0") == "1":
        cxx += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    ldflags = ["-fopenmp"]
    if os.environ.get("DGP_ASAN", "0") == "1":
        ldflags += ["-fsanitize=address"]
    kwargs = dict(
        name="dgp_kernels._C",
        extra_compile_args={"cxx": cxx},
        extra_link_args=ldflags,
        include_dirs=[os.path.join(HERE, "csrc")],
        py_limited_api=True,
    )
    with_cuda = torch.cuda.is_available() or os.environ.get("DGP_FORCE_CUDA", "0") == "1"
    if cuda_sources and with_cuda and torch.version.cuda is not None and CUDA_HOME:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17"]
        return [CUDAExtension(sources=cpu_sources + cuda_sources, **kwargs)]
    if cuda_sources:
        print("dgp_kernels: skipping csrc/cuda (installed torch has no CUDA)", file=sys.stderr)
    return [CppExtension(sources=cpu_sources, **kwargs)]


setup(
    packages=find_packages(include=["dgp_kernels", "dgp_kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
