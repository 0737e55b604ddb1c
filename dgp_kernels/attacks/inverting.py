"""Inverting Gradients (Geiping et al. 2020), its adaptive variant and a DGP-aware attacker.

``ig`` (breaching's defaults except the iteration count and the TV form): random-normal
dummy images, objective ``cosine(grad(dummy), shared) + tv_weight * TV(dummy)`` with the
cosine similarity taken over all layers at once (dot product and norms summed over layers),
Adam (lr 0.1) stepping on the *sign* of the objective's gradient, pixels clipped to [0, 1]
after every step, learning rate x0.1 at 3/8, 5/8 and 7/8 of the iterations
(``schedule="step"``). Labels: known when the threat model has them, else the iDLG rule.

Iterations: breaching runs 24,000 (the DGP authors 12,000). One iteration costs one
double-backward pass; on the sigmoid LeNet at 32x32 that is ~12 ms on a quiet 2-core CPU
(far more under load), so 24,000 iterations take minutes per image. The evaluator's default
is far smaller and makes up for it with its tuning grid (see
:data:`dgp_kernels.attacks.runner.TUNING_GRIDS`). Pass ``iterations=24000`` for the paper
setting.

``ig-adaptive``: the cosine is restricted to the coordinates that were actually sent
(``threat.sent_mask``, else the non-zero ones); unsent zeros do not pull the dummy gradient.

``ig-dgp-aware`` (none of the public frameworks has one): the adaptive objective plus
``band_weight * band_penalty``. The attacker knows DGP's band rule, so each unsent coordinate
of the true gradient lies outside the band ``[lo, hi]`` of the sent magnitudes of its layer
(it was either among the ``k_top`` largest or below the kept band). The penalty pushes the
dummy gradient's unsent coordinates out of that band: with ``threat.band = (top, keep)`` the
``k_top`` largest unsent dummy magnitudes toward ``>= hi`` and the rest toward ``<= lo``,
otherwise each toward the nearer edge (squared hinge, divided by the layer's sent energy;
see :meth:`~dgp_kernels.attacks.matching.GradientObjective.band_penalty`). The penalty is
switched on after ``band_start`` (default 1/2) of the iterations: from a random start it
dominates the cosine and the search stalls (measured on the 8x8 test LeNet with DGP
(0.05, 0.2): -5 dB vs the floor when on from the start), so the attacker first matches the
sent coordinates like ``ig-adaptive`` and then refines with the band rule.

What differs from the paper and from breaching:

* The returned images are the **lowest-objective iterate** of the run (for ``ig-dgp-aware``
  the lowest among the iterates after the band penalty is on, whose objective includes it),
  not the last one; ``Reconstruction.objective`` is the objective there. Adam is applied by
  hand (same update as ``torch.optim.Adam``, bias-corrected, ``eps`` 1e-8) so that several
  settings can run as one vectorised optimisation (:meth:`InvertingGradients.run_grid`).
* ``schedule="exp"`` (the evaluator's default budget) decays the learning rate
  geometrically, ``lr * 10 ** (-3 * step / iterations)``, from the setting to 1/1000 of it:
  the same span as breaching's steps, with more of a short run at the small rates. On the
  sigmoid LeNet (4 photos, 12-setting grid, 1,000 steps) it beat the step schedule by 0.3 to
  0.5 dB mean PSNR and a cosine decay by more (:data:`dgp_kernels.attacks.runner.ATTACK_BUDGETS`).
* ``tv="mean"`` (default) is ``mean|dx| + mean|dy|`` over the interior differences;
  ``tv="breaching"`` is breaching's regulariser exactly (border differences against zero
  padding, one mean over all pixels of ``|dx| + |dy|``, ``eps`` 1e-8); see
  :func:`~dgp_kernels.attacks.matching.total_variation`. The TV weight default 0.2 is
  breaching's figure for its own form.
* The paper's label handling for unknown labels (the iDLG rule here) and its multiple
  restarts (``restarts``; lowest objective wins) are as in breaching; the paper's image
  prior is the TV term only (no batch-norm statistics prior).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Attack, Reconstruction, ThreatModel, check_setting, check_shared_grads, register_attack
from .matching import (
    TV_KINDS,
    GradientObjective,
    Progress,
    check_choice,
    check_count,
    check_number,
    dummy_gradients,
    resolve_labels,
    resolve_masks,
    total_variation,
)

__all__ = ["InvertingGradients", "AdaptiveInvertingGradients", "DGPAwareInvertingGradients"]

_BETAS = (0.9, 0.999)

#: Learning-rate schedules (:func:`lr_factor`).
SCHEDULES = ("step", "cosine", "exp")


def lr_factor(schedule: str, it: int, n: int) -> float:
    """The factor on the learning rate at step ``it`` (0-based) of ``n``: ``"step"`` is
    breaching's (x0.1 at 3/8, 5/8 and 7/8 of the steps), ``"exp"`` is ``10 ** (-3 * it / n)``
    (geometric from 1 toward 1/1000), ``"cosine"`` is ``(1 + cos(pi * it / n)) / 2`` (from 1
    down to nearly 0, no restarts)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * it / n))
    if schedule == "exp":
        return 10.0 ** (-3.0 * it / n)
    milestones = sorted({int(n * f) for f in (3 / 8, 5 / 8, 7 / 8)})
    return 0.1 ** sum(1 for m in milestones if m <= it)
_EPS = 1e-8

#: Fewest rows that run as one ``vmap``-ed optimisation; fewer run one after the other.
#: Measured on the sigmoid LeNet at 32x32, 1 thread (2-core machine at load ~5): 1 / 3 / 12
#: rows took 21 / 27 / 38 ms per step with ``vmap`` and 7 / 14 / 48 ms one after the other.
VMAP_MIN_ROWS = 8


def _has_running_stats(model: nn.Module) -> bool:
    """True when a batch-norm layer of ``model`` would update its running statistics (the
    vectorised path cannot run such a model; the row-by-row one can)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        for m in model.modules()
    )


@register_attack("ig")
class InvertingGradients(Attack):
    """Inverting Gradients.

    Args:
        iterations: Adam steps (default 2,000; breaching 24,000).
        lr: Adam learning rate (0.1).
        tv_weight: total-variation weight (0.2; breaching's figure; 1e-4 is the other common one).
        tv: TV form, ``"mean"`` or ``"breaching"`` (module docstring).
        signed: step on the sign of the gradient (breaching's default).
        boxed: clip pixels to [0, 1] after each step.
        restarts: independent random initialisations; the lowest objective wins.
        labels: ``"auto"`` (known labels, else the iDLG rule) or ``"infer"`` (always the rule).
        adaptive: match only the sent coordinates.
        band_weight: weight of the DGP band penalty (needs ``adaptive``).
        band_start: fraction of the iterations after which the band penalty is on.
        log_every: record the objective every this many steps.
        init: ``"randn"`` (standard normal, breaching) or ``"uniform"`` (uniform in [0, 1]: a
            start inside the box; with ``boxed`` a normal start has about half its pixels
            clipped to black after the first step).
        vectorize: run the restarts / grid settings as one batched optimisation with
            ``torch.func.vmap`` (the same arithmetic as one after the other, several times
            faster on small models); models whose batch norm tracks running statistics
            always run row by row. With fewer than :data:`VMAP_MIN_ROWS` rows the rows run
            one after the other anyway (faster there; measured below).
        prune_at: successive halving of a grid (0 = off): after this fraction of the
            iterations, among the rows of each TV weight only the ``prune_keep`` with the
            lowest objective so far keep running; the others return their best iterate up
            to then. Rows of one TV weight share one objective, so the choice uses the
            attacker's objective only (never the true image); rows of different TV weights
            are not compared (the lowest objective there is always the smallest weight).
        prune_keep: rows kept per TV weight at ``prune_at``.
        schedule: learning-rate schedule, ``"step"`` (breaching's), ``"exp"`` (geometric
            decay to 1/1000) or ``"cosine"`` (:func:`lr_factor`).
    """

    default_adaptive = False
    default_band_weight = 0.0
    tunable = ("tv_weight", "lr", "iterations", "tv", "band_weight", "band_start", "init", "schedule")

    def __init__(
        self,
        iterations: int = 2000,
        lr: float = 0.1,
        tv_weight: float = 0.2,
        tv: str = "mean",
        signed: bool = True,
        boxed: bool = True,
        restarts: int = 1,
        labels: str = "auto",
        adaptive: Optional[bool] = None,
        band_weight: Optional[float] = None,
        band_start: float = 0.5,
        log_every: int = 10,
        vectorize: bool = True,
        init: str = "randn",
        prune_at: float = 0.0,
        prune_keep: int = 1,
        schedule: str = "step",
    ) -> None:
        self.iterations = check_count(iterations, "iterations")
        self.lr = check_number(lr, "lr", positive=True)
        self.tv_weight = check_number(tv_weight, "tv_weight")
        self.tv = check_choice(tv, "tv", TV_KINDS)
        for name, value in (("signed", signed), ("boxed", boxed), ("vectorize", vectorize)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.signed = signed
        self.boxed = boxed
        self.vectorize = vectorize
        self.restarts = check_count(restarts, "restarts")
        self.labels = check_choice(labels, "labels", ("auto", "infer"))
        adaptive = self.default_adaptive if adaptive is None else adaptive
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {type(adaptive).__name__}")
        self.adaptive = adaptive
        self.band_weight = check_number(self.default_band_weight if band_weight is None else band_weight, "band_weight")
        if self.band_weight > 0 and not self.adaptive:
            raise ValueError("band_weight > 0 needs adaptive=True (the band penalty acts on unsent coordinates)")
        self.band_start = check_number(band_start, "band_start")
        if self.band_start > 1:
            raise ValueError(f"band_start must be in [0, 1], got {band_start!r}")
        self.log_every = check_count(log_every, "log_every")
        self.init = check_choice(init, "init", ("randn", "uniform"))
        self.prune_at = check_number(prune_at, "prune_at")
        if self.prune_at >= 1:
            raise ValueError(f"prune_at must be in [0, 1), got {prune_at!r}")
        self.prune_keep = check_count(prune_keep, "prune_keep")
        self.schedule = check_choice(schedule, "schedule", SCHEDULES)

    # ----------------------------------------------------------------------------------
    def __call__(
        self, shared_grads: List[Tensor], threat: ThreatModel, *, seed: int = 0, progress: bool = False
    ) -> Reconstruction:
        settings: List[Dict[str, object]] = [{"restart": r} for r in range(self.restarts)]
        recs = self.run_grid(shared_grads, threat, settings, seed=seed, progress=progress)
        best = min(recs, key=lambda r: r.objective if r.objective == r.objective else float("inf"))
        best.setting = {}
        best.seconds = recs[0].seconds
        return best

    # (the signature of Attack.run_grid, which this overrides)
    def run_grid(
        self,
        shared_grads: List[Tensor],
        threat: ThreatModel,
        settings: Sequence[Dict[str, object]],
        *,
        seed: int = 0,
        progress: bool = False,
        rank: Optional[Callable[[Tensor], Sequence[float]]] = None,
    ) -> List[Reconstruction]:
        """One reconstruction per setting (see :meth:`Attack.run_grid`). Settings may vary
        ``tv_weight``, ``lr``, ``init`` (and ``restart``); all settings run together as one
        optimisation of ``len(settings)`` independent rows. Settings that change another
        tunable argument (``iterations``, ``tv``, the band) run in separate groups.

        ``rank`` (with ``prune_at``) replaces the attacker's choice of the rows that run on:
        it gets the best images so far of the running rows, ``[rows, B, C, H, W]`` clipped to
        [0, 1], and returns one score per row (higher is better); the ``prune_keep`` best
        rows of the group run on, whatever their TV weight. The evaluator passes the PSNR
        against the true images here (an oracle, stated in its report)."""
        start = time.perf_counter()
        if not settings:
            raise ValueError("settings must list at least one setting")
        parsed = [check_setting(s, self.tunable, type(self).__name__) for s in settings]
        groups: Dict[tuple, List[int]] = {}
        for i, p in enumerate(parsed):
            key = tuple(sorted((k, v) for k, v in p.items() if k not in ("tv_weight", "lr", "init")))
            groups.setdefault(key, []).append(i)
        out: List[Optional[Reconstruction]] = [None] * len(settings)
        for key, rows in groups.items():
            attack = self.with_params(**dict(key)) if key else self
            lrs = [check_number(parsed[i].get("lr", attack.lr), "lr", positive=True) for i in rows]
            tvs = [check_number(parsed[i].get("tv_weight", attack.tv_weight), "tv_weight") for i in rows]
            restarts = [int(settings[i].get("restart", 0)) for i in rows]
            inits = [check_choice(parsed[i].get("init", attack.init), "init", ("randn", "uniform")) for i in rows]
            recs = attack._optimise(shared_grads, threat, lrs, tvs, restarts, inits, seed, progress, rank)
            for i, rec in zip(rows, recs):
                rec.setting = dict(settings[i])
                out[i] = rec
        elapsed = time.perf_counter() - start
        for rec in out:
            assert rec is not None
            rec.seconds = elapsed
        return out  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------
    def _optimise(self, shared_grads: List[Tensor], threat: ThreatModel, lrs: List[float],
                  tvs: List[float], restarts: List[int], inits: List[str], seed: int,
                  progress: bool, rank=None) -> List[Reconstruction]:
        shared = check_shared_grads(shared_grads, threat)
        device = shared[0].device
        labels, source = resolve_labels(shared, threat, self.labels if threat.labels is not None else "infer")
        masks = resolve_masks(shared, threat.sent_mask, self.adaptive)
        objective = GradientObjective(shared, "cosine", masks, band_weight=self.band_weight, band=threat.band)
        banded = self.band_weight > 0 and bool(objective.unsent)
        band_from = int(self.band_start * self.iterations) if banded else 0
        model = threat.model
        shape = (threat.batch_size, *threat.image_shape)
        k = len(lrs)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        normal = torch.randn((max(restarts) + 1, *shape), generator=gen, device=device)
        uniform = torch.rand((max(restarts) + 1, *shape), generator=gen, device=device)
        x = torch.stack([(uniform if kind == "uniform" else normal)[r] for r, kind in zip(restarts, inits)])
        lr = torch.tensor(lrs, device=device, dtype=x.dtype).view(k, *([1] * len(shape)))
        tvw = torch.tensor(tvs, device=device, dtype=x.dtype)
        rows = self._row_objectives(model, objective, labels, threat.loss_fn, tvw)
        n = self.iterations
        cut = int(self.prune_at * n) if self.prune_at > 0 else 0
        m1 = torch.zeros_like(x)
        m2 = torch.zeros_like(x)
        best_val = torch.full((k,), float("inf"), device=device, dtype=x.dtype)
        best_x = x.clone()
        losses: List[List[float]] = [[] for _ in range(k)]
        live = list(range(k))  # the original row index of each running row
        done: Dict[int, Reconstruction] = {}
        bar = Progress(n, progress, self.name)
        view = (1,) * len(shape)

        def finish(r: int, value: Tensor, images: Tensor) -> Reconstruction:
            v = float(value)
            return Reconstruction(
                images=images.clamp(0, 1).float(),
                labels=labels.to(torch.int64),
                label_source=source,
                losses=losses[r],
                objective=v if math.isfinite(v) else float("inf"),
            )

        def keep_best(values: Tensor, at: Tensor) -> None:
            better = torch.isfinite(values) & (values < best_val)
            best_val.copy_(torch.where(better, values, best_val))
            best_x.copy_(torch.where(better.view(len(live), *view), at, best_x))

        for it in range(n):
            with_band = banded and it >= band_from
            if banded and it == band_from:
                best_val.fill_(float("inf"))  # the objective changes here: compare like with like
            if it == cut and cut > 0:
                if rank is None:
                    keep = self._survivors(best_val, [tvs[r] for r in live])
                else:
                    scores = [float(v) for v in rank(best_x.detach().clamp(0, 1).float())]
                    if len(scores) != len(live):
                        raise ValueError(f"rank returned {len(scores)} scores for {len(live)} rows")
                    order = sorted(range(len(live)), key=lambda j: (-scores[j] if scores[j] == scores[j] else float("inf"), j))
                    keep = sorted(order[: self.prune_keep])
                if len(keep) < len(live):
                    for j in range(len(live)):
                        if j not in keep:
                            done[live[j]] = finish(live[j], best_val[j], best_x[j])
                    sel = torch.tensor(keep, device=device)
                    x, m1, m2, lr = x[sel], m1[sel], m2[sel], lr[sel]
                    best_val, best_x, tvw = best_val[sel].clone(), best_x[sel].clone(), tvw[sel]
                    live = [live[j] for j in keep]
                    rows = self._row_objectives(model, objective, labels, threat.loss_fn, tvw)
            values, grad = rows(x, with_band)
            keep_best(values, x)
            if it % self.log_every == 0 or it == n - 1:
                for j, v in enumerate(values.tolist()):
                    losses[live[j]].append(v)
                bar.update(float(values.min()))
            else:
                bar.update()
            with torch.no_grad():
                g = grad.sign() if self.signed else grad
                t = it + 1
                m1.mul_(_BETAS[0]).add_(g, alpha=1 - _BETAS[0])
                m2.mul_(_BETAS[1]).addcmul_(g, g, value=1 - _BETAS[1])
                factor = lr_factor(self.schedule, it, n)
                denom = (m2 / (1 - _BETAS[1] ** t)).sqrt_().add_(_EPS)
                x = x - (lr * factor / (1 - _BETAS[0] ** t)) * m1 / denom
                if self.boxed:
                    x = x.clamp(0, 1)
        values, _ = rows(x, banded)
        keep_best(values, x)
        bar.close()
        for j, r in enumerate(live):
            done[r] = finish(r, best_val[j], best_x[j])
        return [done[r] for r in range(k)]

    def _survivors(self, best_val: Tensor, tvs: List[float]) -> List[int]:
        """Rows (positions) that keep running at ``prune_at``: per TV weight the
        ``prune_keep`` lowest objectives so far (ties: the earlier row)."""
        vals = [float(v) if math.isfinite(float(v)) else float("inf") for v in best_val]
        keep: List[int] = []
        for w in dict.fromkeys(tvs):
            members = [j for j, t in enumerate(tvs) if t == w]
            keep.extend(sorted(members, key=lambda j: (vals[j], j))[: self.prune_keep])
        return sorted(keep)

    def _row_objectives(self, model: nn.Module, objective: GradientObjective, labels: Tensor, loss_fn,
                        tvw: Tensor):
        """``f(x [K, B, C, H, W], with_band) -> (objective per row [K], d sum / dx)``."""
        params = list(model.parameters())
        tv_kind = self.tv

        def one_row_terms(xr: Tensor, dummy: List[Tensor], with_band: bool) -> Tensor:
            return objective(dummy) if with_band else objective.distance(dummy)

        if self.vectorize and int(tvw.shape[0]) >= VMAP_MIN_ROWS and not _has_running_stats(model):
            from torch.func import functional_call, grad, grad_and_value, vmap

            names = [n for n, _ in model.named_parameters()]
            live = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
            buffers = {n: b for n, b in model.named_buffers()}

            self_tv = bool((tvw > 0).any())

            def client_loss(p: Dict[str, Tensor], xr: Tensor) -> Tensor:
                return loss_fn(functional_call(model, ({**p, **frozen}, buffers), (xr,)), labels)

            def row(xr: Tensor, w: Tensor, with_band: bool) -> Tensor:
                g = grad(client_loss)(live, xr)
                dummy = [g[n] if n in g else torch.zeros_like(frozen[n]) for n in names]
                val = one_row_terms(xr, dummy, with_band)
                if self_tv:
                    val = val + w * total_variation(xr, tv_kind)
                return val

            def total(x: Tensor, with_band: bool):
                per = vmap(lambda xr, w: row(xr, w, with_band))(x, tvw)
                return per.sum(), per.detach()

            def run(x: Tensor, with_band: bool):
                (g, (_, per)) = grad_and_value(lambda z: total(z, with_band), has_aux=True)(x)
                return per, g

            return run

        def run_loop(x: Tensor, with_band: bool):
            x = x.detach().requires_grad_(True)
            vals = []
            with torch.enable_grad():
                for r in range(x.shape[0]):
                    xr = x[r]
                    dummy = dummy_gradients(model, params, xr, labels, loss_fn)
                    val = one_row_terms(xr, dummy, with_band)
                    if float(tvw[r]) > 0:
                        val = val + tvw[r] * total_variation(xr, tv_kind)
                    vals.append(val)
                per = torch.stack(vals)
                (g,) = torch.autograd.grad(per.sum(), [x])
            return per.detach(), g

        return run_loop


@register_attack("ig-adaptive")
class AdaptiveInvertingGradients(InvertingGradients):
    """Inverting Gradients with the cosine restricted to the sent coordinates."""

    default_adaptive = True


@register_attack("ig-dgp-aware")
class DGPAwareInvertingGradients(InvertingGradients):
    """Adaptive Inverting Gradients plus the DGP band penalty (module docstring)."""

    default_adaptive = True
    default_band_weight = 0.1
