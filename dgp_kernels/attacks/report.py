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
from .runner import ACTIVE_ATTACKS, PSNR_CAP_DB, EvalResult, setting_label

__all__ = ["ReportPaths", "format_summary", "summary_rows", "write_report", "write_suite_report"]


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


def _stats(vals: Sequence[float]):
    """(mean, min, max, n) of finite ``vals``; NaNs when empty."""
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan"), float("nan"), 0
    return sum(v) / len(v), min(v), max(v), len(v)


def _mr(vals: Sequence[float], digits: int = 1) -> str:
    """``"mean [min, max]"`` (just the value for one image)."""
    m, lo, hi, n = _stats(vals)
    if n == 0:
        return "–"
    if n == 1:
        return _fmt(m, digits)
    return f"{_fmt(m, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _sample(result: EvalResult) -> str:
    n = len({r.image for r in result.attacks})
    return f"n = {n} image{'s' if n != 1 else ''}, 1 seed"


def summary_rows(result: EvalResult) -> List[Dict[str, object]]:
    """One dict per defense: upload bytes (and / dense); the reported leakage, i.e. per image
    the best over attacks and settings, then the mean (``leakage``; ``leakage_min``/``_max``
    over the images), with the PSNR, floor and SSIM of those best rows; the attack that was
    best on most images; the same over the passive attacks only; the leakage an attacker
    gets choosing its setting by its own objective (``objective_leakage``); the iDLG label
    accuracy and (when the simulator ran) test accuracy."""
    util = {u.defense: u for u in (result.utility or [])}
    rows = []
    for d in result.defenses:
        best = result.best_rows(d.defense)
        passive = result.best_rows(d.defense, passive=True)
        u = util.get(d.defense)
        lm, llo, lhi, n = _stats([r.leakage for r in best])

        def most(rs):
            names = [r.attack for r in rs]
            return max(sorted(set(names)), key=names.count) if names else None

        rows.append({
            "defense": d.defense,
            "upload_bytes": d.upload_bytes,
            "upload_ratio": d.upload_bytes / d.dense_bytes if d.dense_bytes else float("nan"),
            "best_attack": most(best),
            "images": n,
            "psnr": _stats([r.psnr for r in best])[0],
            "floor": _stats([r.floor for r in best])[0],
            "gray_floor": _stats([r.gray_floor for r in best])[0],
            "leakage": lm,
            "leakage_min": llo,
            "leakage_max": lhi,
            "ssim": _stats([r.ssim for r in best])[0],
            "best_passive": most(passive),
            "passive_leakage": _stats([r.leakage for r in passive])[0],
            "passive_leakage_min": _stats([r.leakage for r in passive])[1],
            "passive_leakage_max": _stats([r.leakage for r in passive])[2],
            "objective_leakage": _stats([
                max((x.leakage_by_objective for x in result.attacks
                     if x.defense == d.defense and x.image == r.image and x.attack not in ACTIVE_ATTACKS),
                    default=float("nan"))
                for r in passive])[0],
            "idlg_label_acc": d.idlg_label_acc,
            "test_accuracy": u.final_accuracy if u else float("nan"),
            "train_upload_ratio": (u.upload_bytes_per_round / u.dense_bytes
                                   if u and u.dense_bytes else float("nan")),
        })
    return rows


def _summary_table(result: EvalResult) -> List[str]:
    n = len({r.image for r in result.attacks})
    lines = [
        f"| defense | upload / gradient | leakage dB, mean [min, max] over {n} image(s) | most often best attack "
        "| PSNR dB | floor dB | gray floor dB | SSIM | passive attacks only: leakage dB "
        "| attacker's own pick: leakage dB | iDLG label acc | test acc (sim) | sim upload / dense |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary_rows(result):
        rng = ("" if r["images"] <= 1 else f" [{_fmt(r['leakage_min'])}, {_fmt(r['leakage_max'])}]")
        prng = ("" if r["images"] <= 1 else f" [{_fmt(r['passive_leakage_min'])}, {_fmt(r['passive_leakage_max'])}]")
        lines.append(
            f"| `{r['defense']}` | {_bytes(r['upload_bytes'])} ({_pct(r['upload_ratio'])}) "
            f"| **{_fmt(r['leakage'])}**{rng} | {r['best_attack'] or '–'} | {_fmt(r['psnr'])} | {_fmt(r['floor'])} "
            f"| {_fmt(r['gray_floor'])} | {_fmt(r['ssim'], 3)} | {_fmt(r['passive_leakage'])}{prng} ({r['best_passive'] or '–'}) "
            f"| {_fmt(r['objective_leakage'])} | {_pct(r['idlg_label_acc'])} "
            f"| {_pct(r['test_accuracy'])} | {_pct(r['train_upload_ratio'])} |"
        )
    return lines


def _per_image_table(result: EvalResult) -> List[str]:
    """Per defense and image: the best leakage over attacks and settings, and which attack."""
    images = sorted({r.image for r in result.attacks})
    names = [result.targets.names[i] for i in images]
    lines = ["| defense | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for d, _ in result.config.grid:
        best = {r.image: r for r in result.best_rows(d)}
        cells = [f"{_fmt(best[i].leakage)} ({best[i].attack})" if i in best else "–" for i in images]
        lines.append(f"| `{d}` | " + " | ".join(cells) + " |")
    return lines


def _full_table(result: EvalResult) -> List[str]:
    n = len({r.image for r in result.attacks})
    lines = [
        f"| defense | attack | PSNR dB | floor dB | leakage dB | SSIM | attacker's own pick: leakage dB "
        f"| winning settings (images) | settings | label acc | labels | s / image |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for d, atks in result.config.grid:
        best = result.best_attack(d)
        for a in atks:
            rows = [r for r in result.attacks if r.defense == d and r.attack == a]
            if not rows:
                continue
            src = sorted({r.label_source for r in rows})
            wins: Dict[str, int] = {}
            for r in rows:
                wins[r.setting] = wins.get(r.setting, 0) + 1
            win = "; ".join(f"{k} ({v})" for k, v in sorted(wins.items(), key=lambda kv: -kv[1]))
            name = f"**{a}**" if a == best else a
            lines.append(
                f"| `{d}` | {name} | {_mr(result.values(d, a, 'psnr'))} | {_fmt(result.mean(d, a, 'floor'))} "
                f"| {_mr(result.values(d, a, 'leakage'))} | {_fmt(result.mean(d, a, 'ssim'), 3)} "
                f"| {_fmt(result.mean(d, a, 'leakage_by_objective'))} | {win} | {rows[0].settings_tried} "
                f"| {_pct(result.mean(d, a, 'label_correct'))} | {'/'.join(src)} "
                f"| {_fmt(result.mean(d, a, 'seconds'))} |"
            )
    del n
    return lines


def _headline(result: EvalResult) -> List[str]:
    """Plain-words findings of this run, with its numbers: what DGP stops and what it does
    not. Only statements the run's grid supports are made."""
    grid = dict(result.config.grid)
    sample = _sample(result)
    dgp = next((d for d in grid if d == "dgp:top=0.05,keep=0.2"), None) or next(
        (d for d in grid if d.startswith("dgp")), None)
    lines: List[str] = []
    fam_dlg = ("dlg", "idlg", "dlg-adaptive")
    fam_ig = ("ig", "ig-adaptive", "ig-dgp-aware")

    def fam(d, names):
        return result.best_rows(d, attacks=[a for a in grid.get(d, []) if a in names])

    def mean_of(rows, key):
        return _stats([getattr(r, key) for r in rows])[0]

    def rng(rows, key):
        m, lo, hi, n = _stats([getattr(r, key) for r in rows])
        return f"{_fmt(m)} dB" + ("" if n <= 1 else f" (range {_fmt(lo)} to {_fmt(hi)})")

    if "none" in grid and dgp is not None:
        none_dlg, dgp_dlg = fam("none", fam_dlg), fam(dgp, fam_dlg)
        if none_dlg and dgp_dlg:
            stops = mean_of(dgp_dlg, "psnr") < min(30.0, mean_of(none_dlg, "psnr") - 10.0)
            lines.append(
                f"* **{'DGP stops' if stops else 'DGP does not stop'} pixel-exact reconstruction.** From the "
                f"undefended gradient the DLG family rebuilds the photos at {rng(none_dlg, 'psnr')} PSNR; "
                f"under `{dgp}` its best (boxed adaptive DLG included) reaches "
                f"{_fmt(mean_of(dgp_dlg, 'psnr'))} dB, {_fmt(mean_of(dgp_dlg, 'leakage'))} dB against the "
                f"floor of {_fmt(mean_of(dgp_dlg, 'floor'))} dB.")
        none_ig, dgp_ig = fam("none", fam_ig), fam(dgp, fam_ig)
        if none_ig and dgp_ig:
            d_l, n_l = mean_of(dgp_ig, "leakage"), mean_of(none_ig, "leakage")
            diff = d_l - n_l
            if d_l > 0:
                head = "DGP does not stop a tuned coarse reconstruction."
                tail = ("about as well as from an undefended gradient" if abs(diff) <= 1.5 else
                        ("better than" if diff > 0 else "less well than") + " from an undefended gradient")
                tail = f"an attacker matching only the sent coordinates gets a coarse image {tail}."
            else:
                head = "DGP keeps the tuned coarse reconstruction below the floor here."
                tail = "the best Inverting-Gradients attacker learns less than the image's mean colour."
            lines.append(
                f"* **{head}** The tuned Inverting-Gradients family recovers {_fmt(d_l)} dB above the "
                f"floor under `{dgp}` (SSIM {_fmt(mean_of(dgp_ig, 'ssim'), 2)}) against {_fmt(n_l)} dB "
                f"(SSIM {_fmt(mean_of(none_ig, 'ssim'), 2)}) from the undefended gradient "
                f"({'+' if diff >= 0 else ''}{_fmt(diff)} dB): {tail}")
        topk = next((d for d in grid if d.startswith("topk")), None)
        if topk is not None:
            t_rows, d_rows = result.best_rows(topk, passive=True), result.best_rows(dgp, passive=True)
            if t_rows and d_rows:
                t_l, d_l = mean_of(t_rows, "leakage"), mean_of(d_rows, "leakage")
                verdict = ("behaves about the same as DGP" if abs(t_l - d_l) <= 1.5 else
                           "leaks more than DGP" if t_l > d_l else "leaks less than DGP")
                lines.append(
                    f"* **Top-k at the same density {verdict} against passive attackers:** best passive "
                    f"leakage {_fmt(t_l)} dB under `{topk}` vs {_fmt(d_l)} dB under `{dgp}`.")
        if "rtf" in grid.get("none", []) and "rtf" in grid.get(dgp, []):
            rn, rd = result.values("none", "rtf", "psnr"), result.values(dgp, "rtf", "psnr")
            extra = ""
            if topk is not None and "rtf" in grid.get(topk, []):
                extra = f", through `{topk}` {_fmt(_stats(result.values(topk, 'rtf', 'psnr'))[0])} dB"
            lines.append(
                f"* **A malicious server** (Robbing the Fed, imprint layer) reads undefended photos at "
                f"{_fmt(_stats(rn)[0])} dB PSNR; through `{dgp}` at {_fmt(_stats(rd)[0])} dB{extra}.")
    if not lines:
        return []
    return [
        "## In plain words",
        "",
        f"Sample: {sample}; model `{result.config.model}`; every number is a mean over the images "
        "of the best attack setting per image (an upper bound on an attacker who cannot see the "
        "image; the attacker's own pick by lowest objective is in the tables).",
        "",
        *lines,
        "",
    ]


def format_summary(result: EvalResult) -> str:
    """A short plain-text table for the terminal: per defense, upload share, the attack that
    was best on most images, the per-image best PSNR/floor/leakage/SSIM over all attacks, the best passive attack's leakage, iDLG label accuracy
    and test accuracy (``–`` when not measured)."""
    rows = summary_rows(result)
    w = max([len("defense")] + [len(r["defense"]) for r in rows])
    aw = max([len("most often best")] + [len(str(r["best_attack"])) for r in rows])
    pw = max([len("best passive")] + [len(str(r["best_passive"])) for r in rows])
    head = (f"{'defense':<{w}}  {'upload':>6}  {'most often best':<{aw}}  {'PSNR':>6}  {'floor':>6}  "
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
                    ax.text(0.5, 0.5, "not run", ha="center", va="center", fontsize=6, color="0.5",
                            transform=ax.transAxes)
                    continue
                img = rec[i]
                ax.imshow(_to_hwc(img), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                note = ""
                if float(img.max()) < 0.05:
                    note = " (black: failed)"
                elif float(img.max() - img.min()) < 0.02:
                    note = " (flat: failed)"
                ax.set_xlabel(f"{row.psnr:.1f} dB{note}", fontsize=6, labelpad=1)
        fig.suptitle(f"{result.targets.names[i]} (label {int(result.targets.labels[i])}): best setting's "
                     "reconstruction per defense (rows) and attack (columns), PSNR; 'not run': the attack "
                     "is not in this defense's grid", fontsize=7)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        path = os.path.join(directory, f"grid_{i:02d}_{_slug(result.targets.names[i])}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


#: Leakage above this is drawn at the top edge of the plots (an upward triangle with its
#: value), so one exact reconstruction (100 dB PSNR) does not squash the other points.
PLOT_CAP_DB = 40.0


def write_tradeoff_plot(result: EvalResult, directory: str) -> str:
    """``privacy_utility.png``: the reported leakage (dB above the floor: per image the best
    over attacks and settings, mean over the images, error bars min..max over the images;
    hollow markers: passive attacks only, where an active one is higher) against the upload
    size of one gradient relative to dense float32 and, when the simulator ran, against the
    test accuracy it reached. Points above :data:`PLOT_CAP_DB` are drawn at the cap as
    upward triangles labelled with their value; points at the same place are spread
    sideways so every marker stays visible. Returns the path."""
    plt = _import_pyplot()
    rows = summary_rows(result)
    with_util = result.utility is not None
    fig, axes = plt.subplots(1, 2 if with_util else 1, figsize=(10 if with_util else 5.5, 4.4), squeeze=False)
    markers = "osD^vP*Xhp<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len({r.image for r in result.attacks})

    def style(i: int):
        return markers[i % len(markers)], colors[i % len(colors)]

    def draw(ax, xs, span: float) -> None:
        placed: List[tuple] = []
        top = max([PLOT_CAP_DB * 0.5] + [min(PLOT_CAP_DB, r["leakage_max"]) for r in rows
                                          if not math.isnan(r["leakage_max"])])
        for i, (r, x) in enumerate(zip(rows, xs)):
            if x is None or math.isnan(x) or math.isnan(r["leakage"]):
                continue
            m, c = style(i)
            y = r["leakage"]
            # spread coincident points sideways (1.5% of the axis span per neighbour)
            near = sum(1 for (px, py) in placed if abs(px - x) < 0.01 * span and abs(py - min(y, PLOT_CAP_DB)) < 1.0)
            xj = x + near * 0.015 * span
            placed.append((x, min(y, PLOT_CAP_DB)))
            label = f"{r['defense']} (best: {r['best_attack']})"
            if y > PLOT_CAP_DB:
                ax.scatter(xj, PLOT_CAP_DB, marker="^", color=c, s=60, label=label, zorder=3)
                ax.annotate(f"{y:.0f} dB", (xj, PLOT_CAP_DB), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=c)
            else:
                lo = max(r["leakage_min"], -1e9) if n > 1 else y
                hi = min(r["leakage_max"], PLOT_CAP_DB) if n > 1 else y
                ax.errorbar(xj, y, yerr=[[y - lo], [hi - y]], fmt=m, color=c, ms=7, capsize=3, lw=1,
                            label=label, zorder=3, alpha=0.9)
            p = r["passive_leakage"]
            if r["best_passive"] and not math.isnan(p) and abs(p - y) > 1e-9:
                ax.scatter(xj, min(p, PLOT_CAP_DB), marker=m, facecolors="none", edgecolors=c, s=60, zorder=4)
        ax.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax.text(0.01, 0.0, " floor (flat mean-colour image)", transform=ax.get_yaxis_transform(),
                fontsize=6, color="gray", va="bottom")
        ax.set_ylim(top=min(PLOT_CAP_DB, top) + 3)
        ax.set_ylabel(f"leakage, dB above the floor (mean, bars: min-max over {n} image(s))", fontsize=8)

    ax = axes[0][0]
    xs = [100 * r["upload_ratio"] for r in rows]
    draw(ax, xs, max(xs) - min(xs) if len(xs) > 1 and max(xs) > min(xs) else 100.0)
    ax.set_xlabel("upload per gradient, % of dense float32 (real encoded bytes)")
    ax.set_title(f"privacy vs communication ({_sample(result)}; hollow: passive attacks only)", fontsize=8)
    if with_util:
        ax = axes[0][1]
        xs = [100 * r["test_accuracy"] for r in rows]
        finite = [v for v in xs if not math.isnan(v)]
        draw(ax, xs, (max(finite) - min(finite)) if len(finite) > 1 and max(finite) > min(finite) else 10.0)
        u = result.utility[0]
        ax.set_xlabel(f"test accuracy after {u.rounds} FedSGD rounds, % ({u.model} on {u.dataset}, "
                      f"{u.clients} clients, 1 seed: no error bars)", fontsize=8)
        ax.set_title("privacy vs utility", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    path = os.path.join(directory, "privacy_utility.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _tuning_lines(result: EvalResult) -> List[str]:
    cfg = result.config
    if not cfg.tuning:
        return ["Tuning: none (every attack ran once with its budget).", ""]
    out = [
        f"Tuning grid ({cfg.tuning_name}{'; reduced by --quick' if cfg.tuning_name == 'quick' else ''}), "
        "the same for every defense; per image the best setting by PSNR is reported and named:",
        "",
    ]
    halving = sorted(a for a, p in cfg.attack_params.items() if float(p.get("prune_at", 0) or 0) > 0)
    if halving:
        how = ("by PSNR against the true image (an oracle, like the choice of the reported "
               "setting: conservative for privacy)" if cfg.prune_by == "psnr"
               else "by the attack's own objective (per TV weight)")
        fracs = ", ".join(sorted({f"{float(cfg.attack_params[a]['prune_at']):.3g}" for a in halving}))
        keeps = ", ".join(sorted({str(cfg.attack_params[a].get("prune_keep", 1)) for a in halving}))
        out[-1:] = [
            f"Successive halving ({', '.join(halving)}): every setting runs the first {fracs} of "
            f"the steps; then only the {keeps} best settings, chosen {how}, run the rest; the "
            "others report their best point up to then.",
            "",
        ]
    for a in sorted(cfg.tuning):
        settings = cfg.tuning[a]
        out.append(f"* {a} ({len(settings)} settings): " + "; ".join(setting_label(x) for x in settings))
    out.append("")
    return out


def _budget_line(result: EvalResult) -> str:
    parts = []
    for a, p in sorted(result.config.attack_params.items()):
        parts.append(f"{a} " + (", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in sorted(p.items())) or "analytic"))
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
    fedavg = (f"FedAvg update of {cfg.local_steps} local SGD steps (rate {cfg.local_lr:g}) per client, "
              "shared as a mean gradient" if cfg.local_steps > 1 else "one gradient (FedSGD) per client")
    lines: List[str] = [
        "# Gradient inversion evaluation",
        "",
        f"Targets: {len(t)} {t.source} image(s) {t.image_shape[1]}x{t.image_shape[2]}x{t.image_shape[0]} "
        f"({', '.join(t.names)}); model `{cfg.model}` ({t.num_classes} classes); "
        f"{cfg.batch_size} image(s) per update; {fedavg}; labels "
        f"{'known to the attacker (idlg and rtf infer them)' if cfg.known_labels else 'unknown to the attacker'}; "
        f"seed {cfg.seed} (one model per batch, seeded; {_sample(result)}).",
        "",
        f"Machine: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')} "
        f"with {m.get('torch_threads', '?')} threads x {m.get('workers', 1)} worker process(es), device "
        f"`{m.get('device', '?')}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; load average {m.get('load_start', '?')} at start, {m.get('load_end', '?')} at end; "
        f"{m.get('started_utc', '?')} - {m.get('finished_utc', '?')} UTC; attacks "
        f"{m.get('attack_seconds', '?')} s"
        + (f", simulator {m['utility_seconds']} s" if "utility_seconds" in m else "")
        + f", total {m.get('total_seconds', '?')} s.",
        "",
        f"Budget ({cfg.budget}): {_budget_line(result)}.",
        "",
        *_tuning_lines(result),
        *_headline(result),
        "## Summary: the reported leakage per defense",
        "",
        "Leakage = PSNR - floor, where the floor is the PSNR of the flat mean-colour image of "
        "the target (what an attack scores without learning anything; it knows the mean "
        "colour for free, so the floor is a strict one); the gray floor is the PSNR of a flat "
        "mid-gray image, a lower reference (PSNR - gray floor = leakage + (floor - gray floor)). The reported leakage of a defense is, "
        "per image, the best over every attack and every tuning setting, averaged over the "
        f"images ({_sample(result)}; min and max over the images in brackets). "
        "'Attacker's own pick' is what a real attacker gets choosing each attack's setting by "
        "its lowest objective instead of by the (unknown) true image. Upload is one client's "
        "encoded payload (real wire bytes, headers included) and its share of the dense "
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
            f"`{u.model}`, {u.clients} clients, {u.rounds} FedSGD rounds per defense, 1 seed (a short "
            "run: compare defenses with each other, not with converged accuracies). Training "
            "uses each compressor's error-feedback default (on for DGP, off for top-k/randk); "
            "the attack side never does.",
            "",
        ]
    lines += [
        "## Per image: the best leakage over attacks and settings (dB, attack)",
        "",
        *_per_image_table(result),
        "",
        "## All defenses x attacks",
        "",
        f"Mean over the images [min, max] ({_sample(result)}), each image at its best setting; the "
        "attack with the highest mean leakage per defense is in bold. 'Winning settings' counts "
        "the images each setting won. Label accuracy is the attack's own label output (known "
        "labels count as correct); `labels` says where they came from. An attack missing from a "
        "defense's rows was not run there (see the default grid in the attacks README).",
        "",
        *_full_table(result),
        "",
        "## Figures",
        "",
    ]
    if figures:
        lines += [
            "Image grids: one per photo, the best setting's reconstruction per defense and attack with its "
            "PSNR; 'not run' marks an attack that is not in that defense's grid; a reconstruction "
            "labelled 'black' or 'flat' is a failed one (the attack found no image), not a missing file.",
            "",
        ]
        for g in grids:
            lines += [f"![reconstructions]({os.path.basename(g)})", ""]
        lines += [
            f"Trade-off plot: the reported leakage per defense (error bars: min-max over the images); "
            f"values above {PLOT_CAP_DB:.0f} dB are drawn at the top edge as triangles labelled with "
            "their value; points at the same place are spread sideways; hollow markers: passive "
            "attacks only. The simulator ran one seed, so the accuracy axis has no error bars.",
            "",
            f"![privacy-utility-communication]({os.path.basename(plot)})",
            "",
        ]
    else:
        lines += ["(figures not written)", ""]
    lines += [
        "## Definitions",
        "",
        "* Defense: the single-round operator applied once to the client's update, without "
        "error feedback (what one upload reveals), through the registered compressor and the "
        "wire codec; the attacker gets the dense gradient decoded from the payload (zeros where "
        "nothing was sent), the sent mask (a sparse payload carries its indices) and, for "
        "dgp/topk, the band rule (top, keep).",
        "* dlg: L-BFGS on the euclidean gradient distance; idlg: the same after the iDLG label "
        "rule; ig: Inverting Gradients (cosine distance, signed Adam, total variation); "
        "`-adaptive`: the distance restricted to the sent coordinates (dlg-adaptive also boxed "
        "to [0, 1] with a line search); ig-dgp-aware: adaptive plus the band constraint on the "
        "unsent coordinates; rtf: Robbing the Fed (malicious imprint layer, analytic). Every "
        "optimisation attack returns the lowest-objective point it visited; dlg/idlg compute in "
        "the precision of their `precision` budget entry (float64 by default: the attacker may "
        "compute in any precision).",
        f"* PSNR on [0, 1] pixels, capped at {PSNR_CAP_DB:.0f} dB; SSIM: Gaussian 11x11, sigma 1.5 "
        "(Wang et al. 2004; see `dgp_kernels.attacks.metrics`).",
        "",
    ]
    with open(paths.report, "w") as f:
        f.write("\n".join(lines))
    return paths


def write_suite_report(results: Sequence, directory: str, *, figures: bool = True) -> str:
    """Write each suite variant's full report into ``directory/suite-<name>/`` and a
    one-table overview ``directory/suite.md`` (per variant and defense: the reported
    leakage, mean [min, max] over the images, the attack most often best, the sample size
    and the wall time). ``results`` are ``(name, EvalResult)`` pairs (:func:`run_suite`).
    Returns the path of ``suite.md``."""
    os.makedirs(directory, exist_ok=True)
    lines = [
        "# Gradient inversion suite",
        "",
        "Each variant runs the primary defenses with the base run's budgets and tuning grid; "
        "the leakage is, per image, the best over attacks and settings (dB above the flat "
        "mean-colour floor), mean [min, max] over the images. Full reports: `suite-<variant>/report.md`.",
        "",
        "| variant | model | images / update | update | labels | defense | leakage dB | most often best "
        "| attacker's own pick dB | n | wall s |",
        "|---|---|---:|---|---|---|---:|---|---:|---:|---:|",
    ]
    for name, result in results:
        sub = os.path.join(directory, f"suite-{_slug(name)}")
        write_report(result, sub, figures=figures)
        cfg = result.config
        upd = f"FedAvg {cfg.local_steps} steps" if cfg.local_steps > 1 else "gradient"
        for r in summary_rows(result):
            rng = "" if r["images"] <= 1 else f" [{_fmt(r['leakage_min'])}, {_fmt(r['leakage_max'])}]"
            lines.append(
                f"| {name} | `{cfg.model}` | {cfg.batch_size} | {upd} | "
                f"{'known' if cfg.known_labels else 'unknown'} | `{r['defense']}` | **{_fmt(r['leakage'])}**{rng} "
                f"| {r['best_attack'] or '–'} | {_fmt(r['objective_leakage'])} | {r['images']} "
                f"| {_fmt(result.machine.get('total_seconds', float('nan')), 0)} |"
            )
    m = results[0][1].machine if results else {}
    lines += ["", f"Machine: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, torch "
                  f"{m.get('torch', '?')}, device `{m.get('device', '?')}`.", ""]
    path = os.path.join(directory, "suite.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
