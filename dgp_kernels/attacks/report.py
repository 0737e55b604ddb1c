"""The evaluation report: markdown tables, image grids and the privacy-utility-communication plot.

:func:`write_report` writes into one directory:

* ``report.md`` — the run (machine, torch, threads, device, times, budgets), a summary table
  per defense (upload bytes, best attack and its leakage, iDLG label accuracy, test accuracy
  from the simulator), the full defense x attack table (means over the images of PSNR, floor,
  leakage = PSNR - floor, SSIM, label accuracy, seconds), the figures, and the definitions;
* ``results.json`` / ``results.csv`` — every record (:meth:`EvalResult.to_json` / ``to_csv``);
* ``grid_<image>.png`` — per target image: the original, then one row per defense with the
  reconstruction of every attack (blank where an attack did not run on that defense);
* ``privacy_utility.png`` — leakage of the best attack against upload bytes and, when the
  simulator ran, against test accuracy.

Plots use matplotlib's Agg backend (no display needed), imported only here.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..optional import pyplot
from .runner import PSNR_CAP_DB, EvalResult

__all__ = ["ReportPaths", "format_summary", "summary_rows", "write_report"]


@dataclass
class ReportPaths:
    """Files written by :func:`write_report`."""

    directory: str
    report: str
    json: str
    csv: str
    images: List[str] = field(default_factory=list)


def _fmt(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def summary_rows(result: EvalResult) -> List[Dict[str, object]]:
    """One dict per defense: upload bytes (and / dense), best attack, its mean PSNR, floor,
    leakage and SSIM, the best passive attack (no malicious server) and its leakage, the iDLG
    label accuracy and (when the simulator ran) test accuracy."""
    util = {u.defense: u for u in (result.utility or [])}
    rows = []
    for d in result.defenses:
        best = result.best_attack(d.defense)
        passive = result.best_attack(d.defense, passive=True)
        u = util.get(d.defense)
        rows.append({
            "defense": d.defense,
            "upload_bytes": d.upload_bytes,
            "upload_ratio": d.upload_bytes / d.dense_bytes if d.dense_bytes else float("nan"),
            "best_attack": best,
            "psnr": result.mean(d.defense, best, "psnr") if best else float("nan"),
            "floor": result.mean(d.defense, best, "floor") if best else float("nan"),
            "leakage": result.mean(d.defense, best, "leakage") if best else float("nan"),
            "ssim": result.mean(d.defense, best, "ssim") if best else float("nan"),
            "best_passive": passive,
            "passive_leakage": result.mean(d.defense, passive, "leakage") if passive else float("nan"),
            "idlg_label_acc": d.idlg_label_acc,
            "test_accuracy": u.final_accuracy if u else float("nan"),
            "train_upload_ratio": (u.upload_bytes_per_round / u.dense_bytes
                                   if u and u.dense_bytes else float("nan")),
        })
    return rows


def _summary_table(result: EvalResult) -> List[str]:
    lines = [
        "| defense | upload / gradient | best attack | PSNR dB | floor dB | leakage dB | SSIM "
        "| best passive attack: leakage dB | iDLG label acc | test acc (sim) | sim upload / dense |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in summary_rows(result):
        lines.append(
            f"| `{r['defense']}` | {_bytes(r['upload_bytes'])} ({_pct(r['upload_ratio'])}) "
            f"| {r['best_attack'] or '–'} | {_fmt(r['psnr'])} | {_fmt(r['floor'])} "
            f"| **{_fmt(r['leakage'])}** | {_fmt(r['ssim'], 3)} "
            f"| {r['best_passive'] or '–'}: {_fmt(r['passive_leakage'])} | {_pct(r['idlg_label_acc'])} "
            f"| {_pct(r['test_accuracy'])} | {_pct(r['train_upload_ratio'])} |"
        )
    return lines


def _full_table(result: EvalResult) -> List[str]:
    lines = [
        "| defense | attack | PSNR dB | floor dB | leakage dB | SSIM | label acc | labels | s / image |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for d, atks in result.config.grid:
        best = result.best_attack(d)
        for a in atks:
            rows = [r for r in result.attacks if r.defense == d and r.attack == a]
            if not rows:
                continue
            src = sorted({r.label_source for r in rows})
            name = f"**{a}**" if a == best else a
            lines.append(
                f"| `{d}` | {name} | {_fmt(result.mean(d, a, 'psnr'))} | {_fmt(result.mean(d, a, 'floor'))} "
                f"| {_fmt(result.mean(d, a, 'leakage'))} | {_fmt(result.mean(d, a, 'ssim'), 3)} "
                f"| {_pct(result.mean(d, a, 'label_correct'))} | {'/'.join(src)} "
                f"| {_fmt(result.mean(d, a, 'seconds'))} |"
            )
    return lines


def format_summary(result: EvalResult) -> str:
    """A short plain-text table for the terminal: per defense, upload share, the best attack
    and its PSNR/floor/leakage/SSIM, the best passive attack's leakage, iDLG label accuracy
    and test accuracy (``–`` when not measured)."""
    rows = summary_rows(result)
    w = max([len("defense")] + [len(r["defense"]) for r in rows])
    aw = max([len("best attack")] + [len(str(r["best_attack"])) for r in rows])
    pw = max([len("best passive")] + [len(str(r["best_passive"])) for r in rows])
    head = (f"{'defense':<{w}}  {'upload':>6}  {'best attack':<{aw}}  {'PSNR':>6}  {'floor':>6}  "
            f"{'leak':>6}  {'SSIM':>6}  {'best passive':<{pw}}  {'leak':>6}  {'iDLG lbl':>8}  {'test acc':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['defense']:<{w}}  {_pct(r['upload_ratio']):>6}  {str(r['best_attack']):<{aw}}  "
            f"{_fmt(r['psnr']):>6}  {_fmt(r['floor']):>6}  {_fmt(r['leakage']):>6}  "
            f"{_fmt(r['ssim'], 3):>6}  {str(r['best_passive']):<{pw}}  {_fmt(r['passive_leakage']):>6}  "
            f"{_pct(r['idlg_label_acc']):>8}  {_pct(r['test_accuracy']):>8}"
        )
    return "\n".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def _import_pyplot():
    return pyplot("the report figures")


def _to_hwc(img):
    """``[C, H, W]`` tensor -> numpy ``[H, W, 3]`` (or ``[H, W]`` for one channel)."""
    a = img.detach().float().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def write_image_grids(result: EvalResult, directory: str) -> List[str]:
    """One PNG per target image: rows are defenses, the first column the original, then one
    column per attack, each titled with its PSNR. Returns the file paths."""
    plt = _import_pyplot()
    attacks: List[str] = []
    for _, atks in result.config.grid:
        for a in atks:
            if a not in attacks:
                attacks.append(a)
    defenses = [d for d, _ in result.config.grid]
    paths = []
    rec_by = {(r.defense, r.attack, r.image): r for r in result.attacks}
    images = sorted({r.image for r in result.attacks})
    for i in images:
        target = result.targets.images[i]
        cols = 1 + len(attacks)
        fig, axes = plt.subplots(len(defenses), cols, figsize=(1.25 * cols + 1.2, 1.3 * len(defenses) + 0.4),
                                 squeeze=False)
        cmap = "gray" if target.shape[0] == 1 else None
        for r_i, d in enumerate(defenses):
            for c_i in range(cols):
                ax = axes[r_i][c_i]
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if c_i == 0:
                    ax.imshow(_to_hwc(target), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                    ax.set_ylabel(d, rotation=0, ha="right", va="center", fontsize=7)
                    if r_i == 0:
                        ax.set_title("original", fontsize=7)
                    continue
                a = attacks[c_i - 1]
                if r_i == 0:
                    ax.set_title(a, fontsize=7)
                rec = result.reconstructions.get((d, a))
                row = rec_by.get((d, a, i))
                if rec is None or row is None:
                    continue
                ax.imshow(_to_hwc(rec[i]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xlabel(f"{row.psnr:.1f} dB", fontsize=6, labelpad=1)
        fig.suptitle(f"{result.targets.names[i]} (label {int(result.targets.labels[i])}): "
                     "reconstruction per defense (rows) and attack (columns), PSNR", fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        path = os.path.join(directory, f"grid_{i:02d}_{_slug(result.targets.names[i])}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_tradeoff_plot(result: EvalResult, directory: str) -> str:
    """``privacy_utility.png``: best-attack leakage (dB above the floor; hollow markers: the
    best passive attack where an active one wins) against the upload size of one gradient
    relative to dense float32 and, when the simulator ran, against the test accuracy it
    reached. Returns the path."""
    plt = _import_pyplot()
    rows = summary_rows(result)
    with_util = result.utility is not None
    fig, axes = plt.subplots(1, 2 if with_util else 1, figsize=(10 if with_util else 5.5, 4.2), squeeze=False)
    markers = "osD^vP*Xhp<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def style(i: int):
        return markers[i % len(markers)], colors[i % len(colors)]

    def draw(ax, xs) -> None:
        for i, (r, x) in enumerate(zip(rows, xs)):
            if x is None or math.isnan(x):
                continue
            m, c = style(i)
            ax.scatter(x, r["leakage"], marker=m, color=c, s=45,
                       label=f"{r['defense']} (best: {r['best_attack']})")
            if r["best_passive"] and r["best_passive"] != r["best_attack"]:
                ax.scatter(x, r["passive_leakage"], marker=m, facecolors="none", edgecolors=c, s=45)
        ax.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("leakage, dB above the mean-colour floor")

    ax = axes[0][0]
    draw(ax, [100 * r["upload_ratio"] for r in rows])
    ax.set_xlabel("upload per gradient, % of dense float32 (real encoded bytes)")
    ax.set_title("privacy vs communication (hollow: best passive attack)", fontsize=9)
    if with_util:
        ax = axes[0][1]
        draw(ax, [100 * r["test_accuracy"] for r in rows])
        u = result.utility[0]
        ax.set_xlabel(f"test accuracy after {u.rounds} FedSGD rounds, % ({u.model} on {u.dataset}, "
                      f"{u.clients} clients)")
        ax.set_title("privacy vs utility", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    path = os.path.join(directory, "privacy_utility.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _budget_line(result: EvalResult) -> str:
    parts = []
    for a, p in sorted(result.config.attack_params.items()):
        parts.append(f"{a} " + (", ".join(f"{k}={v}" for k, v in sorted(p.items())) or "analytic"))
    return "; ".join(parts)


def write_report(result: EvalResult, directory: str, *, figures: bool = True,
                 progress: bool = False) -> ReportPaths:
    """Write ``report.md``, ``results.json``, ``results.csv`` and (``figures``) the PNGs into
    ``directory`` (created if missing). Returns the paths."""
    del progress  # writing is fast; kept for symmetry with run_evaluation
    os.makedirs(directory, exist_ok=True)
    paths = ReportPaths(directory=directory, report=os.path.join(directory, "report.md"),
                        json=os.path.join(directory, "results.json"),
                        csv=os.path.join(directory, "results.csv"))
    result.to_json(paths.json)
    result.to_csv(paths.csv)
    grids: List[str] = []
    plot: Optional[str] = None
    if figures:
        grids = write_image_grids(result, directory)
        plot = write_tradeoff_plot(result, directory)
        paths.images = grids + [plot]
    cfg, m = result.config, result.machine
    t = result.targets
    lines: List[str] = [
        "# Gradient inversion evaluation",
        "",
        f"Targets: {len(t)} {t.source} image(s) {t.image_shape[1]}x{t.image_shape[2]}x{t.image_shape[0]} "
        f"({', '.join(t.names)}); model `{cfg.model}` ({t.num_classes} classes); "
        f"{cfg.batch_size} image(s) per gradient; labels "
        f"{'known to the attacker (idlg and rtf infer them)' if cfg.known_labels else 'unknown to the attacker'}; "
        f"seed {cfg.seed}.",
        "",
        f"Machine: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')} "
        f"with {m.get('torch_threads', '?')} threads, device `{m.get('device', '?')}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; load average {m.get('load_start', '?')} at start, {m.get('load_end', '?')} at end; "
        f"{m.get('started_utc', '?')} - {m.get('finished_utc', '?')} UTC; attacks "
        f"{m.get('attack_seconds', '?')} s"
        + (f", simulator {m['utility_seconds']} s" if "utility_seconds" in m else "")
        + f", total {m.get('total_seconds', '?')} s.",
        "",
        f"Budget ({cfg.budget}): {_budget_line(result)}.",
        "",
        "## Summary: the best attack per defense",
        "",
        "Leakage = PSNR - floor, where the floor is the PSNR of the flat mean-colour image of "
        "the target (what an attack scores without learning anything). The best attack is the "
        "one with the highest mean leakage on that defense. Upload is one client's encoded "
        "gradient payload (real wire bytes, headers included) and its share of the dense "
        "float32 gradient. The iDLG label accuracy is the iDLG rule (argmin of the row sums "
        "of the last layer's weight gradient) applied to the defended gradient.",
        "",
        *_summary_table(result),
        "",
    ]
    if result.utility is None:
        lines += [f"Test accuracy: not measured — {result.utility_note}.", ""]
    else:
        u = result.utility[0]
        lines += [
            f"Test accuracy and simulator upload: `dgp_kernels.sim.simulate` on {u.dataset} with "
            f"`{u.model}`, {u.clients} clients, {u.rounds} FedSGD rounds per defense (a short "
            "run: compare defenses with each other, not with converged accuracies). Training "
            "uses each compressor's error-feedback default (on for DGP, off for top-k/randk); "
            "the attack side never does.",
            "",
        ]
    lines += [
        "## All defenses x attacks",
        "",
        "Means over the target images; the best attack per defense is in bold. Label accuracy "
        "is the attack's own label output (known labels count as correct); "
        "`labels` says where they came from.",
        "",
        *_full_table(result),
        "",
        "## Figures",
        "",
    ]
    if figures:
        for g in grids:
            lines += [f"![reconstructions]({os.path.basename(g)})", ""]
        lines += [f"![privacy-utility-communication]({os.path.basename(plot)})", ""]
    else:
        lines += ["(figures not written)", ""]
    lines += [
        "## Definitions",
        "",
        "* Defense: the single-round operator applied once to the client's gradient, without "
        "error feedback (as in the DGP paper), through the registered compressor and the wire codec; "
        "the attacker gets the dense gradient decoded from the payload (zeros where nothing was "
        "sent), the sent mask (a sparse payload carries its indices) and, for dgp/topk, the band "
        "rule (top, keep).",
        "* dlg: L-BFGS on the euclidean gradient distance; idlg: the same after the iDLG label "
        "rule; ig: Inverting Gradients (cosine distance, signed Adam, total variation); "
        "`-adaptive`: the distance restricted to the sent coordinates; ig-dgp-aware: adaptive "
        "plus the band constraint on the unsent coordinates; rtf: Robbing the Fed (malicious "
        "imprint layer, analytic).",
        f"* PSNR on [0, 1] pixels, capped at {PSNR_CAP_DB:.0f} dB; SSIM: Gaussian 11x11, sigma 1.5 "
        "(Wang et al. 2004; see `dgp_kernels.attacks.metrics`).",
        "",
    ]
    with open(paths.report, "w") as f:
        f.write("\n".join(lines))
    return paths
