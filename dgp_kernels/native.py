"""The one loader of the compiled extension ``dgp_kernels._C``.

``_C`` holds the C++ CPU kernels of the select ops (:mod:`dgp_kernels.ops`) and of the wire
codec (:mod:`dgp_kernels.codec`); importing it registers them with torch's dispatcher. Both
layers ask this module for it (:func:`load`), so the library is loaded once and a missing or
broken build is reported once, with what happened and how to fix it:

* not built (a source checkout never compiled, or a pure-Python install);
* built for another torch minor than the running one (``_C_build.json``, written next to
  the library by setup.py, records the torch it was compiled against; the C++ ABI of torch
  changes between minors, so such a library is not loaded at all);
* present but failing to load (the loader's own error is quoted).

In each case the pure-torch reference serves the CPU key of the select ops and the Python
codec serves the wire ops: results are the same, only slower.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import warnings
from types import ModuleType
from typing import Optional

import torch

__all__ = ["BUILD_FIX", "load", "reason"]

#: What to run to build the extension against the installed torch.
BUILD_FIX = (
    "build it against the installed torch: `pip install --no-build-isolation .` from a "
    "source checkout (or `python setup.py build_ext --inplace` for a checkout on PYTHONPATH)"
)

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_loaded = False
_module: Optional[ModuleType] = None
_reason: Optional[str] = None


def _minor(version: str) -> Optional[str]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _built_for() -> Optional[str]:
    """The torch version ``_C`` was compiled against, from ``_C_build.json`` (None if absent)."""
    try:
        with open(os.path.join(_PKG_DIR, "_C_build.json")) as f:
            return str(json.load(f)["torch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _try_load() -> tuple[Optional[ModuleType], Optional[str]]:
    if importlib.util.find_spec("dgp_kernels._C") is None:
        return None, (
            f"the C++ extension dgp_kernels._C is not built (no compiled library in {_PKG_DIR})"
        )
    built = _built_for()
    if built is not None and _minor(built) != _minor(torch.__version__):
        return None, (
            f"the C++ extension dgp_kernels._C was built for torch {built} but this is torch "
            f"{torch.__version__} (the C++ ABI changes between torch minor releases), so it is "
            "not loaded"
        )
    try:
        return importlib.import_module("dgp_kernels._C"), None
    except (ImportError, OSError) as exc:
        hint = "" if built else " (was it built against another torch?)"
        return None, (
            f"the C++ extension dgp_kernels._C failed to load{hint}: {type(exc).__name__}: {exc}"
        )


def load() -> Optional[ModuleType]:
    """``dgp_kernels._C`` (its kernels registered), or None with one ``RuntimeWarning`` saying
    why and how to fix it. Loads once per process; later calls return the same answer."""
    global _loaded, _module, _reason
    if not _loaded:
        _module, _reason = _try_load()
        _loaded = True
        if _module is None:
            warnings.warn(
                f"dgp_kernels: {_reason}. CPU tensors use the slow pure-torch reference and "
                f"the wire codec its Python implementation (same results). To fix, {BUILD_FIX}.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _module


def reason() -> Optional[str]:
    """Why ``_C`` is not used (None when it is loaded); loads it first if needed."""
    load()
    return _reason
