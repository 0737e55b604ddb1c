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

from .efgap import (EFGapStudy, collapse_round, ef_gap_metrics, plot_accuracy_panel,
                    plot_metric_panels, save_figure)

__all__ = ["EF_POLICY_VARIANTS", "run_policy_study", "load_policy_study", "policy_rows",
           "policy_markdown", "write_ef_policies", "plot_ef_policies", "cell_name", "policy_matrix",
           "policy_matrix_markdown", "plot_policy_matrix", "write_policy_matrix"]

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
                      = EF_POLICY_VARIANTS, seeds: Optional[Iterable[int]] = None,
                      rounds: Optional[int] = None) -> EFGapStudy:
    """The study from the runs under ``out_dir/runs``: the seeds (of ``seeds``, default
    all found) for which every variant has a run, in ascending order. With ``rounds``,
    every run is cut after that many rounds (:meth:`SimResult.prefix`: exactly the runs a
    ``rounds``-round study gives, so one 300-round study also gives the 150-round table)."""
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
        runs = [SimResult.from_json(_run_path(out_dir, lab, s)) for s in complete]
        multi.runs[lab] = runs if rounds is None else [r.prefix(rounds) for r in runs]
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
    return _write_md_json_png(out_dir, "ef_policies", policy_markdown(study),
                              {"policies": policy_rows(study), "study": study.to_dict(digits)},
                              extra, lambda path: plot_ef_policies(study, path))


def _write_md_json_png(out_dir: str, stem: str, markdown: str, d: Dict[str, Any],
                       extra: Optional[Dict[str, Any]], plot) -> Dict[str, str]:
    """``<stem>.md`` (the markdown), ``<stem>.json`` (``d``, plus ``environment`` when
    ``extra`` is given) and ``<stem>.png`` (``plot(path)``) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{stem}.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(markdown + "\n")
    if extra:
        d["environment"] = extra
    with open(paths["json"], "w") as f:
        json.dump(d, f, separators=(",", ":"), default=lambda x: None)
    plot(paths["png"])
    return paths


def plot_ef_policies(study: EFGapStudy, path: str) -> str:
    """One PNG, six panels: accuracy (mean, min-max over seeds); for the runs with a
    residual the share of coordinates never sent, the residual / gradient norm (log), the
    largest residual entry and the L1 dropped per round; the cumulative upload of every
    run (MB). Needs matplotlib."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), dpi=100)
    colors = plot_accuracy_panel(axes[0][0], study, alpha=0.12)
    axes[0][0].set_title("test accuracy % (mean, min-max over seeds)", fontsize=9)
    plot_metric_panels(
        ((axes[0][1], "never_sent_fraction", 100.0, "coordinates never sent so far (%)", False),
         (axes[0][2], "residual_over_grad", 1.0, "residual norm / gradient norm", True),
         (axes[1][0], "residual_max_abs", 1.0, "largest |residual| entry", False),
         (axes[1][1], "top_dropped_l1", 1.0, "L1 dropped by the policy per round", False)),
        study, colors, alpha=0.12)
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
    cfg = study.multi.runs[study.multi.labels[0]][0].config
    return save_figure(plt, fig, path, f"top-band EF policies: {cfg.algorithm} {cfg.dataset} {cfg.model}, "
                       f"{cfg.clients} clients, lr {cfg.lr}, {cfg.split}, seeds {study.multi.seeds}")


# --------------------------------------------------------------------------------------
# The matrix: every cell (split x lr x rounds) of the study side by side
# --------------------------------------------------------------------------------------
def cell_name(study: EFGapStudy) -> str:
    """``"IID, lr 0.05, 150 rounds"`` / ``"Dirichlet(0.3), ..."`` from the runs' config."""
    cfg = study.multi.runs[study.multi.labels[0]][0].config
    split = "IID" if cfg.split == "iid" else f"Dirichlet({cfg.alpha:g})"
    return f"{split}, lr {cfg.lr:g}, {cfg.rounds} rounds"


#: (key in a :func:`policy_rows` row, title, format) of the matrix's tables.
_MATRIX_TABLES = (
    ("accuracy", "Final accuracy % (mean ± std over seeds)", "acc"),
    ("diff_vs_baseline", "Δ vs none, points (paired mean [95 % t-interval])", "ci"),
    ("diff_vs_reference", f"Δ vs {REFERENCE} (the authors' DGP), points (paired mean [95 % t-interval])", "ci"),
    ("never_sent_fraction", "Coordinates never sent after the last round, % (mean over seeds and clients)", "pct"),
    ("residual_max_abs", "Largest |residual| entry after the last round (mean over seeds)", "num"),
    ("upload_vs_baseline", "Upload / none (mean over seeds)", "ratio"),
    ("collapsed", "Seeds that collapsed (fell to ≤ 15 % after reaching ≥ 40 %)", "count"),
)


def policy_matrix(cells: Sequence[EFGapStudy]) -> List[Dict[str, Any]]:
    """One entry per cell: its name, seeds and :func:`policy_rows` (by label)."""
    out = []
    for st in cells:
        out.append({"cell": cell_name(st), "seeds": list(st.multi.seeds),
                    "rows": {r["label"]: r for r in policy_rows(st)}})
    return out


def policy_matrix_markdown(cells: Sequence[EFGapStudy]) -> str:
    """The matrix as markdown: one table per quantity (:data:`_MATRIX_TABLES`), a row per
    cell (with its seed count), a column per variant."""
    mat = policy_matrix(cells)
    labels: List[str] = []
    for c in mat:
        labels += [lab for lab in c["rows"] if lab not in labels]
    out: List[str] = []
    for key, title, fmt in _MATRIX_TABLES:
        out += [f"### {title}", "", "| cell | seeds | " + " | ".join(labels) + " |",
                "|---|---:|" + "---:|" * len(labels)]
        for c in mat:
            vals = []
            for lab in labels:
                r = c["rows"].get(lab)
                v = None if r is None else r.get(key)
                if v is None:
                    vals.append("")
                elif fmt == "acc":
                    std = "n/a" if math.isnan(v["std"]) else f"{100 * v['std']:.2f}"
                    vals.append(f"{100 * v['mean']:.2f} ± {std}")
                elif fmt == "ci":
                    vals.append(_ci(v))
                elif fmt == "pct":
                    vals.append(f"{100 * v['mean']:.1f}")
                elif fmt == "num":
                    vals.append(f"{v['mean']:.2f}")
                elif fmt == "ratio":
                    vals.append(f"{v['mean']:.4f}")
                else:
                    vals.append(f"{v}/{len(c['seeds'])}")
            out.append(f"| {c['cell']} | {len(c['seeds'])} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def plot_policy_matrix(cells: Sequence[EFGapStudy], path: str) -> str:
    """One PNG, a panel per cell: final accuracy per variant (bar: mean over seeds, dots:
    the seeds). Needs matplotlib."""
    plt = pyplot()
    n = len(cells)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), dpi=100, squeeze=False)
    for i, st in enumerate(cells):
        ax = axes[i // cols][i % cols]
        labels = st.multi.labels
        for j, lab in enumerate(labels):
            accs = [100 * r.final_accuracy for r in st.multi.runs[lab]]
            ax.bar(j, math.fsum(accs) / len(accs), color=f"C{j}", alpha=0.6)
            ax.plot([j] * len(accs), accs, "k.", markersize=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"{cell_name(st)} ({len(st.multi.seeds)} seeds)", fontsize=8)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].set_ylabel("final test accuracy % (bar: mean, dots: seeds)")
    fig.suptitle("top-band EF policies: every cell of the study", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_policy_matrix(cells: Sequence[EFGapStudy], out_dir: str, *,
                        extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Write ``ef_matrix.md``, ``ef_matrix.json`` (:func:`policy_matrix`, ``extra``) and
    ``ef_matrix.png`` to ``out_dir``. Returns ``name -> path``."""
    if not cells:
        raise ValueError("cells must hold at least one study")
    return _write_md_json_png(out_dir, "ef_matrix", policy_matrix_markdown(cells),
                              {"cells": policy_matrix(cells)}, extra,
                              lambda path: plot_policy_matrix(cells, path))
