"""The top-band error-feedback policy study: every ``top_feedback`` policy of ``dgp``
against ``none`` and the authors' DGP, on the same seeds, at the same upload bytes.

Runs, per seed (paired): ``none``; ``dgp`` with each ``top_feedback`` policy (``full`` is
the authors' DGP); ``dgp top=0`` (the same band width without the top cut: top-k with
error feedback, the reference the top cut is paid against); ``adgp`` (its default
``positions="fresh"``). Every DGP/ADGP run records the simulator's diagnostics (share of
coordinates never sent, residual norms, largest residual entry, what the policy dropped).

The runs are written one JSON per (variant, seed) under ``<out>/runs`` as they finish, and
a run whose JSON is there is not run again: the study can be stopped and resumed, or
extended with more seeds, and the table is built from the seeds every variant completed.

    python bench/bench_sim.py --study ef-policies --seeds 10 --lr 0.05   # -> bench/results/ef_policies

Written: ``ef_policies.md`` (the headline table against ``none`` and against the authors'
DGP, then the error-feedback tables of the gap study), ``ef_policies.json`` and
``ef_policies.png`` (accuracy curves, share never sent, residual growth, dropped mass,
cumulative upload).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from dgp_kernels.optional import pyplot
from dgp_kernels.sim import MultiSeedResult, SimConfig, SimResult, simulate
from dgp_kernels.sim.multiseed import describe, file_stem
from dgp_kernels.sim.results import seed_curves

from .efgap import EFGapStudy, collapse_round, ef_gap_metrics

__all__ = ["EF_POLICY_VARIANTS", "run_policy_study", "load_policy_study", "policy_rows",
           "policy_markdown", "write_ef_policies", "plot_ef_policies"]

#: (label, defense, defense_params) of the study's runs, in order; ``none`` is the baseline
#: and ``dgp full`` the reference of the "against DGP" columns.
EF_POLICY_VARIANTS: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("none", "none", {}),
    ("dgp full", "dgp", {}),
    ("dgp clipped", "dgp", {"top_feedback": "clipped"}),
    ("dgp floor", "dgp", {"top_feedback": "floor"}),
    ("dgp drop", "dgp", {"top_feedback": "drop"}),
    ("dgp top=0", "dgp", {"top": 0.0}),
    ("adgp", "adgp", {}),
)

REFERENCE = "dgp full"
_DIAGNOSED = ("dgp", "adgp", "topk")


def _run_path(out_dir: str, label: str, seed: int) -> str:
    return os.path.join(out_dir, "runs", f"{file_stem(label)}-seed{seed}.json")


def run_policy_study(base: SimConfig, seeds: Iterable[int], out_dir: str, *,
                     variants: Sequence[Tuple[str, str, Dict[str, Any]]] = EF_POLICY_VARIANTS,
                     progress: bool = True,
                     log: Optional[Callable[[str], None]] = None) -> List[str]:
    """Run every variant on every seed (seed-major, so an interrupted study leaves whole
    seeds), skipping runs already written. Returns the paths written this call.

    ``base``'s ``defense``, ``defense_params``, ``diagnostics`` and ``seed`` are replaced per
    run; diagnostics are on for the runs with a residual (``dgp``, ``adgp``, ``topk``).
    """
    if not isinstance(base, SimConfig):
        raise TypeError(f"base must be a SimConfig, got {type(base).__name__}")
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    written = []
    for seed in seeds:
        for label, defense, params in variants:
            path = _run_path(out_dir, label, seed)
            if os.path.exists(path):
                continue
            cfg = dataclasses.replace(base, defense=defense, defense_params=dict(params),
                                      diagnostics=defense in _DIAGNOSED, seed=int(seed))
            res = simulate(cfg, progress=progress, desc=f"{label} s{seed}")
            tmp = path + ".tmp"
            res.to_json(tmp)
            os.replace(tmp, path)
            written.append(path)
            if log is not None:
                log(f"seed {seed} {label}: final {100 * res.final_accuracy:.2f} %, "
                    f"{res.wall_s:.1f} s")
    return written


def load_policy_study(out_dir: str, variants: Sequence[Tuple[str, str, Dict[str, Any]]]
                      = EF_POLICY_VARIANTS, seeds: Optional[Iterable[int]] = None) -> EFGapStudy:
    """The study from the runs under ``out_dir/runs``: the seeds (of ``seeds``, default
    all found) for which every variant has a run, in ascending order."""
    labels = [v[0] for v in variants]
    found = None
    for lab in labels:
        have = set()
        stem = file_stem(lab) + "-seed"
        runs_dir = os.path.join(out_dir, "runs")
        for name in os.listdir(runs_dir) if os.path.isdir(runs_dir) else []:
            if name.startswith(stem) and name.endswith(".json") and name[len(stem):-5].isdigit():
                have.add(int(name[len(stem):-5]))
        found = have if found is None else found & have
    complete = sorted(found or ())
    if seeds is not None:
        complete = [s for s in complete if s in set(seeds)]
    if not complete:
        raise ValueError(f"no seed has a run of every variant under {out_dir}/runs")
    multi = MultiSeedResult(labels=labels, seeds=complete, baseline=labels[0])
    for lab in labels:
        multi.runs[lab] = [SimResult.from_json(_run_path(out_dir, lab, s)) for s in complete]
    metrics = {lab: [ef_gap_metrics(r) for r in multi.runs[lab]]
               for lab in labels if multi.runs[lab][0].config.diagnostics}
    return EFGapStudy(multi=multi, metrics=metrics)


def _stats(xs: Iterable[float]) -> Dict[str, float]:
    return dataclasses.asdict(describe(xs))


def policy_rows(study: EFGapStudy, reference: str = REFERENCE) -> List[Dict[str, Any]]:
    """Per run: final accuracy over seeds; the paired difference to the baseline and to
    ``reference`` (the authors' DGP); the share of the reference's gap to the baseline
    that the run closes (``mean(acc - acc_ref) / mean(acc_base - acc_ref)``); upload
    relative to the baseline and to the reference (per seed); the last round's share of
    coordinates never sent, largest residual entry, the L1 the policy dropped over the
    run, and the share of each round's ``k_top`` largest gradient entries per layer that
    were sent that round anyway (mean over rounds); collapsed seeds."""
    m = study.multi
    base = [r.final_accuracy for r in m.runs[m.baseline]]
    ref = [r.final_accuracy for r in m.runs[reference]] if reference in m.runs else None
    ref_up = [r.total_upload_bytes for r in m.runs[reference]] if ref else None
    gap = None if ref is None else math.fsum(b - r for b, r in zip(base, ref)) / len(base)
    rows = []
    for lab in m.labels:
        runs = m.runs[lab]
        acc = [r.final_accuracy for r in runs]
        row: Dict[str, Any] = {"label": lab, "defense": runs[0].config.defense,
                               "defense_params": dict(runs[0].config.defense_params),
                               "seeds": list(m.seeds), "accuracy": _stats(acc), "per_seed": acc}
        row["diff_vs_baseline"] = None if lab == m.baseline else _stats(a - b for a, b in zip(acc, base))
        if ref is not None and lab != reference:
            d = [a - r for a, r in zip(acc, ref)]
            row["diff_vs_reference"] = _stats(d)
            row["gap_closed"] = (math.fsum(d) / len(d)) / gap if gap else math.nan
            row["upload_vs_reference"] = _stats(r.total_upload_bytes / u for r, u in zip(runs, ref_up))
        base_up = [r.total_upload_bytes for r in m.runs[m.baseline]]
        row["upload_vs_baseline"] = _stats(r.total_upload_bytes / u for r, u in zip(runs, base_up))
        row["collapsed"] = sum(collapse_round(r) is not None for r in runs)
        if lab in study.metrics:
            per = study.metrics[lab]
            row["never_sent_fraction"] = _stats(x["never_sent_fraction"][-1] for x in per)
            row["residual_max_abs"] = _stats(x["residual_max_abs"][-1] for x in per)
            row["fresh_top_sent"] = _stats(math.fsum(x["fresh_top_sent_fraction"]) / len(x["fresh_top_sent_fraction"])
                                           for x in per)
            row["dropped_l1"] = _stats(math.fsum(r.get("top_dropped_l1", 0.0) for r in run.rounds)
                                       for run in runs)
        rows.append(row)
    return rows


def _ci(d: Dict[str, float]) -> str:
    if math.isnan(d["ci95_low"]):
        return f"{100 * d['mean']:+.2f}"
    return f"{100 * d['mean']:+.2f} [{100 * d['ci95_low']:+.2f}, {100 * d['ci95_high']:+.2f}]"


def policy_markdown(study: EFGapStudy, reference: str = REFERENCE) -> str:
    """The headline table (see :func:`policy_rows`), per-seed accuracies, then the gap
    study's tables (last-10-round accuracy, error-feedback state, milestones)."""
    m = study.multi
    rows = policy_rows(study, reference)
    out = [f"### Final accuracy, paired over seeds {m.seeds} ({len(m.seeds)} seeds)", "",
           f"Δ in points, mean [95 % t-interval]; gap closed = mean(acc − acc_{{{reference}}}) / "
           f"mean(acc_{{{m.baseline}}} − acc_{{{reference}}}); upload per seed (mean [min, max]).", "",
           f"| run | final acc. % (mean ± std) | Δ vs {m.baseline} | Δ vs {reference} | gap closed | "
           f"upload / {m.baseline} | upload / {reference} | never sent % | max \\|residual\\| | "
           f"L1 dropped (run) | fresh top sent % | collapsed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r["accuracy"]
        std = "n/a" if math.isnan(a["std"]) else f"{100 * a['std']:.2f}"
        dv = "" if r["diff_vs_baseline"] is None else _ci(r["diff_vs_baseline"])
        dr = _ci(r["diff_vs_reference"]) if "diff_vs_reference" in r else ""
        gc = "" if "gap_closed" not in r or math.isnan(r["gap_closed"]) else f"{100 * r['gap_closed']:+.0f} %"
        ub = r["upload_vs_baseline"]
        ur = r.get("upload_vs_reference")
        urs = "" if ur is None else f"{ur['mean']:.4f} [{ur['min']:.4f}, {ur['max']:.4f}]"
        ns = f"{100 * r['never_sent_fraction']['mean']:.1f}" if "never_sent_fraction" in r else ""
        mx = f"{r['residual_max_abs']['mean']:.2f}" if "residual_max_abs" in r else ""
        dl = f"{r['dropped_l1']['mean']:.3g}" if "dropped_l1" in r else ""
        fs = (f"{100 * r['fresh_top_sent']['mean']:.1f}"
              if "fresh_top_sent" in r and r["defense_params"].get("top", 1.0) != 0.0 and r["defense"] == "dgp" else "")
        out.append(f"| {r['label']} | {100 * a['mean']:.2f} ± {std} | {dv} | {dr} | {gc} | "
                   f"{ub['mean']:.3f} | {urs} | {ns} | {mx} | {dl} | {fs} | {r['collapsed']}/{len(m.seeds)} |")
    out += ["", "Per seed (final accuracy %):", "",
            "| seed | " + " | ".join(m.labels) + " |", "|---:|" + "---:|" * len(m.labels)]
    for i, s in enumerate(m.seeds):
        out.append(f"| {s} | " + " | ".join(f"{100 * m.runs[lab][i].final_accuracy:.2f}"
                                           for lab in m.labels) + " |")
    out += ["", study.markdown()]
    return "\n".join(out)


def write_ef_policies(study: EFGapStudy, out_dir: str, *, extra: Optional[Dict[str, Any]] = None,
                      digits: int = 5) -> Dict[str, str]:
    """Write ``ef_policies.md``, ``ef_policies.json`` (the rows of :func:`policy_rows`, the
    gap study's dict, ``extra``) and ``ef_policies.png``. Returns ``name -> path``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"ef_policies.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(policy_markdown(study) + "\n")
    d = {"policies": policy_rows(study), "study": study.to_dict(digits)}
    if extra:
        d["environment"] = extra
    with open(paths["json"], "w") as f:
        json.dump(d, f, separators=(",", ":"), default=lambda x: None)
    plot_ef_policies(study, paths["png"])
    return paths


def plot_ef_policies(study: EFGapStudy, path: str) -> str:
    """One PNG, six panels: accuracy (mean, min-max over seeds); for the runs with a
    residual the share of coordinates never sent, the residual / gradient norm (log), the
    largest residual entry and the L1 dropped per round; the cumulative upload of every
    run (MB). Needs matplotlib."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), dpi=100)
    colors: Dict[str, str] = {}
    ax = axes[0][0]
    for lab in study.multi.labels:
        xs, mean, lo, hi = seed_curves(study.multi.runs[lab], "test_accuracy")
        line, = ax.plot(xs, [100 * v for v in mean], label=lab, linewidth=1.3)
        colors[lab] = line.get_color()
        ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=line.get_color(),
                        alpha=0.12, linewidth=0)
    ax.set_ylim(0, 100)
    ax.set_title("test accuracy % (mean, min-max over seeds)", fontsize=9)
    panels = ((axes[0][1], "never_sent_fraction", 100.0, "coordinates never sent so far (%)", False),
              (axes[0][2], "residual_over_grad", 1.0, "residual norm / gradient norm", True),
              (axes[1][0], "residual_max_abs", 1.0, "largest |residual| entry", False),
              (axes[1][1], "top_dropped_l1", 1.0, "L1 dropped by the policy per round", False))
    for ax, key, scale, title, logy in panels:
        for lab in study.metrics:
            mean, lo, hi = study.curve(lab, key)
            if key != "never_sent_fraction" and not any(v > 0 for v in mean):
                continue
            xs = list(range(1, len(mean) + 1))
            ax.plot(xs, [scale * v for v in mean], label=lab, color=colors.get(lab), linewidth=1.3)
            ax.fill_between(xs, [scale * v for v in lo], [scale * v for v in hi],
                            color=colors.get(lab), alpha=0.12, linewidth=0)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title + " (mean over clients; band: seeds)", fontsize=9)
    ax = axes[1][2]
    for lab in study.multi.labels:
        runs = study.multi.runs[lab]
        n = min(len(r.rounds) for r in runs)
        cum, tot = [], 0.0
        for i in range(n):
            tot += math.fsum(r.rounds[i]["upload_bytes"] for r in runs) / len(runs)
            cum.append(tot / 1e6)
        ax.plot(range(1, n + 1), cum, label=lab, color=colors.get(lab), linewidth=1.3)
    ax.set_yscale("log")
    ax.set_title("cumulative upload, all clients (MB, mean over seeds)", fontsize=9)
    for row in axes:
        for a in row:
            a.set_xlabel("round")
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
    cfg = study.multi.runs[study.multi.labels[0]][0].config
    fig.suptitle(f"top-band EF policies: {cfg.algorithm} {cfg.dataset} {cfg.model}, {cfg.clients} "
                 f"clients, lr {cfg.lr}, {cfg.split}, seeds {study.multi.seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
