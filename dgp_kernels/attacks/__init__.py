"""Gradient inversion attacks against shared gradients, and the metrics to score them.

Public API (see ``base.py`` for the conventions every attack follows):

* :class:`ThreatModel`, :class:`Reconstruction`, :class:`Attack`, :func:`get_attack`,
  :func:`available_attacks`, :func:`register_attack`, :func:`infer_labels_idlg`,
  :func:`compute_gradients`.
* :mod:`.metrics`: ``mse``, ``psnr``, ``ssim``, ``floor_psnr``, ``label_accuracy``,
  ``match_order``, ``lpips_distance``.

Only torch is needed to import this package.
"""

from . import metrics
from .base import (
    Attack,
    Reconstruction,
    ThreatModel,
    available_attacks,
    check_shared_grads,
    compute_gradients,
    get_attack,
    infer_labels_idlg,
    register_attack,
)

__all__ = [
    "Attack",
    "Reconstruction",
    "ThreatModel",
    "available_attacks",
    "check_shared_grads",
    "compute_gradients",
    "get_attack",
    "infer_labels_idlg",
    "metrics",
    "register_attack",
]

# Attack modules register themselves on import.
from . import dlg, inverting, rtf  # noqa: E402,F401
