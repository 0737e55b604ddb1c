"""Which native backends are loaded, decided once at import from what is installed.

The C++ extension ``dgp_kernels._C`` (loaded by :mod:`dgp_kernels.native`) registers the
CPU kernels of every ``dgp::`` op. When it is missing or cannot be loaded the pure-torch
reference serves the CPU key instead, and the loader's single warning says why and how to
fix it. CUDA tensors are served by the Triton kernels when triton imports, else by the
reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import native
from .ops import register_reference


@dataclass(frozen=True)
class BackendInfo:
    """What serves each device: ``"cpp"``, ``"triton"`` or ``"reference"``."""

    cpu: str
    cuda: str
    cpu_simd: str  # the compaction path the C++ kernel picked at run time ("avx512", ...)
    reason: Optional[str]  # why the C++ extension is not used, when it is not


def _load_cpu() -> tuple[str, str, Optional[str]]:
    lib = native.load()  # warns once when the extension is missing or cannot be loaded
    if lib is None:
        register_reference("CPU")
        return "reference", "none", native.reason()
    return "cpp", lib.simd_level(), None


def _load_cuda() -> str:
    try:
        from .kernels.triton import register as _register_triton
    except ImportError:
        register_reference("CUDA")
        return "reference"
    if _register_triton():
        return "triton"
    register_reference("CUDA")
    return "reference"


_cpu, _simd, _reason = _load_cpu()
_cuda = _load_cuda()
INFO = BackendInfo(cpu=_cpu, cuda=_cuda, cpu_simd=_simd, reason=_reason)
