"""Gradient-matching machinery shared by DLG, iDLG and Inverting Gradients.

An optimisation-based attack makes dummy images (and, for DLG, dummy soft labels), computes
the gradient they would produce on the attacker's copy of the model, and moves the dummies so
that this *dummy gradient* matches the *shared gradient*. This module holds:

* :class:`GradientObjective` — the distance between dummy and shared gradients:
  ``"euclidean"`` (DLG: ``sum_i ||d_i - s_i||^2`` over all coordinates) or ``"cosine"``
  (Inverting Gradients, as breaching's ``CosineSimilarity``:
  ``1 - <d, s> / (||d|| ||s||)`` with the dot product and both norms summed over all layers).
  With a mask only the sent coordinates enter (the adaptive attacker). Optionally a DGP band
  penalty on the unsent coordinates (the DGP-aware attacker; see :meth:`band_penalty`).
* :func:`dummy_gradients` — the differentiable dummy gradient.
* :func:`total_variation` — the anisotropic TV prior of Inverting Gradients (this package's
  form and breaching's exact form).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..checks import check_choice, check_float, check_int  # noqa: F401  (check_choice: re-exported)
from ..optional import progress_bar
from ..ops import band_counts  # DGP's per-layer counts (docs/semantics.md): the attacker knows the rule

__all__ = [
    "GradientObjective",
    "dummy_gradients",
    "total_variation",
    "TV_KINDS",
    "soft_cross_entropy",
    "resolve_masks",
    "resolve_labels",
    "check_choice",
    "check_number",
    "check_count",
    "Progress",
]


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """DLG's loss on dummy soft labels: ``mean_b sum_c -softmax(target)_bc log_softmax(logits)_bc``."""
    return torch.mean(torch.sum(-torch.softmax(target_logits, -1) * torch.log_softmax(logits, -1), -1))


def dummy_gradients(
    model: nn.Module, params: Sequence[Tensor], images: Tensor, target: Tensor, loss_fn: Callable
) -> List[Tensor]:
    """Gradient of ``loss_fn(model(images), target)`` w.r.t. ``params``, differentiable w.r.t.
    ``images`` (and ``target`` when it is a tensor being optimised). Parameters the loss does
    not reach get zeros."""
    loss = loss_fn(model(images), target)
    live = [p for p in params if p.requires_grad]
    grads = iter(torch.autograd.grad(loss, live, create_graph=True, allow_unused=True))
    out = []
    for p in params:
        g = next(grads) if p.requires_grad else None
        out.append(torch.zeros_like(p) if g is None else g)
    return out


TV_KINDS = ("mean", "breaching")


def total_variation(x: Tensor, kind: str = "mean") -> Tensor:
    """Anisotropic total variation of ``x [..., C, H, W]`` (the image prior of Inverting
    Gradients, Geiping et al. 2020), in one of two forms:

    * ``"mean"`` (this package's default): ``mean|dx| + mean|dy|``, each mean over the
      differences that exist inside the image (``H x (W-1)`` horizontal and ``(H-1) x W``
      vertical ones per channel); the border is not penalised.
    * ``"breaching"``: exactly breaching's ``TotalVariation`` regulariser (scale 1, inner and
      outer exponent 1, ``eps = 1e-8``, no colour term): the differences come from a 3x3
      convolution with zero padding, so the last column's horizontal difference is
      ``0 - x[..., W-1]`` and the last row's vertical one ``0 - x[H-1, ...]`` (the border is
      penalised against black), and the result is
      ``mean over every pixel of (|dx| + eps) + (|dy| + eps)``: one mean over
      ``B x C x H x W`` of the per-pixel sum, where ``"mean"`` adds two separate means.

    For a smooth image the two differ mostly by the border term; for ``H = W = 32`` the
    interior part of ``"breaching"`` is about ``31/32`` of ``"mean"``.
    """
    if kind == "mean":
        tv = x.new_zeros(())
        if x.shape[-1] > 1:
            tv = tv + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        if x.shape[-2] > 1:
            tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
        return tv
    if kind == "breaching":
        eps = 1e-8
        pad_w = torch.nn.functional.pad(x, (0, 1))  # zero column on the right
        pad_h = torch.nn.functional.pad(x, (0, 0, 0, 1))  # zero row at the bottom
        dx = pad_w[..., :, 1:] - x
        dy = pad_h[..., 1:, :] - x
        return ((dx.abs() + eps) + (dy.abs() + eps)).mean()
    raise ValueError(f"tv must be one of {list(TV_KINDS)}, got {kind!r}")


class GradientObjective:
    """Distance from a dummy gradient to the shared one.

    Args:
        shared: the shared gradient, one tensor per parameter.
        kind: ``"euclidean"`` or ``"cosine"`` (see the module docstring).
        masks: ``None`` (every coordinate counts) or one bool tensor per parameter, ``True``
            where the coordinate was sent; only those coordinates enter the distance.
        band_weight: weight of :meth:`band_penalty` (0 disables it; needs ``masks``).
        band: DGP ``(top, keep)`` when known; sharpens the penalty (see :meth:`band_penalty`).
    """

    def __init__(
        self,
        shared: Sequence[Tensor],
        kind: str,
        masks: Optional[Sequence[Tensor]] = None,
        *,
        band_weight: float = 0.0,
        band: Optional[Tuple[float, float]] = None,
    ) -> None:
        if kind not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {kind!r}")
        self.kind = kind
        self.band_weight = float(band_weight)
        self.band = band
        self.layers: List[Tuple[int, Optional[Tensor], Tensor]] = []  # (param index, sent idx, sent values)
        self.unsent: List[Tuple[int, Tensor, float, float, int, float]] = []
        for i, s in enumerate(shared):
            flat = s.detach().reshape(-1)
            if masks is None:
                self.layers.append((i, None, flat))
                continue
            idx = torch.nonzero(masks[i].reshape(-1), as_tuple=False).flatten()
            if idx.numel() == 0:
                continue  # nothing of this layer was sent: it carries no information
            vals = flat.index_select(0, idx)
            self.layers.append((i, idx, vals))
            if self.band_weight > 0 and idx.numel() < flat.numel():
                keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
                keep[idx] = False
                un = torch.nonzero(keep, as_tuple=False).flatten()
                mags = vals.abs()
                lo, hi = float(mags.min()), float(mags.max())
                k_top = band_counts(flat.numel(), band[0], band[1])[0] if band is not None else -1
                scale = float(vals.pow(2).sum()) or 1.0
                self.unsent.append((i, un, lo, hi, min(k_top, un.numel()), scale))
        if self.kind == "cosine":
            self._shared_norm = math.sqrt(sum(float(v.pow(2).sum()) for _, _, v in self.layers)) or 1.0

    def distance(self, dummy: Sequence[Tensor]) -> Tensor:
        """The matching term for ``dummy`` (one tensor per parameter): a scalar."""
        dot = None
        dn = None
        sq = None
        for i, idx, vals in self.layers:
            d = dummy[i].reshape(-1)
            if idx is not None:
                d = d.index_select(0, idx)
            if self.kind == "euclidean":
                term = (d - vals).pow(2).sum()
                sq = term if sq is None else sq + term
            else:
                p, n = (d * vals).sum(), d.pow(2).sum()
                dot = p if dot is None else dot + p
                dn = n if dn is None else dn + n
        if self.kind == "euclidean":
            return sq if sq is not None else dummy[0].new_zeros(())
        if dot is None:
            return dummy[0].new_zeros(())
        return 1 - dot / (dn.clamp_min(1e-30).sqrt() * self._shared_norm)

    def band_penalty(self, dummy: Sequence[Tensor]) -> Tensor:
        """DGP-aware term: unsent coordinates must lie *outside* the band the sent ones reveal.

        Per layer, with ``lo``/``hi`` the smallest/largest sent magnitude and ``u`` the dummy's
        magnitudes at the unsent coordinates:

        * band rule known (``k_top`` from ``(top, keep)``): the ``k_top`` largest ``u`` should
          be ``>= hi`` and the rest ``<= lo``:
          ``sum relu(hi - u_top)^2 + sum relu(u_rest - lo)^2``;
        * otherwise each ``u`` is pushed out of ``(lo, hi)`` toward the nearer edge:
          ``sum relu(min(u - lo, hi - u))^2``.

        Each layer's sum is divided by the squared norm of its sent values (scale-free), and
        the layers are summed.
        """
        total = dummy[0].new_zeros(())
        for i, un, lo, hi, k_top, scale in self.unsent:
            u = dummy[i].reshape(-1).index_select(0, un).abs()
            if k_top >= 0:
                u_sorted = torch.sort(u, descending=True).values
                pen = torch.relu(hi - u_sorted[:k_top]).pow(2).sum() + torch.relu(u_sorted[k_top:] - lo).pow(2).sum()
            else:
                pen = torch.relu(torch.minimum(u - lo, hi - u)).pow(2).sum()
            total = total + pen / scale
        return total

    def __call__(self, dummy: Sequence[Tensor]) -> Tensor:
        out = self.distance(dummy)
        if self.band_weight > 0 and self.unsent:
            out = out + self.band_weight * self.band_penalty(dummy)
        return out


# --------------------------------------------------------------------------------------
# Setup helpers shared by the optimisation attacks
# --------------------------------------------------------------------------------------
def check_count(value: object, name: str, min_value: int = 1) -> int:
    """An int ``>= min_value`` (``TypeError``/``ValueError`` naming ``name``)."""
    return check_int(value, name, min_value=min_value)


def check_number(value: object, name: str, *, positive: bool = False) -> float:
    """A finite float ``>= 0`` (``> 0`` when ``positive``), naming ``name`` on error."""
    return check_float(value, name, min_value=0.0, min_inclusive=not positive)


def resolve_masks(shared: Sequence[Tensor], sent_mask: Optional[Sequence[Tensor]], adaptive: bool) -> Optional[List[Tensor]]:
    """Masks for the objective: ``None`` for a plain attacker (it matches every coordinate,
    zeros included); for an adaptive one ``sent_mask`` when known, else the non-zero
    coordinates of the shared gradient (what a sparse payload reveals)."""
    if not adaptive:
        return None
    if sent_mask is not None:
        return [m.to(s.device) for m, s in zip(sent_mask, shared)]
    return [s != 0 for s in shared]


def resolve_labels(shared: List[Tensor], threat, policy: str) -> Tuple[Optional[Tensor], str]:
    """Labels for an attack: ``(labels or None, label_source)``.

    ``policy``: ``"auto"`` known labels when the threat model has them, else the next rule
    the attack supports; ``"infer"`` the iDLG rule; ``"optimise"`` none (optimised jointly)."""
    from .base import infer_labels_idlg

    device = shared[0].device
    if policy == "auto" and threat.labels is not None:
        return threat.labels.to(device), "known"
    if policy == "infer":
        return infer_labels_idlg(shared, threat).to(device), "inferred"
    return None, "optimised"


class Progress:
    """Optional progress bar (tqdm when installed, else nothing)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = progress_bar(total, desc, enabled=enabled, leave=False)

    def update(self, loss: Optional[float] = None) -> None:
        """One step done; ``loss`` (when given) is shown beside the bar."""
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
