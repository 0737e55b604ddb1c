"""The evaluation grid: defenses x attacks x target images, scored with the metrics.

For every batch of target images (one image per batch by default, as in the papers'
figures) the runner

1. builds the client model (seeded per batch, so every defense and attack sees the *same*
   weights and the comparisons are paired), and for each attack the model the server sends
   (:meth:`Attack.prepare_model`: the malicious imprint model of Robbing the Fed, the honest
   model otherwise);
2. computes the client's gradient on it (:func:`~dgp_kernels.attacks.base.compute_gradients`);
3. applies each defense once, without error feedback, through the compressors and the wire
   codec (:func:`~dgp_kernels.attacks.defenses.apply_defense`), which gives the dense
   gradient the server rebuilds, the sent mask, the band and the real upload size. ADGP
   (``adgp``) sends at positions a broadcaster picks from *its own* gradient; here the
   broadcaster is another client: its update (:func:`client_update`, on a copy of the same
   served model) on the *next* batch of the run's targets, ``(b + 1) mod n_batches``; when
   the run has a single batch, on a fixed batch of the same size of uniform-noise images in
   [0, 1) with random labels, drawn from a generator seeded with ``seed`` (never the
   victim's own images, which would make the positions the victim's own DGP band);
4. runs each attack with the :class:`~dgp_kernels.attacks.base.ThreatModel` a server has:
   the model, the image shape, the class count, the sent mask (a sparse payload carries its
   indices, so every attacker may use it; the adaptive ones do), the band rule for DGP/top-k
   (a public protocol parameter; the DGP-aware attack uses it), and the true labels when
   ``known_labels`` (except for ``idlg``, which infers them, and ``rtf``);
5. scores the reconstruction: MSE, PSNR, SSIM, the flat mean-colour floor, leakage = PSNR -
   floor, label accuracy; and, per defense, the accuracy of the iDLG label rule
   (:func:`~dgp_kernels.attacks.base.infer_labels_idlg`) on the defended gradient.

Results are typed records (:class:`EvalResult`, :class:`AttackRecord`,
:class:`DefenseRecord`, :class:`UtilityRecord`) with ``to_json``/``to_csv``; the markdown
report and figures are written by :mod:`dgp_kernels.attacks.report`.

Iteration budgets: :data:`ATTACK_BUDGETS` holds each attack's constructor arguments for the
default run (chosen so ``dgp evaluate`` takes a few minutes on 2 CPU cores) and
:data:`FULL_BUDGETS` the literature's; ``iteration_scale`` multiplies the iteration counts.
"""

from __future__ import annotations

import copy
import csv
import inspect
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..machine import cpu_model
from . import metrics
from .base import ThreatModel, available_attacks, compute_gradients, get_attack, infer_labels_idlg
from ..cases.targets import TargetSet, load_targets
from ..optional import progress_bar
from .defenses import DefendedGradient, DefenseSpec, apply_defense, parse_defense

__all__ = [
    "ATTACK_BUDGETS",
    "DEFAULT_DEFENSES",
    "FULL_BUDGETS",
    "PSNR_CAP_DB",
    "AttackRecord",
    "DefenseRecord",
    "EvalConfig",
    "EvalResult",
    "UtilityRecord",
    "PRIMARY_DEFENSES",
    "applicable_attacks",
    "attack_params",
    "default_attacks",
    "default_config",
    "run_evaluation",
    "run_suite",
    "run_utility",
    "setting_label",
    "suite_configs",
    "client_update",
    "SUITE_VARIANTS",
    "TUNING_GRIDS",
    "QUICK_GRIDS",
]

#: PSNR is capped here (an exact copy has infinite PSNR; Robbing the Fed gets close).
PSNR_CAP_DB = 100.0

#: The default defense grid: undefended; DGP at its defaults and at a sparser point; classic
#: top-k pruning at DGP's density (20%); Gaussian noise at two levels (within the DLG paper's
#: 1e-3..1e-1 range); QSGD with 8 levels.
DEFAULT_DEFENSES: Tuple[str, ...] = (
    "none",
    "dgp:top=0.05,keep=0.2",
    "dgp:top=0.02,keep=0.1",
    "topk:keep=0.2",
    "dp:sigma=0.01",
    "dp:sigma=0.1",
    "qsgd:levels=8",
)

#: Photos in the default run (astronaut, chelsea, coffee, rocket).
DEFAULT_IMAGES = 4

#: Display order of the attacks (passive optimisation attacks by family, then the active one).
ATTACK_ORDER: Tuple[str, ...] = ("dlg", "idlg", "dlg-adaptive", "ig", "ig-adaptive", "ig-dgp-aware", "rtf")

#: Attacks that use the sent mask or the band (they only differ from their plain versions
#: under a sparsifying defense).
ADAPTIVE_ATTACKS = frozenset({"dlg-adaptive", "ig-adaptive", "ig-dgp-aware"})
#: Active attacks: they need a malicious server that sends a manipulated model.
ACTIVE_ATTACKS = frozenset({"rtf"})
#: Attacks that infer the labels themselves (they never get the true labels).
LABEL_INFERRING_ATTACKS = frozenset({"idlg", "rtf"})

#: Constructor arguments per attack for the default run (CPU-sized). Each attack then runs
#: every setting of its :data:`TUNING_GRIDS` entry on top of these, and the best setting per
#: image is reported. Measured on the sigmoid LeNet with 32x32 photos, 1 thread (2-core
#: machine shared with other jobs, niced):
#:
#: * DLG (L-BFGS, up to 20 evaluations per step, strong-Wolfe line search from a uniform
#:   start) in float64 with torch's L-BFGS stopping tolerances off (see :mod:`.dlg`): 120
#:   steps reach 67.1 / 45.2 / 31.1 / 46.9 dB (astronaut / chelsea / coffee / rocket; mean
#:   47.6), where float32 with torch's tolerances reached 53.8 / 40.1 / 27.7 / 39.2 (mean 40.2)
#:   and stalled (coffee: flat from step ~160 on). Coffee still improves after 120 steps (44.0
#:   dB at 240), hence 200 steps. DLG's own setting (normal start, no line search) reached a
#:   mean of 28.3 dB at 120 steps in float64 and never won: it is not in the grid.
#: * Inverting Gradients: all 12 grid settings as one ``vmap``-ed optimisation, with the
#:   learning rate decaying geometrically from its setting to 1/1000 of it over the run
#:   (``schedule="exp"``); 1,000 Adam steps for ``ig`` and ``ig-dgp-aware``, 2,000 for
#:   ``ig-adaptive`` (the strongest passive attack under sparsification; the same on every
#:   defense). Mean PSNR over the 4 default photos, adaptive IG on DGP 5%/20% / top-k 20%:
#:   breaching's step schedule (x0.1 at 3/8, 5/8, 7/8) 16.8 / 17.3 dB at 1,000 steps, 17.9 /
#:   18.0 at 2,000, 18.5 / 18.3 at 3,000; cosine decay 15.9 / 16.8 at 1,000; the geometric
#:   decay 17.2 / 17.6 at 1,000 and 18.4 / 18.2 at 2,000 (at 1,000 with 4 starts per
#:   setting instead of 2: 17.2 / 17.8). Plain IG on the undefended
#:   gradient at 1,000 steps: 18.5 (step), 19.0 (geometric). Successive halving
#:   (``prune_at``) was measured and is not the default: halved after 40% of 3,000 steps by
#:   PSNR (3 settings run on) it gave 18.0 undefended and 17.5 / 17.3 adaptive at 2.2x the
#:   CPU time of the 1,000-step run; it drops settings that end best (attacks README).
#:
#: ``iterations`` is scaled by ``iteration_scale``.
# (per-attack tables: the duplicate report pairs their shape with the grids below)
_IG_BUDGET: Dict[str, Any] = {"iterations": 1000, "tv_weight": 0.005, "schedule": "exp"}
ATTACK_BUDGETS: Dict[str, Dict[str, Any]] = {
    "dlg": {"iterations": 200, "precision": "float64"},
    "idlg": {"iterations": 200, "precision": "float64"},
    "dlg-adaptive": {"iterations": 40},
    "ig": dict(_IG_BUDGET),
    "ig-adaptive": {**_IG_BUDGET, "iterations": 2000},
    "ig-dgp-aware": dict(_IG_BUDGET),
    "rtf": {},
}

#: The literature's iteration counts (DLG 300 L-BFGS steps; Inverting Gradients 24,000 Adam
#: steps, breaching's default, with breaching's step schedule; the DGP authors used 12,000),
#: same TV weight as the default.
FULL_BUDGETS: Dict[str, Dict[str, Any]] = {
    "dlg": {"iterations": 300, "precision": "float64"},
    "idlg": {"iterations": 300, "precision": "float64"},
    "dlg-adaptive": {"iterations": 300},
    "ig": {"iterations": 24000, "tv_weight": 0.005},
    "ig-adaptive": {"iterations": 24000, "tv_weight": 0.005},
    "ig-dgp-aware": {"iterations": 24000, "tv_weight": 0.005},
    "rtf": {},
}

_IG_GRID: List[Dict[str, Any]] = [
    {"tv_weight": tv, "lr": lr, "init": init, "restart": r}
    for tv in (1e-4, 0.005, 0.2) for lr in (0.1, 0.03) for init, r in (("randn", 0), ("uniform", 1))
]
_DLG_GRID: List[Dict[str, Any]] = [
    {"init": "uniform", "line_search": "strong_wolfe", "restart": 0},
]

#: The attacker's tuning protocol: per attack, the hyper-parameter settings it runs on every
#: defense (the same grid for every defense). The reported result per image is the best
#: setting by PSNR (an oracle choice over settings: conservative for privacy); the setting
#: is recorded, and so is the attacker's own pick by lowest objective. Inverting Gradients
#: (all three variants): TV weight {1e-4, 0.005, 0.2} x Adam learning rate {0.1, 0.03} x 2
#: random starts (one normal, breaching's; one uniform in [0, 1]) = 12 runs, vectorised into
#: one optimisation. Measured at 500 steps (LeNet, 32x32, TV 0.2,
#: lr 0.03): chelsea +1.0 dB from the uniform start vs -2.1 from the normal one, rocket -6.0
#: vs -1.7: neither start wins everywhere. DLG/iDLG: the strong-Wolfe line search from a
#: uniform start in float64 (see :data:`ATTACK_BUDGETS`). Boxed adaptive DLG: 2 random
#: starts. Robbing the Fed is analytic (one run).
TUNING_GRIDS: Dict[str, List[Dict[str, Any]]] = {
    "dlg": _DLG_GRID,
    "idlg": _DLG_GRID,
    "dlg-adaptive": [{"restart": 0}, {"restart": 1}],
    "ig": _IG_GRID,
    "ig-adaptive": _IG_GRID,
    "ig-dgp-aware": _IG_GRID,
    "rtf": [{}],
}

_IG_QUICK: List[Dict[str, Any]] = [{"tv_weight": 1e-4}, {"tv_weight": 0.2}]

#: The reduced grid of ``--quick``: Inverting Gradients at TV 1e-4 and 0.2 (one start, lr
#: 0.1), DLG with the line search from a uniform start only, one start elsewhere.
QUICK_GRIDS: Dict[str, List[Dict[str, Any]]] = {
    "dlg": [{"init": "uniform", "line_search": "strong_wolfe"}],
    "idlg": [{"init": "uniform", "line_search": "strong_wolfe"}],
    "dlg-adaptive": [{}],
    "ig": _IG_QUICK,
    "ig-adaptive": _IG_QUICK,
    "ig-dgp-aware": _IG_QUICK,
    "rtf": [{}],
}


def setting_label(setting: Dict[str, Any]) -> str:
    """``{"tv_weight": 0.2, "lr": 0.1, "restart": 1}`` -> ``"tv_weight=0.2 lr=0.1 restart=1"``
    (``"default"`` for an empty setting)."""
    if not setting:
        return "default"
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def attack_params(name: str, *, full: bool = False, scale: float = 1.0) -> Dict[str, Any]:
    """Constructor arguments of attack ``name`` for the default (or ``full``) budget, with
    ``iterations`` multiplied by ``scale`` (at least 1)."""
    table = FULL_BUDGETS if full else ATTACK_BUDGETS
    params = dict(table.get(name, {}))
    if "iterations" in params:
        params["iterations"] = max(1, int(round(params["iterations"] * scale)))
    return params


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """One evaluation run.

    Attributes:
        grid: ``(defense spec, attack names)`` pairs: which attacks run on which defense.
        dataset: target source (:func:`~dgp_kernels.cases.targets.load_targets`).
        images: number of target images.
        image_size: square side of the targets (``None``: the source's default).
        data_root: directory of MNIST/CIFAR files.
        model: client model name (:data:`dgp_kernels.cases.models.MODELS`).
        batch_size: images behind one shared gradient.
        known_labels: give the attacks (except idlg/rtf) the true labels.
        attack_params: constructor arguments per attack name (iteration budgets).
        device: torch device of models, gradients and attacks (``"auto"``: cuda when available).
        seed: seeds the targets' selection, the models, the randomised defenses and attacks.
        utility: also run :func:`run_utility` (simulator accuracy and bytes per defense).
        utility_rounds: FedSGD rounds per defense in those runs.
        utility_model: the simulator's model for those runs (default ``mlp`` on the digits:
            100 rounds take ~3 s per defense on one core and reach ~93% test accuracy
            undefended, where ``convnet_small`` is still at ~50% after 40 rounds).
        budget: ``"quick"``, ``"default"``, ``"full"`` or ``"custom"`` (for the report).
        threads: torch intra-op threads while the grid runs (restored afterwards). The
            attacked models are tiny, so one thread is fastest: the same 3-step DLG run on a
            16x16 LeNet took 0.43 s with 1 thread and 2.98 s with 2 on this project's 2-core
            machine under load ~6 (OpenMP workers wait for busy cores).
        tuning: per attack name, the settings of its tuning grid (:data:`TUNING_GRIDS`);
            an attack not listed runs once with its budget. Per image the best setting by
            PSNR is reported.
        tuning_name: ``"tuned"``, ``"quick"`` or ``"none"`` (for the report).
        workers: processes running batches (images) in parallel (1 = in this process).
        local_steps: 1 = the client shares one gradient (FedSGD); ``S > 1`` = the client
            runs ``S`` SGD steps of rate ``local_lr`` on its batch and shares the update
            ``(w_0 - w_S) / (S * local_lr)`` (FedAvg), which the attacks treat as a gradient.
        local_lr: the client's learning rate for ``local_steps > 1``.
        prune_by: how an attack with successive halving (Inverting Gradients'
            ``prune_at``) picks the settings that run on: ``"psnr"`` (default; the PSNR
            against the true images, an oracle like the best-by-PSNR choice of the reported
            setting) or ``"objective"`` (the attacker's own objective, per TV weight).
    """

    grid: List[Tuple[str, List[str]]]
    dataset: str = "photos"
    images: int = 1
    image_size: Optional[int] = None
    data_root: Optional[str] = None
    model: str = "lenet_sigmoid"
    batch_size: int = 1
    known_labels: bool = True
    attack_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    seed: int = 0
    utility: bool = True
    utility_rounds: int = 100
    utility_model: str = "mlp"
    budget: str = "default"
    threads: int = 1
    tuning: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    tuning_name: str = "none"
    workers: int = 1
    local_steps: int = 1
    local_lr: float = 0.01
    prune_by: str = "psnr"

    def settings(self, attack: str) -> List[Dict[str, Any]]:
        """The tuning-grid settings attack ``attack`` runs (``[{}]``: its budget once)."""
        return [dict(x) for x in self.tuning.get(attack, [{}])] or [{}]

    def validate(self) -> None:
        """Check every field; ``ValueError``/``TypeError`` naming the field."""
        known = set(available_attacks())
        if not isinstance(self.grid, (list, tuple)) or not self.grid:
            raise ValueError("grid must be a non-empty list of (defense, attacks) pairs")
        canonical: List[Tuple[str, List[str]]] = []
        for i, entry in enumerate(self.grid):
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"grid[{i}] must be a (defense, attacks) pair, got {entry!r}")
            label = parse_defense(entry[0]).label
            if isinstance(entry[1], str) or not entry[1]:
                raise ValueError(f"grid[{i}] ({entry[0]}) must list at least one attack name, got {entry[1]!r}")
            for a in entry[1]:
                if a not in known:
                    raise ValueError(f"unknown attack {a!r}; known attacks: {', '.join(sorted(known))}")
            if len(set(entry[1])) != len(entry[1]):
                raise ValueError(f"grid[{i}] ({entry[0]}) lists an attack twice: {list(entry[1])}")
            if any(label == c for c, _ in canonical):
                raise ValueError(f"grid lists defense {label!r} twice")
            canonical.append((label, list(entry[1])))
        # Canonical spec strings ("dgp" -> "dgp:top=0.05,keep=0.2") key every record.
        self.grid = canonical
        if self.prune_by not in ("psnr", "objective"):
            raise ValueError(f"prune_by must be 'psnr' or 'objective', got {self.prune_by!r}")
        for name in ("images", "batch_size", "utility_rounds", "threads", "workers", "local_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 4):
            raise ValueError(f"image_size must be None or an int >= 4, got {self.image_size!r}")
        from ..cases.models import MODELS

        for name in ("model", "utility_model"):
            if getattr(self, name) not in MODELS:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known models: {', '.join(sorted(MODELS))}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"device must be 'auto' or a torch device string (cpu, cuda, cuda:1), got {self.device!r}"
                ) from None
        if isinstance(self.local_lr, bool) or not isinstance(self.local_lr, (int, float)) or not (
                math.isfinite(self.local_lr) and self.local_lr > 0):
            raise ValueError(f"local_lr must be a finite number > 0, got {self.local_lr!r}")
        for name, params in self.attack_params.items():
            get_attack(name, **params)  # the attack checks its own arguments
        if not isinstance(self.tuning, dict):
            raise TypeError(f"tuning must be a dict of attack name -> list of settings, got {type(self.tuning).__name__}")
        from .base import check_setting

        for name, settings in self.tuning.items():
            if name not in known:
                raise ValueError(f"tuning names unknown attack {name!r}")
            if not isinstance(settings, (list, tuple)) or not settings:
                raise ValueError(f"tuning[{name!r}] must be a non-empty list of settings")
            attack = get_attack(name, **self.attack_params.get(name, {}))
            for st in settings:
                params = check_setting(st, attack.tunable, name)
                if params:
                    attack.with_params(**params)  # the attack checks the values

    @property
    def defenses(self) -> List[str]:
        return [d for d, _ in self.grid]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["grid"] = [[s, list(a)] for s, a in self.grid]
        return d


def applicable_attacks(spec: DefenseSpec, attacks: Sequence[str]) -> List[str]:
    """The attacks of ``attacks`` that differ under ``spec``: the adaptive ones only where
    coordinates are dropped (under a dense defense they equal their plain versions), the
    band-aware one only where there is a band."""
    out = []
    for a in attacks:
        if a in ADAPTIVE_ATTACKS and spec.density >= 1.0:
            continue
        if a == "ig-dgp-aware" and spec.band is None:
            continue
        out.append(a)
    return out


#: Defenses that get every applicable attack by default: the undefended gradient, DGP at its
#: defaults and classic top-k pruning at the same density (the paper's comparison).
PRIMARY_DEFENSES: Tuple[str, ...] = ("none", "dgp:top=0.05,keep=0.2", "topk:keep=0.2")
#: ADGP at DGP's defaults: attacked like the primary defenses (not part of the suite).
_ADGP_DEFAULT = "adgp:top=0.05,keep=0.2"


def default_attacks(spec: DefenseSpec, attacks: Sequence[str]) -> List[str]:
    """Attacks run on ``spec`` when the user does not pick them, chosen so that every
    attack that can be the strongest on a defense runs there (measured: under a sparsifying
    defense the adaptive variants beat the plain ones, which match the zeros; under a dense
    one DLG only wins without noise):

    * the undefended gradient: dlg, ig, rtf;
    * the DGP defaults and top-k 20% (:data:`PRIMARY_DEFENSES`): dlg-adaptive, ig-adaptive,
      ig-dgp-aware, rtf; ADGP at the DGP defaults the same except ig-dgp-aware (it has no
      band, see :mod:`.defenses`);
    * other sparsifying defenses: ig-adaptive, ig-dgp-aware where there is a band, rtf;
    * other dense defenses: ig, rtf.

    idlg is DLG after the iDLG label rule, whose accuracy is reported per defense anyway; it
    runs when asked for (``--attacks``) or with unknown labels in place of dlg."""
    chosen = applicable_attacks(spec, attacks)
    if spec.density >= 1.0:
        keep = {"dlg", "ig", "rtf"} if spec.name == "none" else {"ig", "rtf"}
    elif spec.label in PRIMARY_DEFENSES or spec.label == _ADGP_DEFAULT:
        keep = {"dlg-adaptive", "ig-adaptive", "ig-dgp-aware", "rtf"}
    else:
        keep = {"ig-adaptive", "rtf"}
    return [a for a in chosen if a in keep]


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
    return device


def default_config(
    *,
    quick: bool = False,
    full: bool = False,
    dataset: str = "photos",
    data_root: Optional[str] = None,
    images: Optional[int] = None,
    image_size: Optional[int] = None,
    model: str = "lenet_sigmoid",
    batch_size: int = 1,
    known_labels: bool = True,
    defenses: Optional[Sequence[str]] = None,
    attacks: Optional[Sequence[str]] = None,
    iteration_scale: Optional[float] = None,
    device: str = "auto",
    seed: int = 0,
    utility: bool = True,
    utility_rounds: Optional[int] = None,
    threads: int = 1,
    workers: int = 1,
    tuning: Optional[bool] = None,
    local_steps: int = 1,
    local_lr: float = 0.01,
) -> EvalConfig:
    """The :class:`EvalConfig` behind ``dgp evaluate`` and its options.

    Default grid: :data:`DEFAULT_DEFENSES`, each with :func:`default_attacks`, on
    :data:`DEFAULT_IMAGES` photos, every attack over its :data:`TUNING_GRIDS` settings.
    ``defenses``/``attacks`` given by the user replace the lists; an explicit ``attacks``
    list runs on every defense. With unknown labels, idlg replaces dlg in the default lists.
    ``quick`` quarters the iterations, takes one image, four defenses and the reduced
    :data:`QUICK_GRIDS`; ``full`` uses the literature's iteration counts. ``tuning=False``
    runs every attack once with its budget. ``workers`` processes run the images in
    parallel (0: one per CPU core, at most one per image; ``dgp evaluate`` passes 0). They
    are spawned, so a script that runs with ``workers != 1`` needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    if quick and full:
        raise ValueError("quick and full are exclusive")
    if iteration_scale is not None and (not math.isfinite(iteration_scale) or iteration_scale <= 0):
        raise ValueError(f"iterations scale must be a finite number > 0, got {iteration_scale!r}")
    all_attacks = sorted(available_attacks(),
                         key=lambda a: (ATTACK_ORDER.index(a) if a in ATTACK_ORDER else len(ATTACK_ORDER), a))
    if attacks is not None:
        attacks = list(attacks)
        if attacks == ["all"]:
            attacks = all_attacks
        for a in attacks:
            if a not in all_attacks:
                raise ValueError(f"unknown attack {a!r}; known attacks: {', '.join(all_attacks)}")
        if not attacks:
            raise ValueError("attacks must name at least one attack")
    if defenses is None:
        defenses = (["none", "dgp:top=0.05,keep=0.2", "topk:keep=0.2", "dp:sigma=0.01"] if quick
                    else list(DEFAULT_DEFENSES))
    specs = [parse_defense(d) for d in defenses]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"defenses lists the same defense twice: {labels}")
    if attacks is not None:
        grid = [(s.label, list(attacks)) for s in specs]
    else:
        grid = []
        for s in specs:
            atks = default_attacks(s, all_attacks)
            if not known_labels:
                atks = ["idlg" if a == "dlg" else a for a in atks]
            grid.append((s.label, atks))
    scale = (0.25 if quick else 1.0) * (iteration_scale if iteration_scale is not None else 1.0)
    used = sorted({a for _, atks in grid for a in atks})
    budget = "quick" if quick else "full" if full else "default"
    if iteration_scale is not None and iteration_scale != 1.0:
        budget += f" x{iteration_scale:g}"
    if tuning is None:
        tuning = True
    grids = (QUICK_GRIDS if quick else TUNING_GRIDS) if tuning else {}
    n_images = images if images is not None else (1 if quick else DEFAULT_IMAGES)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: one per core), got {workers!r}")
    if workers == 0:
        n_batches = max(1, -(-int(n_images) // max(1, int(batch_size)))) if isinstance(n_images, int) else 1
        workers = max(1, min(os.cpu_count() or 1, n_batches))
    cfg = EvalConfig(
        grid=grid,
        dataset=dataset,
        images=n_images,
        image_size=image_size,
        data_root=data_root,
        model=model,
        batch_size=batch_size,
        known_labels=known_labels,
        attack_params={a: attack_params(a, full=full, scale=scale) for a in used},
        device=_resolve_device(device),
        seed=seed,
        utility=utility,
        utility_rounds=utility_rounds if utility_rounds is not None else (30 if quick else 100),
        budget=budget,
        threads=threads,
        tuning={a: [dict(x) for x in grids[a]] for a in used if a in grids},
        tuning_name=("quick" if quick else "tuned") if tuning else "none",
        workers=workers,
        local_steps=local_steps,
        local_lr=local_lr,
    )
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------
@dataclass
class AttackRecord:
    """One attack on one target image under one defense (a row of ``results.csv``).

    ``psnr``, ``floor`` and ``leakage`` in dB (PSNR capped at :data:`PSNR_CAP_DB`); ``ssim`` in
    [-1, 1]; ``mse`` on [0, 1] pixels; ``label_correct`` 1.0/0.0 (the attack's label for this
    image vs the true one); ``seconds`` is the attack's wall time over all its settings (for
    a batch, split evenly). With a tuning grid the row is the best of ``settings_tried``
    settings by PSNR (``setting`` names it, :func:`setting_label`);
    ``leakage_by_objective`` is the leakage of the setting with the lowest attack objective,
    the choice an attacker makes without the true image. ``gray_floor`` is the PSNR of a
    flat mid-gray image (:func:`~dgp_kernels.attacks.metrics.gray_floor_psnr`), a lower
    reference than ``floor``.
    """

    defense: str
    attack: str
    image: int
    image_name: str
    label: int
    psnr: float
    ssim: float
    mse: float
    floor: float
    leakage: float
    label_pred: int
    label_correct: float
    label_source: str
    seconds: float
    batch: int
    setting: str = "default"
    settings_tried: int = 1
    leakage_by_objective: float = float("nan")
    gray_floor: float = float("nan")


@dataclass
class DefenseRecord:
    """What one defense costs and leaks regardless of the attack (means over the batches).

    ``upload_bytes``: encoded payload of one gradient (real wire bytes); ``dense_bytes``: the
    same gradient as dense float32; ``sent_fraction``: fraction of coordinates sent;
    ``idlg_label_acc``: accuracy of the iDLG label rule on the defended gradient.
    """

    defense: str
    name: str
    upload_bytes: float
    dense_bytes: int
    sent_fraction: float
    idlg_label_acc: float
    band: Optional[Tuple[float, float]]


@dataclass
class UtilityRecord:
    """One defense's training run in the simulator (:func:`run_utility`)."""

    defense: str
    final_accuracy: float
    upload_bytes_per_round: float  # mean bytes one client uploads per round
    dense_bytes: int               # one dense float32 copy of the trained model
    rounds: int
    clients: int
    model: str
    dataset: str
    seconds: float


@dataclass
class EvalResult:
    """Everything one evaluation produced.

    Attributes:
        config: the configuration.
        targets: the target images.
        attacks: one :class:`AttackRecord` per (defense, attack, image).
        defenses: one :class:`DefenseRecord` per defense, in grid order.
        reconstructions: ``(defense, attack) -> float32 [N, C, H, W]`` on the CPU, aligned with
            ``targets.images`` (attacks not run on a defense are absent); the best setting's.
        utility: one :class:`UtilityRecord` per defense, or ``None`` when skipped.
        utility_note: why utility is missing (skipped by flag, or the error), else ``""``.
        machine: where and when it ran (host, CPU, threads, torch, device, load, times).
        tuning_rows: every setting of every tuning grid: ``defense, attack, image, setting,
            psnr, leakage, objective`` (the table behind the best-per-image rows).
    """

    config: EvalConfig
    targets: TargetSet
    attacks: List[AttackRecord]
    defenses: List[DefenseRecord]
    reconstructions: Dict[Tuple[str, str], Tensor]
    utility: Optional[List[UtilityRecord]] = None
    utility_note: str = ""
    machine: Dict[str, Any] = field(default_factory=dict)
    tuning_rows: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able data; non-finite floats (a diverged metric) become ``None``."""
        return _json_safe({
            "config": self.config.to_dict(),
            "targets": {"names": list(self.targets.names), "labels": self.targets.labels.tolist(),
                        "source": self.targets.source, "shape": list(self.targets.images.shape)},
            "machine": self.machine,
            "defenses": [asdict(d) for d in self.defenses],
            "attacks": [asdict(r) for r in self.attacks],
            "utility": None if self.utility is None else [asdict(u) for u in self.utility],
            "utility_note": self.utility_note,
            "tuning_rows": self.tuning_rows,
        })

    def to_json(self, path: str) -> None:
        """Write :meth:`to_dict` as JSON (strict: no NaN/inf)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)

    def to_csv(self, path: str) -> None:
        """One row per (defense, attack, image), the :class:`AttackRecord` fields, plus the
        defense's upload bytes and iDLG label accuracy."""
        extra = {d.defense: d for d in self.defenses}
        names = list(AttackRecord.__dataclass_fields__) + ["upload_bytes", "dense_bytes", "idlg_label_acc"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for r in self.attacks:
                row = asdict(r)
                d = extra[r.defense]
                row.update(upload_bytes=d.upload_bytes, dense_bytes=d.dense_bytes,
                           idlg_label_acc=d.idlg_label_acc)
                w.writerow(row)

    def mean(self, defense: str, attack: str, key: str) -> float:
        """Mean of ``key`` over the images for one (defense, attack); NaN when not run."""
        vals = [getattr(r, key) for r in self.attacks if r.defense == defense and r.attack == attack]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def values(self, defense: str, attack: str, key: str) -> List[float]:
        """``key`` of every image for one (defense, attack), in image order (empty if not run)."""
        rows = sorted((r for r in self.attacks if r.defense == defense and r.attack == attack), key=lambda r: r.image)
        return [getattr(r, key) for r in rows]

    def best_rows(self, defense: str, *, passive: bool = False,
                  attacks: Optional[Sequence[str]] = None) -> List[AttackRecord]:
        """Per image, the record with the highest leakage under ``defense`` over the attacks
        (all, the passive ones, or ``attacks``) and, through the records, over the settings:
        the leakage the evaluator reports for the defense. Image order; empty if none ran."""
        best: Dict[int, AttackRecord] = {}
        for r in self.attacks:
            if r.defense != defense or (passive and r.attack in ACTIVE_ATTACKS):
                continue
            if attacks is not None and r.attack not in attacks:
                continue
            if r.image not in best or r.leakage > best[r.image].leakage:
                best[r.image] = r
        return [best[i] for i in sorted(best)]

    def best_attack(self, defense: str, *, passive: bool = False) -> Optional[str]:
        """The attack with the highest mean leakage under ``defense`` (``None`` if none ran);
        ``passive=True`` leaves out the active (malicious-server) attacks."""
        atks = [a for d, alist in self.config.grid if d == defense for a in alist
                if not (passive and a in ACTIVE_ATTACKS)]
        if not atks:
            return None
        return max(atks, key=lambda a: self.mean(defense, a, "leakage"))


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
def _machine_info(device: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        pass
    info["started_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return info


def _build_model(cfg: EvalConfig, targets: TargetSet, seed: int, device: str) -> torch.nn.Module:
    """The client model for one batch, seeded (every defense and attack shares it), in
    training mode as the client uses it."""
    import inspect

    from ..cases.models import get_model, MODELS

    c, h, _ = targets.image_shape
    kw: Dict[str, Any] = {"num_classes": targets.num_classes, "channels": c}
    if "image_size" in inspect.signature(MODELS[cfg.model]).parameters:
        kw["image_size"] = h
    torch.manual_seed(seed)
    return get_model(cfg.model, **kw).to(device)


def _progress_bar(total: int, enabled: bool, desc: str):
    return progress_bar(total, desc, unit="attack", enabled=enabled)


def _finite(x: float, cap: float = PSNR_CAP_DB) -> float:
    if math.isnan(x):
        return x
    return min(float(x), cap)


def run_evaluation(cfg: EvalConfig, *, progress: bool = True, targets: Optional[TargetSet] = None,
                   trainer: Optional[Callable[..., Any]] = None) -> EvalResult:
    """Run the grid of ``cfg`` (see the module docstring) and, when ``cfg.utility``, the
    training runs; returns an :class:`EvalResult`.

    ``targets`` overrides the images ``cfg`` would load (tests pass tiny ones). ``trainer``
    runs the training for the utility columns (see :func:`run_utility`); pass
    :func:`dgp_kernels.sim.simulate_defense` (``dgp evaluate`` does). The attacks do not
    import the simulator, so without a trainer the utility runs are skipped and
    ``EvalResult.utility_note`` says so.
    """
    cfg.validate()
    device = _resolve_device(cfg.device)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, device, progress, targets, trainer)
    finally:
        torch.set_num_threads(saved_threads)


def client_update(model: torch.nn.Module, x: Tensor, y: Tensor, *, steps: int = 1,
                  lr: float = 0.01) -> List[Tensor]:
    """What the client shares: its gradient on ``(x, y)`` (``steps == 1``, FedSGD), or for
    ``steps > 1`` the FedAvg update of ``steps`` SGD steps of rate ``lr`` on the same batch,
    divided by ``steps * lr`` so that it is on the gradient's scale (the mean gradient along
    the local trajectory). ``model`` is not changed (the local steps run on a copy)."""
    if steps == 1:
        return compute_gradients(model, x, y)
    local = copy.deepcopy(model)
    start = [p.detach().clone() for p in local.parameters()]
    for _ in range(steps):
        g = compute_gradients(local, x, y)
        with torch.no_grad():
            for p, gi in zip(local.parameters(), g):
                p.sub_(lr * gi)
    return [(a - p.detach()) / (steps * lr) for a, p in zip(start, local.parameters())]


def _batch_job(cfg: EvalConfig, device: str, targets: TargetSet, b_i: int, idx: List[int]) -> Dict[str, Any]:
    """One batch in a worker process (spawned): its own torch thread count."""
    torch.set_num_threads(cfg.threads)
    return _run_batch(cfg, device, targets, b_i, idx, None)


def _broadcaster_batch(cfg: EvalConfig, targets: TargetSet, b_i: int, idx: List[int],
                       device: str) -> Tuple[Tensor, Tensor]:
    """The images and labels of ADGP's broadcaster for victim batch ``b_i``: the next batch
    of the run, ``(b_i + 1) mod n_batches`` (batches as :func:`_run` forms them); with a
    single batch, ``len(idx)`` uniform-noise images in [0, 1) and uniform random labels
    from a generator seeded with ``cfg.seed`` (never the victim's own images)."""
    n = len(targets)
    starts = list(range(0, n, cfg.batch_size))
    if len(starts) > 1:
        s = starts[(b_i + 1) % len(starts)]
        other = list(range(s, min(s + cfg.batch_size, n)))
        return targets.images[other].to(device), targets.labels[other].to(device)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    xb = torch.rand((len(idx), *targets.image_shape), generator=gen, dtype=targets.images.dtype)
    yb = torch.randint(0, targets.num_classes, (len(idx),), generator=gen, dtype=targets.labels.dtype)
    return xb.to(device), yb.to(device)


def _run_batch(cfg: EvalConfig, device: str, targets: TargetSet, b_i: int, idx: List[int], bar) -> Dict[str, Any]:
    """Every (defense, attack) of the grid, every tuning setting, on batch ``b_i``."""
    specs = [parse_defense(d) for d, _ in cfg.grid]
    grid = [(s, list(a)) for s, (_, a) in zip(specs, cfg.grid)]
    used = sorted({a for _, atks in grid for a in atks})
    attack_objs = {a: get_attack(a, **cfg.attack_params.get(a, {})) for a in used}
    shape = targets.image_shape
    num_classes = targets.num_classes
    x = targets.images[idx].to(device)
    y = targets.labels[idx].to(device)
    bsz = len(idx)
    out: Dict[str, Any] = {"records": [], "tuning": [], "recon": {}, "defense": {}, "dense": {}}
    base_model = _build_model(cfg, targets, seed=cfg.seed * 1_000_003 + b_i, device=device)
    # The model each attack's server sends, and the client's update on it (one update per
    # distinct model; passive attacks share the honest one).
    served: Dict[str, torch.nn.Module] = {}
    grads: Dict[int, List[Tensor]] = {}
    for a in used:
        m = attack_objs[a].prepare_model(copy.deepcopy(base_model) if a == "rtf" else base_model,
                                         shape, num_classes)
        m = m.to(device)
        served[a] = m
        if id(m) not in grads:
            grads[id(m)] = client_update(m, x, y, steps=cfg.local_steps, lr=cfg.local_lr)
    honest = grads.get(id(base_model)) or client_update(base_model, x, y, steps=cfg.local_steps, lr=cfg.local_lr)
    defended_cache: Dict[Tuple[str, int], DefendedGradient] = {}
    broadcaster: Dict[int, List[Tensor]] = {}  # ADGP's broadcaster update per served model

    def broadcaster_grads(m: torch.nn.Module) -> List[Tensor]:
        if id(m) not in broadcaster:
            xb, yb = _broadcaster_batch(cfg, targets, b_i, idx, device)
            # on a copy, so that the served model (batch-norm statistics) stays as it was
            broadcaster[id(m)] = client_update(copy.deepcopy(m), xb, yb, steps=cfg.local_steps,
                                               lr=cfg.local_lr)
        return broadcaster[id(m)]

    def defended(spec: DefenseSpec, m: torch.nn.Module) -> DefendedGradient:
        key = (spec.label, id(m))
        if key not in defended_cache:
            g = honest if m is base_model else grads[id(m)]
            extra = {"broadcaster_grads": broadcaster_grads(m)} if spec.name == "adgp" else {}
            defended_cache[key] = apply_defense(spec, g, seed=cfg.seed + b_i, model=m, **extra)
        return defended_cache[key]

    for spec, atks in grid:
        dg = defended(spec, base_model)
        threat0 = ThreatModel(model=base_model, image_shape=shape, num_classes=num_classes, batch_size=bsz)
        pred = infer_labels_idlg(dg.shared_grads, threat0)
        out["defense"][spec.label] = (dg.upload_bytes, dg.sent_fraction,
                                      metrics.label_accuracy(pred.cpu(), y.cpu(), ordered=False) * bsz)
        out["dense"][spec.label] = dg.dense_bytes
        for a in atks:
            m = served[a]
            dga = defended(spec, m)
            threat = ThreatModel(
                model=m, image_shape=shape, num_classes=num_classes, batch_size=bsz,
                labels=y.clone() if cfg.known_labels and a not in LABEL_INFERRING_ATTACKS else None,
                sent_mask=None if dga.sent_fraction >= 1.0 else dga.sent_mask,
                band=dga.band,
            )
            settings = cfg.settings(a)
            extra: Dict[str, Any] = {}
            if cfg.prune_by == "psnr" and "rank" in inspect.signature(attack_objs[a].run_grid).parameters:
                extra["rank"] = _psnr_rank(x)
            try:
                recs = attack_objs[a].run_grid(dga.shared_grads, threat, settings, seed=cfg.seed + b_i, **extra)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise type(exc)(f"attack {a!r} on defense {spec.label!r} (batch {b_i}): {exc}") from exc
            scored = [_score(rec, x, y, idx, targets, spec.label, a, b_i) for rec in recs]
            seconds = recs[0].seconds  # run_grid gives every setting the wall time of the grid
            objs = [r.objective if r.objective == r.objective else float("inf") for r in recs]
            by_obj = min(range(len(recs)), key=lambda k: objs[k])
            best_imgs = torch.zeros((bsz, *shape))
            for j in range(bsz):
                k_best = max(range(len(recs)), key=lambda k: scored[k][j].psnr)
                row = scored[k_best][j]
                row.setting = setting_label(settings[k_best])
                row.settings_tried = len(recs)
                row.leakage_by_objective = scored[by_obj][j].leakage
                row.seconds = seconds / bsz
                out["records"].append(row)
                best_imgs[j] = _ordered(recs[k_best].images, x)[j].detach().float().cpu().clamp(0, 1)
                for k in range(len(recs)):
                    r = scored[k][j]
                    out["tuning"].append({
                        "defense": spec.label, "attack": a, "image": r.image, "setting": setting_label(settings[k]),
                        "psnr": r.psnr, "leakage": r.leakage, "ssim": r.ssim, "objective": objs[k],
                    })
            out["recon"][(spec.label, a)] = best_imgs
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{spec.label} {a}", refresh=False)
    return out


def _psnr_rank(x: Tensor) -> Callable[[Tensor], List[float]]:
    """The oracle ranking for successive halving: per row of ``[rows, B, C, H, W]`` images,
    the mean PSNR against the true batch ``x`` (reconstructions paired with targets)."""

    def rank(images: Tensor) -> List[float]:
        out = []
        for r in range(images.shape[0]):
            imgs = _ordered(images[r].to(x.device), x)
            out.append(float(metrics.psnr(imgs, x).clamp(max=PSNR_CAP_DB).mean()))
        return out

    return rank


def _run(cfg: EvalConfig, device: str, progress: bool, targets: Optional[TargetSet],
         trainer: Optional[Callable[..., Any]]) -> EvalResult:
    machine = _machine_info(device)
    t_start = time.perf_counter()
    if targets is None:
        targets = load_targets(cfg.dataset, cfg.images, size=cfg.image_size, root=cfg.data_root,
                               seed=cfg.seed)
    if not isinstance(targets, TargetSet):
        raise TypeError(f"targets must be a TargetSet, got {type(targets).__name__}")
    specs = [parse_defense(d) for d, _ in cfg.grid]
    n = len(targets)
    batches = [list(range(i, min(i + cfg.batch_size, n))) for i in range(0, n, cfg.batch_size)]
    workers = min(cfg.workers, len(batches))
    machine["workers"] = workers
    total = len(batches) * sum(len(a) for _, a in cfg.grid)
    bar = _progress_bar(total if workers == 1 else len(batches), progress,
                        "dgp evaluate" if workers == 1 else f"dgp evaluate ({workers} processes, batches)")
    outputs: List[Dict[str, Any]] = []
    try:
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_batch_job, cfg, device, targets, b_i, idx)
                           for b_i, idx in enumerate(batches)]
                for f in futures:
                    outputs.append(f.result())
                    if bar is not None:
                        bar.update(1)
        else:
            for b_i, idx in enumerate(batches):
                outputs.append(_run_batch(cfg, device, targets, b_i, idx, bar))
    finally:
        if bar is not None:
            bar.close()
    records: List[AttackRecord] = []
    tuning_rows: List[Dict[str, Any]] = []
    recon: Dict[Tuple[str, str], Tensor] = {}
    for idx, o in zip(batches, outputs):
        records.extend(o["records"])
        tuning_rows.extend(o["tuning"])
        for key, imgs in o["recon"].items():
            recon.setdefault(key, torch.zeros_like(targets.images))[idx] = imgs
    defense_records = [
        DefenseRecord(
            defense=s.label, name=s.name,
            upload_bytes=sum(o["defense"][s.label][0] for o in outputs) / len(batches),
            dense_bytes=outputs[0]["dense"][s.label],
            sent_fraction=sum(o["defense"][s.label][1] for o in outputs) / len(batches),
            idlg_label_acc=sum(o["defense"][s.label][2] for o in outputs) / n,
            band=s.band,
        )
        for s in specs
    ]
    machine["attack_seconds"] = round(time.perf_counter() - t_start, 2)
    result = EvalResult(config=cfg, targets=targets, attacks=records, defenses=defense_records,
                        reconstructions=recon, machine=machine, tuning_rows=tuning_rows)
    if cfg.utility and trainer is None:
        result.utility_note = ("utility runs skipped: no trainer given "
                               "(run_evaluation(..., trainer=dgp_kernels.sim.simulate_defense))")
    elif cfg.utility:
        t_u = time.perf_counter()
        try:
            result.utility = run_utility(specs, trainer=trainer, rounds=cfg.utility_rounds, seed=cfg.seed,
                                         device=device, progress=progress, model=cfg.utility_model)
        except ImportError as exc:
            result.utility_note = f"utility runs skipped: {exc}"
        machine["utility_seconds"] = round(time.perf_counter() - t_u, 2)
    else:
        result.utility_note = "utility runs skipped (--no-utility)"
    machine["total_seconds"] = round(time.perf_counter() - t_start, 2)
    try:
        machine["load_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    machine["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return result


# --------------------------------------------------------------------------------------
# The suite: beyond one image per gradient and one model
# --------------------------------------------------------------------------------------
#: The ``--suite`` variants, each run on the :data:`PRIMARY_DEFENSES` with the base run's
#: budgets and tuning grid: batches of 4 and 8 photos behind one gradient, a batch-norm
#: model, FedAvg updates of several local steps, and labels unknown to the attacker.
SUITE_VARIANTS: Tuple[str, ...] = ("batch4", "batch8", "resnet18", "fedavg", "unknown-labels")


def suite_configs(base: EvalConfig, *, batch_sizes: Sequence[int] = (4, 8), bn_model: str = "resnet18_cifar",
                  local_steps: int = 5, local_lr: float = 0.1,
                  defenses: Optional[Sequence[str]] = None) -> List[Tuple[str, EvalConfig]]:
    """The suite's configurations derived from ``base`` (see :data:`SUITE_VARIANTS`):

    * ``batch4``/``batch8``: ``batch_sizes`` photos behind one gradient (one batch);
    * ``resnet18``: ``bn_model`` (default ``resnet18_cifar``, batch norm in training mode)
      instead of the base model, one photo per gradient;
    * ``fedavg``: FedAvg updates of ``local_steps`` SGD steps of rate ``local_lr``;
    * ``unknown-labels``: no labels for the attacker (idlg replaces dlg; IG uses the iDLG rule).

    ``defenses`` defaults to the base grid's :data:`PRIMARY_DEFENSES` (all of them when
    none is in the base grid); every variant keeps the base grid's attacks on them."""
    import dataclasses

    base_grid = {parse_defense(d).label: a for d, a in base.grid}
    if defenses is None:
        defenses = [d for d in PRIMARY_DEFENSES if d in base_grid] or list(PRIMARY_DEFENSES)
    all_attacks = available_attacks()
    grid = []
    for d in defenses:
        spec = parse_defense(d)
        grid.append((spec.label, list(base_grid.get(spec.label) or default_attacks(spec, all_attacks))))
    out: List[Tuple[str, EvalConfig]] = []

    def variant(name: str, **kw) -> None:
        g = [(d, list(a)) for d, a in kw.pop("grid", grid)]
        cfg = dataclasses.replace(base, grid=g, utility=False, **kw)
        used = {a for _, atks in g for a in atks}
        cfg.attack_params = {a: dict(base.attack_params.get(a) or attack_params(a)) for a in used}
        cfg.tuning = {a: [dict(x) for x in (base.tuning.get(a) or [{}])] for a in used if a in base.tuning}
        cfg.validate()
        out.append((name, cfg))

    for b in batch_sizes:
        variant(f"batch{b}", batch_size=int(b), images=int(b))
    variant("resnet18" if bn_model == "resnet18_cifar" else bn_model, model=bn_model)
    variant("fedavg", local_steps=int(local_steps), local_lr=float(local_lr))
    unknown = [(d, ["idlg" if a == "dlg" else a for a in atks]) for d, atks in grid]
    variant("unknown-labels", known_labels=False, grid=unknown)
    return out


def run_suite(configs: Sequence[Tuple[str, EvalConfig]], *, progress: bool = True,
              targets: Optional[Dict[str, TargetSet]] = None) -> List[Tuple[str, EvalResult]]:
    """Run each ``(name, config)`` of :func:`suite_configs`; ``targets`` may override the
    images per name (tests pass tiny ones)."""
    out = []
    for name, cfg in configs:
        out.append((name, run_evaluation(cfg, progress=progress, targets=(targets or {}).get(name))))
    return out


def _ordered(rec_images: Tensor, x: Tensor) -> Tensor:
    """``rec_images`` reordered to pair with ``x`` (batch attacks may permute the batch)."""
    if rec_images.shape != x.shape:
        raise ValueError(
            f"the attack returned images of shape {tuple(rec_images.shape)} for targets of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[0] == 1:
        return rec_images
    perm = metrics.match_order(rec_images.detach(), x)
    return rec_images[perm]


def _score(rec, x: Tensor, y: Tensor, idx: List[int], targets: TargetSet, defense: str,
           attack: str, batch: int) -> List[AttackRecord]:
    imgs = _ordered(rec.images.detach().to(x.device).float().clamp(0, 1), x)
    p = metrics.psnr(imgs, x).cpu()
    s = metrics.ssim(imgs, x).cpu()
    e = metrics.mse(imgs, x).cpu()
    f = metrics.floor_psnr(x).cpu()
    gf = metrics.gray_floor_psnr(x).cpu()
    labels = rec.labels.detach().cpu().long()
    if x.shape[0] > 1:
        # Labels of a batch come as a multiset: credit each true label found in it.
        pool = labels.tolist()
        correct = []
        for t in y.cpu().tolist():
            if t in pool:
                pool.remove(t)
                correct.append(1.0)
            else:
                correct.append(0.0)
        pred = labels.tolist()
    else:
        pred = labels.tolist()
        correct = [float(pred[0] == int(y[0]))]
    out = []
    per = rec.seconds / max(1, x.shape[0])
    for j, i in enumerate(idx):
        pv = _finite(float(p[j]))
        fv = float(f[j])
        out.append(AttackRecord(
            defense=defense, attack=attack, image=i, image_name=targets.names[i],
            label=int(targets.labels[i]), psnr=pv, ssim=float(s[j]), mse=float(e[j]), floor=fv,
            leakage=pv - fv, label_pred=int(pred[j]) if j < len(pred) else -1,
            label_correct=correct[j], label_source=rec.label_source, seconds=per, batch=batch,
            gray_floor=float(gf[j]),
        ))
    return out


# --------------------------------------------------------------------------------------
# Utility: accuracy and bytes from the simulator
# --------------------------------------------------------------------------------------
def run_utility(specs: Sequence[object], *, trainer: Callable[..., Any], rounds: int = 40,
                seed: int = 0, device: str = "cpu", progress: bool = True, clients: int = 10,
                dataset: str = "digits", model: str = "mlp") -> List[UtilityRecord]:
    """Train with each defense (FedSGD, error feedback as each compressor defaults: on for
    DGP, off for top-k) and record the final test accuracy and the mean upload bytes per
    client per round. Short runs on the built-in digits by default.

    ``trainer`` does the training: it is called as ``trainer(defense, defense_params,
    dataset=, model=, clients=, rounds=, seed=, device=, progress=)`` and returns a result
    with ``rounds`` (dicts with ``upload_bytes`` and ``participants``), ``final_accuracy``
    and ``dense_bytes``: :func:`dgp_kernels.sim.simulate_defense` is one (the attacks do not
    import the simulator; the caller wires it in)."""
    out: List[UtilityRecord] = []
    for spec in specs:
        spec = parse_defense(spec)
        t0 = time.perf_counter()
        res = trainer(spec.name, spec.compressor_params(), dataset=dataset, model=model,
                      clients=clients, rounds=rounds, seed=seed, device=device, progress=progress)
        sent = [(r["upload_bytes"], len(r["participants"])) for r in res.rounds]
        per_round = sum(b for b, _ in sent) / max(1, sum(c for _, c in sent))
        out.append(UtilityRecord(
            defense=spec.label, final_accuracy=float(res.final_accuracy),
            upload_bytes_per_round=float(per_round), dense_bytes=int(res.dense_bytes), rounds=rounds,
            clients=clients, model=model, dataset=dataset, seconds=round(time.perf_counter() - t0, 2),
        ))
    return out

