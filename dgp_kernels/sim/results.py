"""Results of a simulated run: :class:`SimResult` (JSON/CSV writers), the comparison summary
table and the plots (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from ..optional import pyplot
from .config import SimConfig

__all__ = ["CSV_FIELDS", "SimResult", "finish_accuracy_plot", "plot_results", "seed_curves",
           "summary_rows", "write_summary"]

#: Columns of :meth:`SimResult.to_csv` (``dropped`` is the number of dropped clients).
CSV_FIELDS = ("round", "test_accuracy", "test_loss", "upload_bytes", "download_bytes",
              "cumulative_upload_bytes", "wall_s", "round_s", "local_s", "participants", "dropped")


@dataclass
class SimResult:
    """What :func:`~dgp_kernels.sim.simulate` returns.

    Attributes:
        config: the run's :class:`SimConfig`.
        rounds: one dict per round: ``round`` (0-based), ``test_accuracy`` (float in
            [0, 1], ``None`` in rounds not evaluated), ``test_loss``, ``upload_bytes``
            (sum of the lengths of the payload bytes received this round),
            ``download_bytes`` (broadcast bytes x clients it went to), ``wall_s`` (seconds
            since the start of training, after this round), ``participants`` (sampled
            client ids), ``dropped`` (list of ``{"client", "stage", "reason"}``), and with
            ``diagnostics`` the error-feedback norms.
        dense_bytes: bytes of one dense float32 copy of the model's parameters.
        model_state: the final model ``state_dict`` (CPU tensors; not written to JSON).
    """

    config: SimConfig
    rounds: List[Dict[str, Any]] = field(default_factory=list)
    dense_bytes: int = 0
    num_params: int = 0
    model_state: Optional[Dict[str, Tensor]] = None

    def last(self, key: str) -> float:
        """The last round's recorded ``key`` (``test_accuracy``, ``test_loss``, ...), skipping
        rounds without an evaluation; NaN when no round recorded it."""
        for r in reversed(self.rounds):
            if r.get(key) is not None:
                return float(r[key])
        return float("nan")

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last round (it is always evaluated)."""
        return self.last("test_accuracy")

    @property
    def final_loss(self) -> float:
        return self.last("test_loss")

    @property
    def total_upload_bytes(self) -> int:
        return int(sum(r["upload_bytes"] for r in self.rounds))

    @property
    def total_download_bytes(self) -> int:
        return int(sum(r["download_bytes"] for r in self.rounds))

    @property
    def wall_s(self) -> float:
        return float(self.rounds[-1]["wall_s"]) if self.rounds else 0.0

    @property
    def num_dropped(self) -> int:
        return sum(len(r["dropped"]) for r in self.rounds)

    def prefix(self, rounds: int) -> "SimResult":
        """The run cut after its first ``rounds`` rounds: the result the same config with
        ``rounds=rounds`` gives, without running it. Nothing in a round depends on the
        total number of rounds (the learning rate schedule is by round index, sampling and
        batches are seeded streams consumed in order), so a longer run's first ``rounds``
        rows are exactly the shorter run's rows (tested bitwise, timings aside). Needs an
        evaluation in round ``rounds - 1`` (``eval_every`` dividing ``rounds``), which the
        shorter run would have made. The model state is not kept (it is the final one).
        """
        if isinstance(rounds, bool) or not isinstance(rounds, int):
            raise TypeError(f"rounds must be an int, got {type(rounds).__name__}")
        if not 1 <= rounds <= len(self.rounds):
            raise ValueError(f"rounds must be in [1, {len(self.rounds)}] (the rounds this run has), got {rounds}")
        if self.rounds[rounds - 1].get("test_accuracy") is None:
            raise ValueError(f"rounds={rounds}: round {rounds - 1} was not evaluated in this run "
                             f"(eval_every={self.config.eval_every} does not divide {rounds})")
        return SimResult(config=replace(self.config, rounds=rounds),
                         rounds=[dict(r) for r in self.rounds[:rounds]],
                         dense_bytes=self.dense_bytes, num_params=self.num_params)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "final_accuracy": self.final_accuracy,
            "final_loss": self.final_loss,
            "total_upload_bytes": self.total_upload_bytes,
            "total_download_bytes": self.total_download_bytes,
            "dense_bytes": self.dense_bytes,
            "num_params": self.num_params,
            "wall_s": self.wall_s,
            "rounds": self.rounds,
        }

    def to_json(self, path: str) -> None:
        """Write :meth:`to_dict` as JSON (the model state is not included)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_json(cls, path: str) -> "SimResult":
        with open(path) as f:
            d = json.load(f)
        return cls(config=SimConfig.from_dict(d["config"]), rounds=d["rounds"],
                   dense_bytes=int(d.get("dense_bytes", 0)), num_params=int(d.get("num_params", 0)))

    def to_csv(self, path: str) -> None:
        """One row per round with :data:`CSV_FIELDS` (plus diagnostics columns when present)."""
        extra: List[str] = []
        for r in self.rounds:
            for k in r:
                if k not in CSV_FIELDS and k not in extra and not isinstance(r[k], (list, dict)):
                    extra.append(k)
        cum = 0
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(CSV_FIELDS) + extra)
            for r in self.rounds:
                cum += r["upload_bytes"]
                row = dict(r, cumulative_upload_bytes=cum, participants=len(r["participants"]),
                           dropped=len(r["dropped"]))
                w.writerow(["" if row.get(k) is None else row.get(k) for k in list(CSV_FIELDS) + extra])


def summary_rows(results: Sequence[SimResult]) -> List[Dict[str, Any]]:
    """One row per run: defense, final accuracy, total upload/download bytes and the upload
    relative to the first run of the list (the dense baseline when it is ``none``)."""
    base = results[0].total_upload_bytes if results else 0
    rows = []
    for r in results:
        rows.append({
            "defense": r.config.defense,
            "defense_params": dict(r.config.defense_params),
            "rounds": len(r.rounds),
            "final_accuracy": r.final_accuracy,
            "final_loss": r.final_loss,
            "upload_bytes": r.total_upload_bytes,
            "download_bytes": r.total_download_bytes,
            "upload_vs_first": (r.total_upload_bytes / base) if base else float("nan"),
            "dropped": r.num_dropped,
            "wall_s": r.wall_s,
        })
    return rows


def write_summary(results: Sequence[SimResult], stem: str) -> Dict[str, Any]:
    """Write ``<stem>.json`` and ``<stem>.md`` (a markdown table); returns
    ``{"rows": ..., "markdown": ...}``."""
    rows = summary_rows(results)
    first = rows[0]["defense"] if rows else "-"
    lines = [
        f"| defense | params | final accuracy | upload bytes | upload / {first} | download bytes | wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["defense_params"].items()) or "defaults"
        lines.append(
            f"| {r['defense']} | {params} | {100 * r['final_accuracy']:.2f}% | {r['upload_bytes']:,} | "
            f"{r['upload_vs_first']:.3f} | {r['download_bytes']:,} | {r['wall_s']:.1f} |"
        )
    md = "\n".join(lines)
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    return {"rows": rows, "markdown": md}


def plot_results(results: Sequence[SimResult], out_dir: str) -> List[str]:
    """Two PNGs, one curve per run: ``accuracy_vs_round.png`` and
    ``accuracy_vs_upload.png`` (accuracy vs cumulative upload bytes, log x). Returns the
    paths. Needs matplotlib (``pip install "dgp_kernels[eval]"``)."""
    plt = pyplot()
    paths = []
    for kind in ("round", "upload"):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for res in results:
            xs, ys, cum = [], [], 0
            for r in res.rounds:
                cum += r["upload_bytes"]
                if r.get("test_accuracy") is None:
                    continue
                xs.append(r["round"] + 1 if kind == "round" else cum)
                ys.append(100.0 * r["test_accuracy"])
            ax.plot(xs, ys, label=res.config.defense, linewidth=1.4)
        cfg = results[0].config if results else None
        title = f"{cfg.algorithm} {cfg.dataset} {cfg.model}, {cfg.clients} clients" if cfg else None
        paths.append(finish_accuracy_plot(plt, fig, ax, kind, "cumulative upload (bytes, all clients)",
                                           title, out_dir))
    return paths


def finish_accuracy_plot(plt, fig, ax, kind: str, upload_label: str, title: Optional[str],
                          out_dir: str) -> str:
    """Axes, title, grid and legend of an accuracy-vs-``kind`` plot; saves
    ``accuracy_vs_<kind>.png`` in ``out_dir``, closes the figure and returns the path."""
    if kind == "upload":
        ax.set_xscale("log")
        ax.set_xlabel(upload_label)
    else:
        ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"accuracy_vs_{kind}.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def seed_curves(runs: Sequence[SimResult], key: str = "test_accuracy",
                x: str = "round") -> Tuple[List[float], List[float], List[float], List[float]]:
    """Per-round statistics of ``key`` over runs of the same schedule (one per seed):
    ``(xs, mean, min, max)`` over the rounds where every run recorded a number. ``x`` is
    ``"round"`` (1-based round) or ``"upload"`` (the runs' mean cumulative upload bytes)."""
    if not runs:
        raise ValueError("seed_curves needs at least one run")
    n = min(len(r.rounds) for r in runs)
    xs: List[float] = []
    mean: List[float] = []
    lo: List[float] = []
    hi: List[float] = []
    cum = [0] * len(runs)
    for i in range(n):
        for j, res in enumerate(runs):
            cum[j] += res.rounds[i]["upload_bytes"]
        vals = [res.rounds[i].get(key) for res in runs]
        if any(v is None for v in vals):
            continue
        vals = [float(v) for v in vals]
        xs.append(float(runs[0].rounds[i]["round"] + 1) if x == "round" else sum(cum) / len(cum))
        mean.append(sum(vals) / len(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi
