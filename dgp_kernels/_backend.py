"""Which native backends are loaded, decided once at import from what is installed.

The C++ extension ``dgp_kernels._C`` registers the CPU kernels of every ``dgp::`` op when
imported. When it is missing (a source checkout that was never built) the pure-torch
reference serves the CPU key instead and a single warning says so. CUDA tensors are served
by the Triton kernels when triton imports, else by the reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from .ops import register_reference


@dataclass(frozen=True)
class BackendInfo:
    """What serves each device: ``"cpp"``, ``"triton"`` or ``"reference"``."""

    cpu: str
    cuda: str
    cpu_simd: str  # the compaction path the C++ kernel picked at run time ("avx512", ...)
    reason: Optional[str]  # why the C++ extension is not used, when it is not


def _load_cpu() -> tuple[str, str, Optional[str]]:
    try:
        from . import _C  # noqa: F401  (importing registers the CPU kernels)
    except ImportError as exc:  # never built, or built against another torch
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "dgp_kernels: the C++ extension dgp_kernels._C is not available "
            f"({reason}); CPU tensors use the slow pure-torch reference. Build it with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        register_reference("CPU")
        return "reference", "none", reason
    return "cpp", _C.simd_level(), None


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
