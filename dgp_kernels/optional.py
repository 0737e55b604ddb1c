"""Optional dependencies, imported where they are used, with an error that names the extra.

``import dgp_kernels`` needs only torch. The simulator's built-in data, the attack targets,
plots and progress bars need the ``eval`` extra (scikit-learn, scikit-image, matplotlib,
tqdm); the Flower integration needs the ``flower`` extra. Code that needs one of them calls
:func:`require` at the point of use:

    skimage_data = require("skimage.data", extra="eval", purpose="the bundled photos")

which returns the module or raises ``ImportError: the bundled photos need skimage: pip
install "dgp_kernels[eval]"``.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any, Optional

__all__ = ["install_hint", "progress_bar", "pyplot", "require"]


def install_hint(extra: str) -> str:
    """The command that installs an extra: ``pip install "dgp_kernels[<extra>]"``."""
    return f'pip install "dgp_kernels[{extra}]"'


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` saying that ``purpose`` needs it and which
    extra installs it (the original error is chained)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(f"{purpose} needs {top}: {install_hint(extra)}") from exc


def pyplot(purpose: str = "plots") -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display)."""
    matplotlib = require("matplotlib", extra="eval", purpose=purpose)
    matplotlib.use("Agg", force=True)
    return importlib.import_module("matplotlib.pyplot")


_warned_tqdm = False


def progress_bar(total: int, desc: str, *, unit: str = "it", enabled: bool = True,
                 leave: bool = True) -> Optional[Any]:
    """A tqdm bar of ``total`` steps, or ``None`` when ``enabled`` is false or tqdm is not
    installed (a progress bar is a nicety: the run goes on without it, and one warning names
    the extra). Callers test ``bar is not None`` before ``update``/``set_postfix_str``/
    ``close``."""
    global _warned_tqdm
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _warned_tqdm:
            _warned_tqdm = True
            warnings.warn(f"progress bars need tqdm: {install_hint('eval')}; running without them",
                          RuntimeWarning, stacklevel=2)
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
