"""Drop-in integrations of DGP with training frameworks (see README.md in this folder).

* :mod:`dgp_kernels.integrations.ddp` — a ``torch.distributed`` DDP communication hook
  (:func:`~dgp_kernels.integrations.ddp.dgp_hook` with
  :class:`~dgp_kernels.integrations.ddp.DGPHookState`); needs only torch.
* :mod:`dgp_kernels.integrations.flower` — a Flower client mod and server strategy; needs
  ``pip install "dgp_kernels[flower]"`` and is imported only on use.
* :mod:`dgp_kernels.integrations.breaching` — apply any compressor to a breaching-style
  ``shared_data`` dict; needs only torch.

Nothing is imported here eagerly, so ``import dgp_kernels.integrations`` never needs flwr.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ddp", "flower", "breaching"]


def __getattr__(name: str) -> Any:  # PEP 562: submodules on first access
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
