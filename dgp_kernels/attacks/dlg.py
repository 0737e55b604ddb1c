"""Deep Leakage from Gradients (DLG, Zhu et al. 2019) and iDLG (Zhao et al. 2020).

DLG: dummy images (random normal) and, when labels are unknown, dummy label logits (random
normal, turned into soft labels by a softmax) are optimised jointly with L-BFGS (lr 1) to
minimise the euclidean distance ``sum_i ||grad_i(dummy) - shared_i||^2`` over all layers.
Pixels are not boxed during the optimisation (as in DLG); the result is clipped to [0, 1].
Jointly optimised labels use DLG's soft cross-entropy (:func:`~.matching.soft_cross_entropy`),
so they assume the client's loss is cross-entropy; known or inferred labels use
``threat.loss_fn``. torch's L-BFGS without a line search (DLG's setting) can diverge from
an unlucky start; the last finite state is kept, and ``line_search="strong_wolfe"`` or
``restarts`` make the attack more robust (the tests use the line search).

iDLG: the label is first read off the last layer's weight gradient
(:func:`~dgp_kernels.attacks.base.infer_labels_idlg`), then DLG runs with that fixed label.

``dlg-adaptive``: the distance only counts the coordinates that were actually sent
(``threat.sent_mask``, else the non-zero ones), so pruned zeros do not mislead it.

One L-BFGS *iteration* is one ``optimizer.step(closure)`` of up to ``max_iter`` function
evaluations (torch's default 20, as in DLG's code, which ran 300 of them).
"""

from __future__ import annotations

import time
from typing import List, Optional

import torch
from torch import Tensor

from .base import Attack, Reconstruction, ThreatModel, check_shared_grads, register_attack
from .matching import (
    GradientObjective,
    Progress,
    check_choice,
    check_count,
    check_number,
    dummy_gradients,
    resolve_labels,
    resolve_masks,
    soft_cross_entropy,
)

__all__ = ["DLG", "IDLG", "AdaptiveDLG"]


@register_attack("dlg")
class DLG(Attack):
    """DLG with L-BFGS and euclidean gradient matching.

    Args:
        iterations: L-BFGS steps (each up to ``max_iter`` evaluations).
        lr: L-BFGS learning rate (DLG: 1).
        max_iter: evaluations per L-BFGS step (torch default 20).
        history_size: L-BFGS memory.
        line_search: ``None`` (DLG) or ``"strong_wolfe"``.
        restarts: independent random initialisations; the one with the lowest final
            gradient distance is returned.
        labels: ``"auto"`` (known labels when the threat model has them, else optimised
            jointly), ``"optimise"`` (always optimised jointly) or ``"infer"`` (iDLG rule).
        adaptive: match only the coordinates that were sent.
        tolerance: stop a restart once the distance falls below this (0 = never).
        log_every: record the objective every this many steps in ``Reconstruction.losses``.
    """

    label_policies = ("auto", "optimise", "infer")
    default_labels = "auto"
    default_adaptive = False

    def __init__(
        self,
        iterations: int = 300,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 100,
        line_search: Optional[str] = None,
        restarts: int = 1,
        labels: Optional[str] = None,
        adaptive: Optional[bool] = None,
        tolerance: float = 0.0,
        log_every: int = 1,
    ) -> None:
        self.iterations = check_count(iterations, "iterations")
        self.lr = check_number(lr, "lr", positive=True)
        self.max_iter = check_count(max_iter, "max_iter")
        self.history_size = check_count(history_size, "history_size")
        if line_search not in (None, "strong_wolfe"):
            raise ValueError(f"line_search must be None or 'strong_wolfe', got {line_search!r}")
        self.line_search = line_search
        self.restarts = check_count(restarts, "restarts")
        self.labels = check_choice(self.default_labels if labels is None else labels, "labels", self.label_policies)
        adaptive = self.default_adaptive if adaptive is None else adaptive
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {type(adaptive).__name__}")
        self.adaptive = adaptive
        self.tolerance = check_number(tolerance, "tolerance")
        self.log_every = check_count(log_every, "log_every")

    def __call__(
        self, shared_grads: List[Tensor], threat: ThreatModel, *, seed: int = 0, progress: bool = False
    ) -> Reconstruction:
        start = time.perf_counter()
        shared = check_shared_grads(shared_grads, threat)
        device = shared[0].device
        labels, source = resolve_labels(shared, threat, self.labels)
        objective = GradientObjective(shared, "euclidean", resolve_masks(shared, threat.sent_mask, self.adaptive))
        model = threat.model
        params = list(model.parameters())
        shape = (threat.batch_size, *threat.image_shape)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        best = None  # (distance, images, label logits, losses)
        bar = Progress(self.iterations * self.restarts, progress, self.name)
        for _ in range(self.restarts):
            x = torch.randn(shape, generator=gen, device=device).requires_grad_(True)
            opt_params = [x]
            logits = None
            if labels is None:
                logits = torch.randn(threat.batch_size, threat.num_classes, generator=gen, device=device)
                logits.requires_grad_(True)
                opt_params.append(logits)
            opt = torch.optim.LBFGS(
                opt_params,
                lr=self.lr,
                max_iter=self.max_iter,
                history_size=self.history_size,
                line_search_fn=self.line_search,
            )

            def closure() -> Tensor:
                if logits is None:
                    dummy = dummy_gradients(model, params, x, labels, threat.loss_fn)
                else:
                    dummy = dummy_gradients(model, params, x, logits, soft_cross_entropy)
                obj = objective(dummy)
                grads = torch.autograd.grad(obj, opt_params)
                for p, g in zip(opt_params, grads):
                    p.grad = g
                return obj.detach()

            losses: List[float] = []
            last_good = (float("inf"), x.detach().clone(), None if logits is None else logits.detach().clone())
            for it in range(self.iterations):
                value = float(opt.step(closure))
                bar.update(value)
                if it % self.log_every == 0 or it == self.iterations - 1:
                    losses.append(value)
                if not (value == value and value < float("inf")) or not bool(torch.isfinite(x).all()):
                    break  # L-BFGS diverged: keep the last finite state
                last_good = (value, x.detach().clone(), None if logits is None else logits.detach().clone())
                if value <= self.tolerance:
                    break
            # the distance at the state we keep (opt.step returns the value *before* its step)
            with torch.enable_grad():
                xs = last_good[1].requires_grad_(True)
                if last_good[2] is None:
                    dummy = dummy_gradients(model, params, xs, labels, threat.loss_fn)
                else:
                    dummy = dummy_gradients(model, params, xs, last_good[2], soft_cross_entropy)
                final = float(objective(dummy).detach())
            if final != final:
                final = float("inf")
            if best is None or final < best[0]:
                best = (final, last_good[1], last_good[2], losses)
        bar.close()
        assert best is not None
        _, images, best_logits, losses = best
        if labels is None:
            labels = best_logits.argmax(dim=1)
        return Reconstruction(
            images=images.detach().clamp(0, 1).float(),
            labels=labels.to(torch.int64),
            label_source=source,
            losses=losses,
            seconds=time.perf_counter() - start,
        )


@register_attack("idlg")
class IDLG(DLG):
    """iDLG: the label is inferred with the iDLG rule (known labels are not used), then DLG."""

    label_policies = ("infer",)
    default_labels = "infer"


@register_attack("dlg-adaptive")
class AdaptiveDLG(DLG):
    """DLG whose euclidean distance counts only the coordinates that were sent."""

    default_adaptive = True
