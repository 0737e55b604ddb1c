"""Multi-seed runs: the same configurations over several seeds, summarised per defense with
the mean and standard deviation of the final accuracy and the *paired* difference against a
baseline (``none``), seed by seed.

Why paired: on the built-in digits the test split has 359 images, so one run's final
accuracy carries ~1.1 points of binomial noise at 95 %, and the seed moves both the model
init and the batches. Differences taken per seed (``acc_defense(s) - acc_none(s)``) cancel
the part of that noise the two runs share; their mean gets a Student-t 95 % interval.

    from dgp_kernels.sim import SimConfig, simulate_seeds
    runs = simulate_seeds([SimConfig(defense="none"), SimConfig(defense="dgp")], seeds=range(5))
    for row in runs.summary():
        row.label, row.accuracy.mean, row.accuracy.std, row.diff_vs_baseline

Only the standard library and torch (through the simulator) are needed; the plots need
matplotlib.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .config import SimConfig
from ..checks import check_seed
from ..optional import pyplot
from .results import SimResult, finish_accuracy_plot, seed_curves
from .simulator import simulate

__all__ = [
    "MultiSeedResult",
    "SeedStats",
    "SeedSummaryRow",
    "describe",
    "file_stem",
    "parse_seeds",
    "plot_seed_results",
    "simulate_seeds",
    "t_quantile_975",
]

# Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables, e.g.
# NIST/SEMATECH e-Handbook 1.3.6.7.2); above 30 the Cornish-Fisher expansion below is
# accurate to < 1e-4.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``): the
    half-width factor of a two-sided 95 % interval. Table for ``df <= 30``, Cornish-Fisher
    expansion in ``1/df`` above (error < 1e-4)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


@dataclass(frozen=True)
class SeedStats:
    """Summary of one number over seeds.

    Attributes:
        n: number of seeds.
        mean: arithmetic mean.
        std: sample standard deviation (``n - 1`` in the denominator; ``nan`` when n = 1).
        min, max: extremes.
        median: the middle value (mean of the two middle values for even n): robust to a
            seed whose run diverged.
        ci95_low, ci95_high: two-sided 95 % Student-t interval of the mean,
            ``mean -/+ t_{0.975, n-1} * std / sqrt(n)`` (``nan`` when n = 1).
    """

    n: int
    mean: float
    std: float
    min: float
    max: float
    median: float
    ci95_low: float
    ci95_high: float


def describe(values: Iterable[float]) -> SeedStats:
    """:class:`SeedStats` of ``values`` (at least one finite-or-not float; NaNs propagate)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("describe() needs at least one value")
    mean = math.fsum(xs) / n
    srt = sorted(xs)
    median = srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2])
    if n == 1:
        return SeedStats(1, mean, math.nan, xs[0], xs[0], xs[0], math.nan, math.nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return SeedStats(n, mean, std, min(xs), max(xs), median, mean - half, mean + half)


def parse_seeds(text: str) -> List[int]:
    """``--seeds`` text -> seeds: a comma list (``"0,1,2,3,4"``, ``"7,"`` for the single
    seed 7) or a bare count (``"5"`` -> ``[0, 1, 2, 3, 4]``). Seeds are ints >= 0, no
    duplicates; raises ``ValueError`` naming ``--seeds`` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"--seeds must be a str, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise ValueError("--seeds is empty; give a count (5 -> seeds 0..4) or a list (0,1,2)")
    try:
        if "," not in s:
            count = int(s)
            if count < 1:
                raise ValueError
            return list(range(count))
        seeds = [int(p) for p in (q.strip() for q in s.split(",")) if p]
    except ValueError:
        raise ValueError(
            f"--seeds {text!r} must be a count >= 1 (5 -> seeds 0..4) or a comma list of "
            f"seeds >= 0 (0,1,2; 7, for the single seed 7)"
        ) from None
    if not seeds or any(x < 0 for x in seeds):
        raise ValueError(f"--seeds {text!r}: seeds must be ints >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} lists a seed twice")
    return seeds


def _check_seeds(seeds: Iterable[int]) -> List[int]:
    out = list(seeds)
    if not out:
        raise ValueError("seeds must hold at least one seed")
    for i, s in enumerate(out):
        check_seed(s, f"seeds[{i}]")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds lists a seed twice: {out}")
    return out


@dataclass(frozen=True)
class SeedSummaryRow:
    """One configuration summarised over seeds (see :meth:`MultiSeedResult.summary`).

    Attributes:
        label: the run's label (the defense name unless labels were given).
        defense, defense_params: the configuration's defense.
        seeds: the seeds, in run order.
        accuracy: final test accuracy (fraction in [0, 1]) over seeds.
        diff_vs_baseline: per seed ``accuracy - baseline accuracy`` (fraction), summarised;
            ``None`` for the baseline itself.
        upload_fraction: per seed total upload bytes / the baseline's, summarised.
        upload_bytes, download_bytes: mean total bytes per run.
        wall_s: seconds of all its runs together.
    """

    label: str
    defense: str
    defense_params: Dict[str, Any]
    seeds: List[int]
    accuracy: SeedStats
    diff_vs_baseline: Optional[SeedStats]
    upload_fraction: SeedStats
    upload_bytes: float
    download_bytes: float
    wall_s: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MultiSeedResult:
    """What :func:`simulate_seeds` returns.

    Attributes:
        labels: one per configuration, in order.
        seeds: the seeds, in run order.
        baseline: the label paired differences and byte fractions refer to.
        runs: ``label -> [SimResult per seed]`` (same order as ``seeds``).
    """

    labels: List[str]
    seeds: List[int]
    baseline: str
    runs: Dict[str, List[SimResult]] = field(default_factory=dict)

    def per_seed_rows(self) -> List[Dict[str, Any]]:
        """One row per (label, seed): final accuracy and loss, bytes, the upload relative to
        the baseline's run with the same seed and the accuracy difference to it."""
        base = self.runs[self.baseline]
        rows = []
        for label in self.labels:
            for i, (seed, res) in enumerate(zip(self.seeds, self.runs[label])):
                b = base[i]
                rows.append({
                    "label": label,
                    "defense": res.config.defense,
                    "seed": seed,
                    "final_accuracy": res.final_accuracy,
                    "final_loss": res.final_loss,
                    "accuracy_minus_baseline": res.final_accuracy - b.final_accuracy,
                    "upload_bytes": res.total_upload_bytes,
                    "download_bytes": res.total_download_bytes,
                    "upload_vs_baseline": (res.total_upload_bytes / b.total_upload_bytes
                                           if b.total_upload_bytes else math.nan),
                    "wall_s": res.wall_s,
                })
        return rows

    def summary(self) -> List[SeedSummaryRow]:
        """One :class:`SeedSummaryRow` per label (mean, std and paired differences)."""
        per = self.per_seed_rows()
        out = []
        for label in self.labels:
            rows = [r for r in per if r["label"] == label]
            cfg = self.runs[label][0].config
            out.append(SeedSummaryRow(
                label=label,
                defense=cfg.defense,
                defense_params=dict(cfg.defense_params),
                seeds=list(self.seeds),
                accuracy=describe(r["final_accuracy"] for r in rows),
                diff_vs_baseline=(None if label == self.baseline
                                  else describe(r["accuracy_minus_baseline"] for r in rows)),
                upload_fraction=describe(r["upload_vs_baseline"] for r in rows),
                upload_bytes=math.fsum(r["upload_bytes"] for r in rows) / len(rows),
                download_bytes=math.fsum(r["download_bytes"] for r in rows) / len(rows),
                wall_s=math.fsum(r["wall_s"] for r in rows),
            ))
        return out

    def markdown(self) -> str:
        """The summary as a markdown table (accuracies and differences in points)."""
        return summary_markdown(self.summary(), self.baseline)

    def write(self, out_dir: str, *, plots: bool = True) -> Dict[str, str]:
        """Write every run (``<label>-seed<s>.json`` / ``.csv``), ``seeds.csv`` (one row per
        label and seed), ``summary.json`` (config, seeds, per-seed rows, summary rows),
        ``summary.md`` and, with ``plots``, the two PNGs of
        :func:`plot_seed_results`. Returns ``name -> path``."""
        os.makedirs(out_dir, exist_ok=True)
        paths: Dict[str, str] = {}
        for label in self.labels:
            stem = file_stem(label)
            for seed, res in zip(self.seeds, self.runs[label]):
                p = os.path.join(out_dir, f"{stem}-seed{seed}")
                res.to_json(p + ".json")
                res.to_csv(p + ".csv")
        per = self.per_seed_rows()
        paths["seeds_csv"] = os.path.join(out_dir, "seeds.csv")
        with open(paths["seeds_csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(per[0]))
            w.writeheader()
            w.writerows(per)
        paths["summary_json"] = os.path.join(out_dir, "summary.json")
        with open(paths["summary_json"], "w") as f:
            json.dump({"seeds": self.seeds, "baseline": self.baseline, "labels": self.labels,
                       "per_seed": per, "summary": [r.to_dict() for r in self.summary()]},
                      f, indent=1)
        paths["summary_md"] = os.path.join(out_dir, "summary.md")
        with open(paths["summary_md"], "w") as f:
            f.write(self.markdown() + "\n")
        if plots:
            for p in plot_seed_results(self, out_dir):
                paths[os.path.splitext(os.path.basename(p))[0]] = p
        return paths


def plot_seed_results(multi: "MultiSeedResult", out_dir: str) -> List[str]:
    """Multi-seed versions of :func:`plot_results`: per label the mean accuracy over seeds
    (line) and the min-max band over seeds (shaded), vs round (``accuracy_vs_round.png``)
    and vs the mean cumulative upload (``accuracy_vs_upload.png``, log x). Returns the
    paths. Needs matplotlib."""
    plt = pyplot()
    paths = []
    for kind in ("round", "upload"):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for label in multi.labels:
            xs, mean, lo, hi = seed_curves(multi.runs[label], "test_accuracy", kind)
            line, = ax.plot(xs, [100 * v for v in mean], label=label, linewidth=1.4)
            ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi],
                            color=line.get_color(), alpha=0.18, linewidth=0)
        cfg = multi.runs[multi.labels[0]][0].config
        title = (f"{cfg.algorithm} {cfg.dataset} {cfg.model}, {cfg.clients} clients, "
                 f"{len(multi.seeds)} seeds (mean, min-max band)")
        paths.append(finish_accuracy_plot(
            plt, fig, ax, kind, "cumulative upload (bytes, all clients; mean over seeds)", title,
            out_dir))
    return paths


def file_stem(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _pts(x: float, sign: bool = False) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def summary_markdown(rows: Sequence[SeedSummaryRow], baseline: str) -> str:
    """Markdown table of :class:`SeedSummaryRow` records: accuracy mean ± std (min–max),
    the paired difference to ``baseline`` (mean ± std and its 95 % t-interval, in points),
    upload / baseline, mean bytes."""
    n = rows[0].accuracy.n if rows else 0
    lines = [
        f"| defense | params | seeds | final accuracy % (mean ± std) | min – max | "
        f"Δ vs {baseline} (points, mean ± std) | 95 % CI of Δ | upload / {baseline} | "
        f"upload bytes (mean) | download bytes (mean) | wall s (all seeds) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r.defense_params.items()) or "defaults"
        name = r.label if r.label == r.defense else f"{r.label} ({r.defense})"
        a = r.accuracy
        if r.diff_vs_baseline is None:
            diff, ci = "(baseline)", ""
        else:
            d = r.diff_vs_baseline
            diff = f"{_pts(d.mean, True)} ± {_pts(d.std)}"
            ci = "n/a" if math.isnan(d.ci95_low) else f"[{_pts(d.ci95_low, True)}, {_pts(d.ci95_high, True)}]"
        lines.append(
            f"| {name} | {params} | {n} | {_pts(a.mean)} ± {_pts(a.std)} | "
            f"{_pts(a.min)} – {_pts(a.max)} | {diff} | {ci} | {r.upload_fraction.mean:.3f} | "
            f"{r.upload_bytes:,.0f} | {r.download_bytes:,.0f} | {r.wall_s:.1f} |"
        )
    return "\n".join(lines)


def simulate_seeds(configs: Sequence[SimConfig], seeds: Iterable[int], *,
                   labels: Optional[Sequence[str]] = None, baseline: Optional[str] = None,
                   progress: bool = True) -> MultiSeedResult:
    """Run every configuration once per seed (``config.seed`` replaced), seeds in sequence
    (for seed: for config), and collect the results.

    Args:
        configs: the configurations (their own ``seed`` is ignored); all validated before
            the first run.
        seeds: ints >= 0, no duplicates.
        labels: one name per configuration (default: the defense names, which must then
            be unique).
        baseline: the label paired differences refer to (default: the first configuration
            whose defense is ``none``, else the first label).
        progress: a tqdm bar per run, described ``<label> seed <s> [i/total]``.

    Returns:
        :class:`MultiSeedResult`; every :class:`SimResult` keeps its per-round rows.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("configs must hold at least one SimConfig")
    for c in configs:
        if not isinstance(c, SimConfig):
            raise TypeError(f"configs must hold SimConfig records, got {type(c).__name__}")
    seeds = _check_seeds(seeds)
    if labels is None:
        labels = [c.defense for c in configs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two configurations share a defense ({labels}); pass labels=")
    else:
        labels = list(labels)
        if len(labels) != len(configs) or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be {len(configs)} distinct names, got {labels!r}")
        for lab in labels:
            if not isinstance(lab, str) or not lab:
                raise ValueError(f"labels must be non-empty str, got {lab!r}")
    if baseline is None:
        baseline = next((lab for lab, c in zip(labels, configs) if c.defense == "none"), labels[0])
    elif baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not among the labels {labels}")
    per_seed = {s: [dataclasses.replace(c, seed=s).validate() for c in configs] for s in seeds}

    out = MultiSeedResult(labels=list(labels), seeds=seeds, baseline=baseline,
                          runs={lab: [] for lab in labels})
    total, i = len(seeds) * len(configs), 0
    for s in seeds:
        for lab, cfg in zip(labels, per_seed[s]):
            i += 1
            res = simulate(cfg, progress=progress, desc=f"{lab} seed {s} [{i}/{total}]")
            out.runs[lab].append(res)
    return out
