"""The error-feedback gap study: why DGP can trail ``none`` on the default run.

DGP sends the band of ranks ``[k_top, k_top + k_keep)`` of ``|g + e|`` and never the
``top`` largest entries. With error feedback, an entry held back at the top stays in the
residual ``e`` and is added again next round, so it tends to stay on top: some coordinates
are *never* sent and their residuals grow. The study separates that effect from the
sparsification itself by running, on the same seeds:

* ``none`` — dense float32 gradients (the baseline);
* ``dgp`` — DGP defaults (top 0.05, keep 0.20, error feedback);
* ``dgp top=0`` — the same band width without the top cut (top-k 20 % with error
  feedback): same bytes, no coordinate is held back on purpose;
* ``dgp EF off`` — DGP defaults without error feedback.

For the DGP runs it records per round (the simulator's diagnostics, means over the 10
clients): the fraction of coordinates a client has never sent so far, the residual's and
the gradient's L2 norms, the largest residual entry, the share of the residual's squared
norm on never-sent coordinates and the share of the gradient's squared norm there, and the
fraction of this round's top-held entries that were never sent.

    from bench.studies.efgap import ef_gap_study, write_ef_gap   # from the repository root
    study = ef_gap_study(seeds=range(5))
    write_ef_gap(study, "bench/results/ef_gap")                   # generated, not tracked

``python bench/bench_sim.py --study ef-gap`` runs it from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from dgp_kernels.optional import pyplot
from dgp_kernels.sim import MultiSeedResult, SimConfig, SimResult, simulate_seeds
from dgp_kernels.sim.multiseed import describe, file_stem
from dgp_kernels.sim.results import seed_curves

__all__ = ["EF_GAP_METRICS", "EF_GAP_VARIANTS", "EFGapStudy", "ef_gap_metrics", "ef_gap_study",
           "collapse_round", "linear_fit", "tail_accuracy", "write_ef_gap"]

#: (label, defense, defense_params) of the study's runs, in order.
EF_GAP_VARIANTS: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("none", "none", {}),
    ("dgp", "dgp", {}),
    ("dgp top=0", "dgp", {"top": 0.0, "keep": 0.20}),
    ("dgp EF off", "dgp", {"error_feedback": False}),
)

#: Per-round metrics of the DGP runs (means over the clients that compressed that round):
#: the simulator's diagnostics plus ``residual_over_grad`` (residual norm / gradient norm).
EF_GAP_METRICS = ("never_sent_fraction", "residual_norm", "grad_norm", "residual_over_grad",
                  "residual_max_abs", "residual_never_sent_share", "grad_never_sent_share",
                  "top_never_sent_fraction", "top_repeat_fraction",
                  "server_never_received_fraction", "top_held_by_all_fraction",
                  "top_dropped_l1", "fresh_top_sent_fraction")


def ef_gap_metrics(result: SimResult) -> Dict[str, List[float]]:
    """Per-round metric series of one run with diagnostics: ``metric -> [value per round]``
    for :data:`EF_GAP_METRICS`. Raises ``ValueError`` if the run has no diagnostics."""
    if not result.rounds or "never_sent_fraction" not in result.rounds[0]:
        raise ValueError(f"run of defense {result.config.defense!r} has no diagnostics "
                         f"(SimConfig.diagnostics=True)")
    out: Dict[str, List[float]] = {k: [] for k in EF_GAP_METRICS}
    for r in result.rounds:
        for k in EF_GAP_METRICS:
            if k == "residual_over_grad":
                g = float(r["grad_norm"])
                out[k].append(float(r["residual_norm"]) / g if g > 0 else math.nan)
            else:
                out[k].append(float(r.get(k, 0.0)))
    return out


def tail_accuracy(result: SimResult, k: int = 10) -> float:
    """Mean test accuracy over the last ``k`` evaluated rounds (fraction in [0, 1]): less
    sensitive than the final round to the round-to-round oscillation of a run."""
    accs = [float(r["test_accuracy"]) for r in result.rounds if r.get("test_accuracy") is not None]
    if not accs:
        raise ValueError("the run has no evaluated round")
    tail = accs[-k:]
    return math.fsum(tail) / len(tail)


def collapse_round(result: SimResult, reached: float = 0.40, floor: float = 0.15) -> Optional[int]:
    """The first 1-based round at which the test accuracy fell to ``floor`` or below after
    having reached ``reached`` (a divergence: 10-class chance is 0.10); ``None`` if never."""
    peak = 0.0
    for r in result.rounds:
        a = r.get("test_accuracy")
        if a is None:
            continue
        peak = max(peak, float(a))
        if peak >= reached and float(a) <= floor:
            return int(r["round"]) + 1
    return None


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float, float]:
    """Least-squares line through ``(xs, ys)``: ``(slope, intercept, r2)`` (``r2`` is nan
    when ``ys`` is constant). Needs at least two distinct ``xs``."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError(f"linear_fit needs two equal-length series of >= 2 points, got {n}, {len(ys)}")
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("linear_fit needs at least two distinct x values")
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    icpt = my - slope * mx
    syy = math.fsum((y - my) ** 2 for y in ys)
    ss_res = math.fsum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / syy if syy > 0 else math.nan
    return slope, icpt, r2


@dataclass
class EFGapStudy:
    """What :func:`ef_gap_study` returns.

    Attributes:
        multi: the runs (labels of :data:`EF_GAP_VARIANTS`, baseline ``none``).
        metrics: ``label -> [per seed: metric -> per-round series]`` for the DGP runs.
    """

    multi: MultiSeedResult
    metrics: Dict[str, List[Dict[str, List[float]]]]

    @classmethod
    def load(cls, runs_dir: str) -> "EFGapStudy":
        """Rebuild a study from the ``runs`` folder :func:`write_ef_gap` writes with
        ``runs=True`` (its ``summary.json`` and per-run JSON files), e.g. to redraw or
        re-tabulate without re-running."""
        with open(os.path.join(runs_dir, "summary.json")) as f:
            meta = json.load(f)
        multi = MultiSeedResult(labels=list(meta["labels"]), seeds=list(meta["seeds"]),
                                baseline=meta["baseline"])
        for lab in multi.labels:
            multi.runs[lab] = [SimResult.from_json(os.path.join(runs_dir, f"{file_stem(lab)}-seed{s}.json"))
                               for s in multi.seeds]
        metrics = {lab: [ef_gap_metrics(r) for r in multi.runs[lab]]
                   for lab in multi.labels if multi.runs[lab][0].config.diagnostics}
        return cls(multi=multi, metrics=metrics)

    @property
    def rounds(self) -> int:
        return len(self.multi.runs[self.multi.labels[0]][0].rounds)

    def curve(self, label: str, metric: str) -> Tuple[List[float], List[float], List[float]]:
        """Per-round ``(mean, min, max)`` over seeds of one metric of one DGP run."""
        series = [m[metric] for m in self.metrics[label]]
        n = min(len(s) for s in series)
        cols = [[s[i] for s in series] for i in range(n)]
        return ([math.fsum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols])

    def growth(self, label: str, metric: str = "residual_max_abs",
               start: Optional[int] = None) -> Dict[str, Any]:
        """Straight-line fit of ``metric`` over rounds ``[start, rounds)`` (default: the
        last two thirds) per seed: slope per 100 rounds and R², summarised over seeds."""
        n = self.rounds
        s0 = n // 3 if start is None else start
        fits = []
        for m in self.metrics[label]:
            ys = m[metric][s0:n]
            fits.append(linear_fit([float(i) for i in range(s0, s0 + len(ys))], ys))
        return {"rounds": [s0, n],
                "slope_per_100_rounds": dataclasses.asdict(describe(100 * f[0] for f in fits)),
                "r2": dataclasses.asdict(describe(f[2] for f in fits))}

    def tail_rows(self, k: int = 10) -> List[Dict[str, Any]]:
        """Per label the mean accuracy over the last ``k`` rounds, over seeds, and its
        paired difference to the baseline (:class:`SeedStats` dicts; ``None`` for the
        baseline)."""
        m = self.multi
        base = [tail_accuracy(r, k) for r in m.runs[m.baseline]]
        rows = []
        for lab in m.labels:
            vals = [tail_accuracy(r, k) for r in m.runs[lab]]
            rows.append({"label": lab, "k": k, "per_seed": vals,
                         "accuracy": dataclasses.asdict(describe(vals)),
                         "diff_vs_baseline": None if lab == m.baseline else
                         dataclasses.asdict(describe(v - b for v, b in zip(vals, base)))})
        return rows

    def final_rows(self) -> List[Dict[str, Any]]:
        """Per DGP label the last round's metrics over seeds (:class:`SeedStats` dicts)."""
        rows = []
        for label, per_seed in self.metrics.items():
            row: Dict[str, Any] = {"label": label}
            for k in EF_GAP_METRICS:
                row[k] = dataclasses.asdict(describe(m[k][-1] for m in per_seed))
            rows.append(row)
        return rows

    def to_dict(self, digits: int = 5) -> Dict[str, Any]:
        """JSON-ready: config, seeds, per-seed accuracy rows, the accuracy summary, the last
        round's metrics, growth fits, and per-round mean/min/max curves (rounded to
        ``digits`` significant digits to keep the file small)."""
        def rnd(xs: Iterable[float]) -> List[Optional[float]]:
            return [None if not math.isfinite(x) else float(f"{x:.{digits}g}") for x in xs]

        curves: Dict[str, Any] = {}
        for label in self.multi.labels:
            xs, mean, lo, hi = seed_curves(self.multi.runs[label], "test_accuracy")
            curves[label] = {"round": [int(x) for x in xs],
                             "test_accuracy": {"mean": rnd(mean), "min": rnd(lo), "max": rnd(hi)}}
            if label in self.metrics:
                for k in EF_GAP_METRICS:
                    mean, lo, hi = self.curve(label, k)
                    curves[label][k] = {"mean": rnd(mean), "min": rnd(lo), "max": rnd(hi)}
        base_cfg = self.multi.runs[self.multi.labels[0]][0].config.to_dict()
        base_cfg.pop("seed")
        return {
            "config": base_cfg,
            "variants": [{"label": lab, "defense": d, "defense_params": p}
                         for lab, d, p in EF_GAP_VARIANTS if lab in self.multi.labels],
            "seeds": self.multi.seeds,
            "baseline": self.multi.baseline,
            "per_seed": self.multi.per_seed_rows(),
            "summary": [r.to_dict() for r in self.multi.summary()],
            "last_10_rounds_accuracy": self.tail_rows(10),
            "collapse_round": {lab: [collapse_round(r) for r in self.multi.runs[lab]]
                               for lab in self.multi.labels},
            "final_round": self.final_rows(),
            "max_residual_growth": {lab: self.growth(lab) for lab in self.metrics
                                    if any(m["residual_max_abs"][-1] > 0 for m in self.metrics[lab])},
            "curves": curves,
        }

    def markdown(self) -> str:
        """Accuracy table, per-seed accuracies, the last round's error-feedback metrics, a
        milestone table of the DGP runs, and the paired difference of each run against the
        baseline with its upload share."""
        m = self.multi
        out = ["### Final accuracy over seeds", "", m.markdown(), ""]
        # last 10 rounds
        out += ["### Mean accuracy over the last 10 rounds (less sensitive to the last round's "
                "oscillation)", "",
                f"| run | mean % ± std | Δ vs {m.baseline} (points, mean ± std) | 95 % CI of Δ |",
                "|---|---:|---:|---:|"]
        for row in self.tail_rows(10):
            a, d = row["accuracy"], row["diff_vs_baseline"]
            std = "n/a" if math.isnan(a["std"]) else f"{100 * a['std']:.2f}"
            if d is None:
                out.append(f"| {row['label']} | {100 * a['mean']:.2f} ± {std} | (baseline) | |")
                continue
            dstd = "n/a" if math.isnan(d["std"]) else f"{100 * d['std']:.2f}"
            ci = ("n/a" if math.isnan(d["ci95_low"])
                  else f"[{100 * d['ci95_low']:+.2f}, {100 * d['ci95_high']:+.2f}]")
            out.append(f"| {row['label']} | {100 * a['mean']:.2f} ± {std} | "
                       f"{100 * d['mean']:+.2f} ± {dstd} | {ci} |")
        out.append("")
        # per seed
        out += [f"### Per seed (final accuracy %, Δ vs {m.baseline} in points; † the run collapsed: "
                "accuracy fell to ≤ 15 % after reaching ≥ 40 %, at the round given)", "",
                "| seed | " + " | ".join(m.labels) + " |",
                "|---:|" + "---:|" * len(m.labels)]
        for i, s in enumerate(m.seeds):
            base = m.runs[m.baseline][i].final_accuracy
            cells = []
            for lab in m.labels:
                a = m.runs[lab][i].final_accuracy
                c = collapse_round(m.runs[lab][i])
                mark = "" if c is None else f" †{c}"
                cells.append(f"{100 * a:.2f}{mark}" if lab == m.baseline
                             else f"{100 * a:.2f} ({100 * (a - base):+.2f}){mark}")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        counts = [sum(collapse_round(r) is not None for r in m.runs[lab]) for lab in m.labels]
        out.append("| collapsed | " + " | ".join(f"{c}/{len(m.seeds)}" for c in counts) + " |")
        out.append("")
        # paired difference and upload share
        out += [f"### Paired difference against {m.baseline}, and upload", "",
                f"| run | seeds with Δ ≥ −1 point | mean Δ (points) | 95 % CI of Δ | median Δ | "
                f"upload / {m.baseline} |",
                "|---|---:|---:|---:|---:|---:|"]
        for row in m.summary():
            if row.diff_vs_baseline is None:
                continue
            d = row.diff_vs_baseline
            ok = sum(1 for r in m.per_seed_rows()
                     if r["label"] == row.label and r["accuracy_minus_baseline"] >= -0.01 - 1e-12)
            ci = "n/a" if math.isnan(d.ci95_low) else f"[{100 * d.ci95_low:+.2f}, {100 * d.ci95_high:+.2f}]"
            out.append(f"| {row.label} | {ok}/{d.n} | {100 * d.mean:+.2f} | {ci} | {100 * d.median:+.2f} | "
                       f"{row.upload_fraction.mean:.3f} |")
        out.append("")
        # last round
        out += [f"### Error feedback after round {self.rounds} (mean over seeds [min, max]; each "
                f"seed's value is the mean over its clients)", "",
                "| run | never sent % | residual / gradient norm | residual norm | max abs residual | "
                "residual² on never-sent % | gradient² on never-sent % | top-held never sent % | "
                "top-held also last round % |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def cell(st: Dict[str, float], scale: float = 1.0, fmt: str = ".2f") -> str:
            return (f"{scale * st['mean']:{fmt}} [{scale * st['min']:{fmt}}, "
                    f"{scale * st['max']:{fmt}}]")

        for row in self.final_rows():
            if row["residual_norm"]["max"] == 0:  # error feedback off: no residual
                out.append(f"| {row['label']} | {cell(row['never_sent_fraction'], 100)} | no residual | "
                           f"| | | {cell(row['grad_never_sent_share'], 100)} | | |")
                continue
            out.append(f"| {row['label']} | {cell(row['never_sent_fraction'], 100)} | "
                       f"{cell(row['residual_over_grad'], 1, '.1f')} | "
                       f"{cell(row['residual_norm'], 1, '.1f')} | {cell(row['residual_max_abs'])} | "
                       f"{cell(row['residual_never_sent_share'], 100, '.1f')} | "
                       f"{cell(row['grad_never_sent_share'], 100)} | "
                       f"{cell(row['top_never_sent_fraction'], 100, '.1f')} | "
                       f"{cell(row['top_repeat_fraction'], 100, '.1f')} |")
        out.append("")
        out += ["Across clients (same layout): coordinates the server never received from any "
                "client, % / held back at the top by every client in the last round, %:", ""]
        for row in self.final_rows():
            out.append(f"* {row['label']}: {cell(row['server_never_received_fraction'], 100)} / "
                       f"{cell(row['top_held_by_all_fraction'], 100)}")
        out.append("")
        growth = {lab: self.growth(lab) for lab in self.metrics
                  if any(mm["residual_max_abs"][-1] > 0 for mm in self.metrics[lab])}
        if growth:
            out += ["Straight-line fit of the largest residual entry over the last two thirds of "
                    "the rounds (per seed, then mean [min, max]):", ""]
            for lab, g in growth.items():
                sl, r2 = g["slope_per_100_rounds"], g["r2"]
                out.append(f"* {lab}: rounds {g['rounds'][0]}–{g['rounds'][1]}: "
                           f"{sl['mean']:+.2f} per 100 rounds [{sl['min']:+.2f}, {sl['max']:+.2f}], "
                           f"R² {r2['mean']:.2f} [{r2['min']:.2f}, {r2['max']:.2f}]")
            out.append("")
        # milestones
        n = self.rounds
        marks = sorted({r for r in (1, 10, 30, 60, 100, 150, 200, 300) if r <= n} | {n})
        out += ["### Over the rounds (mean over seeds)", "",
                "| run | metric | " + " | ".join(f"round {r}" for r in marks) + " |",
                "|---|---|" + "---:|" * len(marks)]
        show = (("never_sent_fraction", "never sent %", 100, ".1f"),
                ("residual_over_grad", "residual / gradient", 1, ".1f"),
                ("residual_max_abs", "max abs residual", 1, ".2f"),
                ("residual_never_sent_share", "residual² on never-sent %", 100, ".1f"),
                ("top_repeat_fraction", "top-held also last round %", 100, ".1f"))
        for lab in self.metrics:
            for key, name, scale, fmt in show:
                mean = self.curve(lab, key)[0]
                if key != "never_sent_fraction" and not any(v > 0 for v in mean):
                    continue  # error feedback off: no residual
                vals = " | ".join(f"{scale * mean[r - 1]:{fmt}}" for r in marks)
                out.append(f"| {lab} | {name} | {vals} |")
        return "\n".join(out)


def ef_gap_study(base: Optional[SimConfig] = None, seeds: Iterable[int] = range(5), *,
                 variants: Sequence[Tuple[str, str, Dict[str, Any]]] = EF_GAP_VARIANTS,
                 progress: bool = True) -> EFGapStudy:
    """Run the study: every variant on every seed (seeds in sequence), with diagnostics on
    the DGP runs.

    Args:
        base: the configuration (default ``SimConfig(threads=1)``: digits, convnet_small,
            10 clients, 150 rounds, FedSGD); its ``defense``, ``defense_params``,
            ``diagnostics`` and ``seed`` are replaced per run.
        seeds: ints >= 0.
        variants: ``(label, defense, defense_params)``; the first ``none`` is the baseline.
            Only ``dgp``/``topk`` runs get diagnostics (they have a residual).
        progress: a tqdm bar per run.
    """
    base = SimConfig(threads=1) if base is None else base
    if not isinstance(base, SimConfig):
        raise TypeError(f"base must be a SimConfig, got {type(base).__name__}")
    configs, labels = [], []
    for label, defense, params in variants:
        configs.append(dataclasses.replace(base, defense=defense, defense_params=dict(params),
                                           diagnostics=defense in ("dgp", "topk")))
        labels.append(label)
    multi = simulate_seeds(configs, seeds, labels=labels, progress=progress)
    metrics = {lab: [ef_gap_metrics(r) for r in multi.runs[lab]]
               for lab, cfg in zip(labels, configs) if cfg.diagnostics}
    return EFGapStudy(multi=multi, metrics=metrics)


def write_ef_gap(study: EFGapStudy, out_dir: str, *, runs: bool = False,
                 extra: Optional[Dict[str, Any]] = None, digits: int = 5) -> Dict[str, str]:
    """Write ``ef_gap.md``, ``ef_gap.json`` (compact, see :meth:`EFGapStudy.to_dict`; plus
    ``extra``, e.g. the environment; curves to ``digits`` significant digits) and
    ``ef_gap.png``; with ``runs`` also every run's
    JSON/CSV and the multi-seed summary under ``out_dir/runs``. Returns ``name -> path``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"md": os.path.join(out_dir, "ef_gap.md"), "json": os.path.join(out_dir, "ef_gap.json"),
             "png": os.path.join(out_dir, "ef_gap.png")}
    with open(paths["md"], "w") as f:
        f.write(study.markdown() + "\n")
    d = study.to_dict(digits)
    if extra:
        d["environment"] = extra
    with open(paths["json"], "w") as f:
        json.dump(d, f, separators=(",", ":"))
    plot_ef_gap(study, paths["png"])
    if runs:
        study.multi.write(os.path.join(out_dir, "runs"), plots=False)  # ef_gap.png has the curves
    return paths


def plot_ef_gap(study: EFGapStudy, path: str) -> str:
    """One PNG, four panels: accuracy (mean, min-max band over seeds) of every run; for the
    DGP runs the never-sent fraction, the residual / gradient norm ratio (log) and the
    largest residual entry vs round. Needs matplotlib."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100)
    colors: Dict[str, str] = {}
    ax = axes[0][0]
    for lab in study.multi.labels:
        xs, mean, lo, hi = seed_curves(study.multi.runs[lab], "test_accuracy")
        line, = ax.plot(xs, [100 * v for v in mean], label=lab, linewidth=1.3)
        colors[lab] = line.get_color()
        ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy (mean, min-max over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    panels = ((axes[0][1], "never_sent_fraction", 100.0, "coordinates never sent so far (%)", False),
              (axes[1][0], "residual_over_grad", 1.0, "residual norm / gradient norm", True),
              (axes[1][1], "residual_max_abs", 1.0, "largest |residual| entry", False))
    for ax, key, scale, title, logy in panels:
        for lab in study.metrics:
            mean, lo, hi = study.curve(lab, key)
            if key != "never_sent_fraction" and not any(v > 0 for v in mean):
                continue  # no residual (error feedback off)
            xs = list(range(1, len(mean) + 1))
            ax.plot(xs, [scale * v for v in mean], label=lab, color=colors.get(lab), linewidth=1.3)
            ax.fill_between(xs, [scale * v for v in lo], [scale * v for v in hi],
                            color=colors.get(lab), alpha=0.15, linewidth=0)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title + " (mean over clients; band: seeds)", fontsize=9)
        ax.legend(fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
    cfg = study.multi.runs[study.multi.labels[0]][0].config
    fig.suptitle(f"EF gap study: {cfg.algorithm} {cfg.dataset} {cfg.model}, {cfg.clients} clients, "
                 f"seeds {study.multi.seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
