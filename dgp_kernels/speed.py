"""``dgp bench``: our band selection against the DGP authors' operator, topk and clone.

From one process, for (a) the gradient list of a model (default: the CIFAR ResNet-18, 62
tensors, 11.2M elements) and (b) one large float32 tensor (default 25M elements, ``randn``),
at each thread count, it times:

* ``ours_ef``      — :func:`dgp_kernels.select_ef_multi` (fused error feedback, all layers in
  one call); residuals are zeroed before every repetition, outside the timed region, so
  every repetition does the same work;
* ``ours``         — :func:`dgp_kernels.select_multi`;
* ``ours_layer``   — :func:`dgp_kernels.select` called once per tensor;
* ``authors_ef``   — the DGP authors' operator with error feedback (two ``torch.topk`` +
  scatter masks per tensor, :func:`dgp_kernels.ops.baselines.authors_dgp`), residuals reset
  the same way;
* ``topk``         — one ``torch.topk`` of ``k_keep`` per tensor (classic gradient pruning);
* ``clone``        — ``clone()`` of every tensor, the memory-bandwidth yardstick;
* ``copy``         — ``copy_`` into preallocated buffers (bandwidth without allocation).

Timing: ``time.perf_counter`` around each call, after ``warmup`` untimed calls of every
method; the methods are interleaved round-robin within each repetition (with a rotating
start) so that a noisy shared machine slows them alike. Reported: min and median ms and two
ratios from the medians: ``ours_ef / clone`` (our cost in units of a copy of the
gradients) and ``authors_ef / ours_ef`` (the speed-up over the authors' operator).

Add a method: write a zero-argument callable in :func:`_methods` (plus a ``reset`` for any
state it mutates), give it a key and a label; the tables, JSON and ratios pick it up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, TextIO

import torch

import dgp_kernels
from dgp_kernels import optional
from dgp_kernels.machine import cpu_model
from dgp_kernels.ops import DEFAULT_KEEP, DEFAULT_TOP
from dgp_kernels.ops.baselines import authors_dgp, clone_all, single_topk
from dgp_kernels.cases.models import MODELS, get_model

__all__ = [
    "SteadyStateResult",
    "size_sweep",
    "steady_state",
    "BenchConfig",
    "BenchHeader",
    "BenchReport",
    "CaseResult",
    "MethodTiming",
    "add_arguments",
    "config_from_args",
    "format_markdown",
    "format_table",
    "main",
    "model_gradients",
    "run",
    "run_from_args",
]

DEFAULT_SIZE = 25_000_000
DEFAULT_REPEATS = 10
QUICK_REPEATS = 3
DEFAULT_STEADY_STEPS = 50


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    threads: List[int] = field(default_factory=lambda: [1, 2])
    size: int = DEFAULT_SIZE  # elements of the single large tensor; 0 skips that case
    repeats: int = DEFAULT_REPEATS
    warmup: int = 1
    model: str = "resnet18_cifar"
    grads: str = "real"  # "real": one forward/backward; "random": randn of the same shapes
    batch: int = 8
    top: float = DEFAULT_TOP
    keep: float = DEFAULT_KEEP
    seed: int = 0
    steady_steps: int = DEFAULT_STEADY_STEPS  # EF steps of the model list, hint vs none; 0 skips
    sweep: bool = False  # also the size sweep (slow: minutes up to 1e8 entries)
    sweep_max: int = 100_000_000
    sweep_dtypes: List[str] = field(default_factory=lambda: ["float32", "bfloat16"])


@dataclass(frozen=True)
class BenchHeader:
    platform: str
    cpu_model: str
    logical_cores: int
    usable_cores: int
    python: str
    torch_version: str
    dgp_version: str
    backend: str
    omp_wait_policy: str
    load_start: float  # 1-minute load average when the run started (-1 if unknown)
    top: float
    keep: float
    repeats: int
    warmup: int


@dataclass(frozen=True)
class MethodTiming:
    key: str
    label: str
    min_ms: float
    median_ms: float
    times_ms: List[float]


@dataclass(frozen=True)
class CaseResult:
    case: str  # "model" or "tensor"
    description: str
    threads: int
    n_tensors: int
    numel: int
    timings: List[MethodTiming]
    ours_ef_over_clone: float  # medians
    authors_over_ours_ef: float  # medians
    ours_ef_over_clone_min: float
    authors_over_ours_ef_min: float


@dataclass(frozen=True)
class BenchReport:
    header: BenchHeader
    cases: List[CaseResult]
    load_end: float  # 1-minute load average when the run ended (-1 if unknown)
    steady: List["SteadyStateResult"] = field(default_factory=list)
    sweep: List[dict] = field(default_factory=list)  # size_sweep rows (with --sweep)


@dataclass(frozen=True)
class _Method:
    key: str
    label: str
    fn: Callable[[], object]
    reset: Optional[Callable[[], None]] = None


# --------------------------------------------------------------------------------------
# Inputs and machine description
# --------------------------------------------------------------------------------------
def _backend_text() -> str:
    info = dgp_kernels.backend_info()
    text = f"cpu={info.cpu} (simd {info.cpu_simd}), cuda={info.cuda}"
    if info.reason:
        text += f"; C++ extension not loaded: {info.reason}"
    return text


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return -1.0


def machine_header(config: BenchConfig) -> BenchHeader:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return BenchHeader(
        platform=platform.platform(),
        cpu_model=cpu_model(),
        logical_cores=os.cpu_count() or 1,
        usable_cores=usable,
        python=platform.python_version(),
        torch_version=torch.__version__,
        dgp_version=dgp_kernels.__version__,
        backend=_backend_text(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
        load_start=_load(),
        top=config.top,
        keep=config.keep,
        repeats=config.repeats,
        warmup=config.warmup,
    )


def model_gradients(name: str, grads: str = "real", batch: int = 8, seed: int = 0):
    """``(tensors, description)``: the parameter gradients of model ``name`` (float32, CPU).

    ``grads="real"``: one forward/backward (cross-entropy) of a freshly initialised model on
    a random batch of ``batch`` images 3x32x32 with random labels. ``grads="random"``:
    ``randn`` tensors with the same shapes (faster, no model compute).
    """
    if grads not in ("real", "random"):
        raise ValueError(f"grads must be 'real' or 'random', got {grads!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = get_model(name)
    params = [p for p in model.parameters() if p.requires_grad]
    if grads == "random":
        tensors = [torch.randn(p.shape, generator=gen) for p in params]
        how = f"random (randn with the model's {len(tensors)} parameter shapes, seed {seed})"
    else:
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        tensors = [t.detach().clone() for t in torch.autograd.grad(loss, params)]
        how = f"real (one forward/backward on a random batch of {batch}x3x32x32, seed {seed})"
    return tensors, f"{name} gradients: {how}"


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def _methods(gs: List[torch.Tensor], top: float, keep: float) -> List[_Method]:
    res_ours = [torch.zeros_like(g) for g in gs]
    res_authors = [torch.zeros_like(g) for g in gs]
    bufs = [torch.empty_like(g) for g in gs]

    def zero(res):
        def reset():
            for e in res:
                e.zero_()

        return reset

    many = len(gs) > 1
    return [
        _Method("ours_ef", "ours select_ef_multi",
                lambda: dgp_kernels.select_ef_multi(gs, res_ours, top, keep), zero(res_ours)),
        _Method("ours", "ours select_multi", lambda: dgp_kernels.select_multi(gs, top, keep)),
        _Method("ours_layer", "ours select, per layer" if many else "ours select",
                lambda: [dgp_kernels.select(g, top, keep) for g in gs]),
        _Method("authors_ef", "authors 2x topk+scatter, EF",
                lambda: authors_dgp(gs, res_authors, top, keep), zero(res_authors)),
        _Method("topk", "single topk per layer", lambda: single_topk(gs, keep)),
        _Method("clone", "clone", lambda: clone_all(gs)),
        # copy_ into preallocated buffers: bandwidth without allocation/page faults (clone()
        # of 25M floats measured 6-43 ms here depending on page faults, copy_ ~6 ms).
        _Method("copy", "copy_ into existing buffers",
                lambda: [b.copy_(g) for b, g in zip(bufs, gs)]),
    ]


def _time_interleaved(methods: Sequence[_Method], repeats: int, warmup: int) -> List[MethodTiming]:
    for _ in range(warmup):
        for m in methods:
            if m.reset:
                m.reset()
            m.fn()
    times = {m.key: [] for m in methods}
    for r in range(repeats):
        start = r % len(methods)  # rotate who goes first: no method always follows another
        for m in list(methods[start:]) + list(methods[:start]):
            if m.reset:
                m.reset()
            t0 = time.perf_counter()
            out = m.fn()
            t1 = time.perf_counter()
            del out  # freeing outputs stays outside the timed region
            times[m.key].append((t1 - t0) * 1e3)
    return [
        MethodTiming(m.key, m.label, min(times[m.key]), statistics.median(times[m.key]),
                     times[m.key])
        for m in methods
    ]


def _check_agreement(gs, top, keep) -> None:
    """Cheap sanity check, untimed: with a zero residual select_ef_multi == select_multi."""
    res = [torch.zeros_like(g) for g in gs]
    a = dgp_kernels.select_ef_multi(gs, res, top, keep)
    b = dgp_kernels.select_multi(gs, top, keep)
    if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])):
        raise RuntimeError("select_ef_multi with a zero residual disagrees with select_multi")


def run_case(case: str, description: str, gs: List[torch.Tensor], threads: int,
             config: BenchConfig) -> CaseResult:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings = _time_interleaved(_methods(gs, config.top, config.keep),
                                    config.repeats, config.warmup)
    finally:
        torch.set_num_threads(prev)
    by = {t.key: t for t in timings}
    return CaseResult(
        case=case,
        description=description,
        threads=threads,
        n_tensors=len(gs),
        numel=sum(g.numel() for g in gs),
        timings=timings,
        ours_ef_over_clone=by["ours_ef"].median_ms / by["clone"].median_ms,
        authors_over_ours_ef=by["authors_ef"].median_ms / by["ours_ef"].median_ms,
        ours_ef_over_clone_min=by["ours_ef"].min_ms / by["clone"].min_ms,
        authors_over_ours_ef_min=by["authors_ef"].min_ms / by["ours_ef"].min_ms,
    )


def _say(msg: str, stream: TextIO) -> None:
    print(msg, file=stream, flush=True)


def run(config: BenchConfig, progress: Optional[TextIO] = None) -> BenchReport:
    """Run every case at every thread count; progress lines go to ``progress`` (default: the
    current ``sys.stderr``), flushed as each case finishes."""
    progress = progress if progress is not None else sys.stderr
    header = machine_header(config)
    inputs = []
    gs, desc = model_gradients(config.model, config.grads, config.batch, config.seed)
    inputs.append(("model", desc, gs))
    if config.size > 0:
        gen = torch.Generator().manual_seed(config.seed + 1)
        big = torch.randn(config.size, generator=gen)
        inputs.append(("tensor", f"one float32 tensor of {config.size:,} elements (randn)", [big]))
    for _, _, tensors in inputs:
        _check_agreement(tensors, config.top, config.keep)
    cases = []
    for case, desc, tensors in inputs:
        for t in config.threads:
            _say(f"[dgp bench] {desc}; {t} thread(s): {config.repeats} repeats ...", progress)
            t0 = time.perf_counter()
            res = run_case(case, desc, tensors, t, config)
            by = {m.key: m for m in res.timings}
            _say(
                f"[dgp bench]   done in {time.perf_counter() - t0:.1f} s: median ours_ef "
                f"{_ms(by['ours_ef'].median_ms)} ms, clone {_ms(by['clone'].median_ms)} ms, "
                f"authors_ef {_ms(by['authors_ef'].median_ms)} ms",
                progress,
            )
            cases.append(res)
    steady = []
    if config.steady_steps > 0:
        for t in config.threads:
            _say(f"[dgp bench] steady state: {config.steady_steps} EF steps of the "
                 f"{config.model} list, with and without a BandHint; {t} thread(s) ...", progress)
            st = steady_state(gs, config.steady_steps, t, top=config.top, keep=config.keep,
                              seed=config.seed)
            steady.append(st)
            _say(f"[dgp bench]   {_steady_line(st)}", progress)
    sweep = []
    if config.sweep:
        sizes = [n for n in SWEEP_SIZES if n <= config.sweep_max]
        _say(f"[dgp bench] size sweep: {len(sizes)} sizes up to {config.sweep_max:,}, "
             f"{', '.join(config.sweep_dtypes)}, threads {config.threads} ...", progress)
        sweep = size_sweep(sizes, config.sweep_dtypes, config.threads, progress=progress)
    return BenchReport(header=header, cases=cases, load_end=_load(), steady=steady, sweep=sweep)


def _steady_line(st: "SteadyStateResult") -> str:
    p, h, c = st.stats("plain_ms"), st.stats("hint_ms"), st.stats("copy_ms")
    hits = (f"; hinted brackets held on {st.hint_layers} of "
            f"{st.hint_layers + st.hint_misses} layer-steps" if st.hint_layers >= 0 else "")
    into = ""
    # The second half alone (after the residuals have built up and the hint's margins
    # shrunk), when it differs from the steps already summarised.
    late = st.settled
    settled = ""
    if late > st.skipped:
        keys = ("hint", "into") if st.into_ms else ("hint",)
        settled = f"; steps {late + 1}-{st.steps} alone: " + ", ".join(
            f"{k} / copy_ {st.stats(k + '_ms', late)[0] / st.stats('copy_ms', late)[0]:.2f}"
            for k in keys)
    if st.into_ms:
        o = st.stats("into_ms")
        into = (f", into (out of place, hint) {_ms(o[0])} ({_ms(o[1])})")
        into_ratio = f", into / copy_ {o[0] / c[0]:.2f}"
        if st.into_layers >= 0:
            hits += (f" (into: {st.into_layers} of {st.into_layers + st.into_misses})")
    else:
        into_ratio = ""
    return (f"{st.threads} thread(s), steps {st.skipped + 1}-{st.steps}, median (min) ms: "
            f"no hint {_ms(p[0])} ({_ms(p[1])}), hint {_ms(h[0])} ({_ms(h[1])}){into}, copy_ "
            f"{_ms(c[0])} ({_ms(c[1])}); hint / copy_ {h[0] / c[0]:.2f}{into_ratio}, "
            f"no hint / copy_ {p[0] / c[0]:.2f}{settled}{hits}")


def plot_steady(report: "BenchReport", path: str) -> None:
    """Per-step milliseconds of the steady-state rows, one panel per thread count, as a PNG:
    the first steps (residuals building up, the hint's brackets still wide) against the
    settled ones, and every call against the ``copy_`` of the same tensors."""
    plt = optional.pyplot("dgp bench --plot")
    from matplotlib import ticker
    rows = report.steady
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.8), squeeze=False,
                             sharey=True)
    labels = (("plain_ms", "select_ef_multi"), ("hint_ms", "select_ef_multi, hint"),
              ("into_ms", "select_ef_multi_into, hint"), ("copy_ms", "copy_"))
    for ax, st in zip(axes[0], rows):
        steps = range(1, st.steps + 1)
        for key, label in labels:
            v = getattr(st, key)
            if v:
                ax.plot(steps, v, label=label, lw=1.2,
                        ls="--" if key == "copy_ms" else "-")
        ax.axvspan(0.5, st.skipped + 0.5, color="0.9", lw=0)
        ax.set_title(f"{st.threads} thread(s)")
        ax.set_xlabel("error-feedback step (shaded: left out of the medians)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per call")
    axes[0][-1].legend(fontsize=8)
    h = report.header
    fig.suptitle(f"steady state, {h.torch_version}, {h.cpu_model}, "
                 f"load {h.load_start:.2f}-{report.load_end:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Size sweep: one tensor per size against torch.topk, np.partition and copy_
# --------------------------------------------------------------------------------------
SWEEP_SIZES = [10, 100, 1_000, 2_000, 4_096, 5_000, 9_999, 10_000, 20_000, 32_768,
               100_000, 1_000_000, 10_000_000, 100_000_000]
SWEEP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float64": torch.float64}


def _time_batched(methods, rounds: int, batch_us: float) -> dict:
    """(median, min) per-call microseconds of each method, interleaved round-robin.

    ``methods[name](reps)`` returns a callable that is called ``reps`` times in a row per
    round (it may prepare per-call inputs first, untimed, e.g. fresh zeroed residuals);
    ``reps`` makes one batch last about ``batch_us``."""
    names = list(methods)
    reps = {}
    for k in names:  # warm-up, and the batch size
        f = methods[k](2)
        f()
        t0 = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t0, 1e-7) * 1e6
        reps[k] = max(1, min(2_000, int(batch_us / dt)))
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            m = reps[k]
            f = methods[k](m)
            t0 = time.perf_counter()
            for _ in range(m):
                f()
            times[k].append((time.perf_counter() - t0) * 1e6 / m)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def size_sweep(sizes: Sequence[int], dtypes: Sequence[str], threads: Sequence[int],
               rounds: int = 9, batch_us: float = 2000.0,
               progress: Optional[TextIO] = None) -> List[dict]:
    """One ``randn`` tensor per size, dtype and thread count; per-call microseconds
    (median and minimum over ``rounds``, sizes of 10M and up ``max(3, rounds // 3)``) of

    * ``select``: ``dgp_kernels.select(g)``; ``select_ef``: ``dgp_kernels.select_ef(g, e)``
      (every call its own zeroed residual, made untimed);
    * ``topk``: ``torch.topk(g.abs(), n // 5)``; ``partition``: ``np.partition(np.abs(a),
      n - n // 5)`` on a float32 numpy copy; ``copy``: ``buf.copy_(g)``.

    Small sizes repeat each call in a batch of about ``batch_us`` and divide. Returns one
    dict per row (keys ``threads``, ``dtype``, ``n``, ``<method>_us``, ``<method>_min_us``).
    """
    import numpy as np

    rows = []
    prev_threads = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for dname in dtypes:
                if dname not in SWEEP_DTYPES:
                    raise ValueError(f"unknown dtype {dname!r}; choose from {sorted(SWEEP_DTYPES)}")
                dtype = SWEEP_DTYPES[dname]
                for n in sizes:
                    gen = torch.Generator().manual_seed(n)
                    g = torch.randn(n, generator=gen).to(dtype)
                    buf = torch.empty_like(g)
                    a = g.float().numpy()
                    k = n // 5

                    def select_ef(reps, g=g):
                        it = iter([torch.zeros_like(g) for _ in range(reps)])
                        return lambda: dgp_kernels.select_ef(g, next(it))

                    methods = {
                        "select": lambda reps, g=g: (lambda: dgp_kernels.select(g)),
                        "select_ef": select_ef,
                        "topk": lambda reps, g=g, k=k: (lambda: torch.topk(g.abs(), k)),
                        "partition": lambda reps, a=a, n=n, k=k: (
                            lambda: np.partition(np.abs(a), n - k)),
                        "copy": lambda reps, g=g, buf=buf: (lambda: buf.copy_(g)),
                    }
                    rr = rounds if n < 10_000_000 else max(3, rounds // 3)
                    med = _time_batched(methods, rr, batch_us)
                    row = {"threads": t, "dtype": dname, "n": n,
                           **{f"{m}_us": v[0] for m, v in med.items()},
                           **{f"{m}_min_us": v[1] for m, v in med.items()}}
                    rows.append(row)
                    if progress is not None:
                        _say(format_sweep_row(row), progress)
                    del g, buf, a
    finally:
        torch.set_num_threads(prev_threads)
    return rows


def format_sweep_row(r: dict) -> str:
    return (f"t={r['threads']} {r['dtype']:8s} n={r['n']:>11,d}  select {r['select_us']:10.1f}  "
            f"select_ef {r['select_ef_us']:10.1f}  topk {r['topk_us']:10.1f}  "
            f"partition {r['partition_us']:10.1f}  copy {r['copy_us']:9.1f} us (medians)  "
            f"ef/topk {r['select_ef_us'] / r['topk_us']:5.2f}  "
            f"sel/topk {r['select_us'] / r['topk_us']:5.2f}  | mins: ef "
            f"{r['select_ef_min_us']:.1f} sel {r['select_min_us']:.1f} "
            f"topk {r['topk_min_us']:.1f} ef/topk "
            f"{r['select_ef_min_us'] / r['topk_min_us']:5.2f}")


# --------------------------------------------------------------------------------------
# Steady state: consecutive error-feedback steps with and without a BandHint
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteadyStateResult:
    threads: int
    steps: int
    skipped: int  # first steps left out of the statistics (the hint's margins adapt)
    alpha: float  # step-to-step correlation of every gradient entry
    plain_ms: List[float]  # per step, select_ef_multi without a hint
    hint_ms: List[float]  # per step, select_ef_multi(hint=...)
    copy_ms: List[float]  # per step, copy_ of the same tensors
    hint_layers: int  # layer-steps served by the hinted brackets (C++ kernel), -1 if unknown
    hint_misses: int  # layer-steps whose brackets missed (that layer took the unhinted path)
    into_ms: List[float] = field(default_factory=list)  # per step, select_ef_multi_into(hint=...)
    into_layers: int = -1  # as hint_layers, for the out-of-place calls
    into_misses: int = -1

    def stats(self, key: str, first: Optional[int] = None) -> tuple:
        """Median and minimum of ``key`` over the steps from ``first`` (default: after the
        skipped ones)."""
        v = getattr(self, key)[self.skipped if first is None else first:]
        return statistics.median(v), min(v)

    @property
    def settled(self) -> int:
        """First step of the second half: the residuals have built up and the hint's
        margins have shrunk by then (they start wide and narrow by at most a quarter a step)."""
        return max(self.skipped, self.steps // 2)


def steady_state(gs0: List[torch.Tensor], steps: int = 50, threads: int = 1,
                 alpha: float = 0.9, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP,
                 skipped: int = 5, seed: int = 0) -> SteadyStateResult:
    """``steps`` consecutive error-feedback steps of the layer list ``gs0``, as in training.

    Step ``t`` selects ``g_t = alpha * g_{t-1} + sqrt(1 - alpha^2) * sigma * z_t`` (per layer
    ``sigma`` = the std of ``gs0[i]``, ``z_t`` a fresh ``randn`` draw every step from a
    generator seeded with ``seed``, so the gradients drift but keep their scale), made
    untimed before the step. Three residual
    sets are carried, one by ``select_ef_multi(gs, res_a)`` and one by
    ``select_ef_multi(gs, res_b, hint=h)`` with one :class:`~dgp_kernels.BandHint` for all
    steps, and a third by ``select_ef_multi_into(gs, res_c, spare, hint=h2)`` (out of place,
    the two buffers swapped after each step, as the dgp compressor does); all outputs and
    residuals are checked bit-equal every step (untimed). The three calls and a ``copy_`` of
    the same tensors are timed per step in a rotating order.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        sig = [float(g.float().std()) if g.numel() > 1 else 1.0 for g in gs0]
        sig = [x if x > 0 else 1.0 for x in sig]
        beta = math.sqrt(max(0.0, 1.0 - alpha * alpha))
        gs = [g.clone() for g in gs0]
        res_a = [torch.zeros_like(g) for g in gs]
        res_b = [torch.zeros_like(g) for g in gs]
        res_c = [torch.zeros_like(g) for g in gs]
        spare = [torch.empty_like(g) for g in gs]
        bufs = [torch.empty_like(g) for g in gs]
        hint, hint_c = dgp_kernels.BandHint(), dgp_kernels.BandHint()
        _C = _cpp_module()
        hits = {"hint": 0, "into": 0}
        misses = {"hint": 0, "into": 0}
        times = {"plain": [], "hint": [], "into": [], "copy": []}
        outs = {}

        def into():
            nonlocal res_c, spare
            out = dgp_kernels.select_ef_multi_into(gs, res_c, spare, top, keep, hint=hint_c)
            res_c, spare = spare, res_c
            return out

        calls = {
            "plain": lambda: dgp_kernels.select_ef_multi(gs, res_a, top, keep),
            "hint": lambda: dgp_kernels.select_ef_multi(gs, res_b, top, keep, hint=hint),
            "into": into,
            "copy": lambda: [b.copy_(g) for b, g in zip(bufs, gs)],
        }
        names = list(calls)
        for t in range(steps):
            for g, s in zip(gs, sig):
                z = (torch.randn(g.shape, generator=gen) * s).to(g.dtype)
                g.mul_(alpha).add_(z, alpha=beta)
            r = t % len(names)
            for name in names[r:] + names[:r]:
                if name in hits and _C is not None:
                    _C.path_counts(True)
                t0 = time.perf_counter()
                outs[name] = calls[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
                if name in hits and _C is not None:
                    c = _C.path_counts(True)
                    if t >= skipped:
                        hits[name] += c["hint"]
                        misses[name] += c["hint_miss"]
            for name in ("hint", "into"):
                if not all(torch.equal(a, b) for a, b in zip(outs["plain"], outs[name])):
                    raise RuntimeError(f"steady state step {t}: the {name} call disagrees")
        for name, res in (("hint", res_b), ("into", res_c)):
            if not all(torch.equal(a, b) for a, b in zip(res_a, res)):
                raise RuntimeError(f"steady state: the {name} residuals disagree")
    finally:
        torch.set_num_threads(prev)
    known = _C is not None
    return SteadyStateResult(threads=threads, steps=steps, skipped=skipped, alpha=alpha,
                             plain_ms=times["plain"], hint_ms=times["hint"],
                             copy_ms=times["copy"], hint_layers=hits["hint"] if known else -1,
                             hint_misses=misses["hint"] if known else -1,
                             into_ms=times["into"], into_layers=hits["into"] if known else -1,
                             into_misses=misses["into"] if known else -1)


def _cpp_module():
    if dgp_kernels.backend_info().cpu != "cpp":
        return None
    from dgp_kernels import _C

    return _C


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    """Milliseconds with about 3-4 significant digits (0.042, 4.31, 512.3)."""
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _ratio_line(c: CaseResult) -> str:
    return (f"ours_ef / clone = {c.ours_ef_over_clone:.2f}; "
            f"authors_ef / ours_ef = {c.authors_over_ours_ef:.1f}")


def _header_pairs(report: BenchReport) -> List[tuple]:
    h = report.header
    omp = h.omp_wait_policy
    if omp == "unset":
        omp = ("unset (as users run it; the kernel's own thread pool does not read it, torch's "
               "copy_/topk/clone do)")
    return [
        ("machine", f"{h.platform}; CPU {h.cpu_model}; {h.logical_cores} logical cores "
                    f"({h.usable_cores} usable)"),
        ("versions", f"python {h.python}; torch {h.torch_version}; dgp_kernels {h.dgp_version}"),
        ("backend", h.backend),
        ("OMP_WAIT_POLICY", omp),
        # Other processes on a shared machine slow every method; the load says how busy it was.
        ("load", f"1-min load average {h.load_start:.2f} at start, {report.load_end:.2f} at end "
                 f"({h.usable_cores} usable cores)"),
        ("settings", f"top={h.top:g} keep={h.keep:g}; float32; {h.repeats} timed repeats after "
                     f"{h.warmup} warm-up, methods interleaved round-robin; "
                     "time.perf_counter, ms"),
    ]


def _groups(report: BenchReport):
    """Cases grouped by input (same description), keeping order."""
    groups = {}
    for c in report.cases:
        groups.setdefault((c.case, c.description), []).append(c)
    return list(groups.items())


def _note(report: BenchReport) -> List[str]:
    if "cpu=reference" in report.header.backend:
        return ["NOTE: 'ours' ran on the slow pure-torch reference (C++ extension not built); "
                "these are not the C++ kernel's numbers."]
    return []


def format_table(report: BenchReport) -> str:
    """Plain-text report: header lines, one aligned table per input, the ratios."""
    lines = ["dgp bench: DGP band selection (ours) vs the authors' operator, topk and clone"]
    pairs = _header_pairs(report)
    width = max(len(k) for k, _ in pairs)
    lines += [f"{k:<{width}}  {v}" for k, v in pairs]
    lines += _note(report)
    for i, ((_, desc), cases) in enumerate(_groups(report)):
        c0 = cases[0]
        lines += ["", f"({chr(ord('a') + i)}) {desc}; {c0.n_tensors} tensor(s), "
                      f"{c0.numel:,} elements"]
        lw = max(len(t.label) for c in cases for t in c.timings)
        head = (f"{'threads':>7}  {'method':<{lw}}  {'min ms':>10}  {'median ms':>10}  "
                f"{'/ clone':>8}")
        lines += [head, "-" * len(head)]
        for c in cases:
            clone = next(t for t in c.timings if t.key == "clone").median_ms
            for t in c.timings:
                lines.append(f"{c.threads:>7}  {t.label:<{lw}}  {_ms(t.min_ms):>10}  "
                             f"{_ms(t.median_ms):>10}  {t.median_ms / clone:>8.2f}")
        for c in cases:
            lines.append(f"ratios, {c.threads} thread(s), medians: {_ratio_line(c)}")
    lines += _steady_lines(report, "")
    if report.sweep:
        lines += ["", "size sweep (one randn tensor per size; per-call us)"]
        lines += [format_sweep_row(r) for r in report.sweep]
    return "\n".join(lines) + "\n"


def _steady_lines(report: BenchReport, bullet: str) -> List[str]:
    if not report.steady:
        return []
    st = report.steady[0]
    return (["", f"steady state: {st.steps} consecutive error-feedback steps of the model list, "
                 f"gradients drifting (each entry AR(1), correlation {st.alpha:g}), "
                 f"select_ef_multi without and with a BandHint and select_ef_multi_into "
                 f"with one (two residual buffers swapped each step; all bit-equal every step), "
                 f"first {st.skipped} steps left out"]
            + [f"{bullet}{_steady_line(s)}" for s in report.steady])


def format_markdown(report: BenchReport) -> str:
    """The same report as Markdown (for bench/RESULTS.md)."""
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _header_pairs(report)]
    if _note(report):
        lines += [""] + _note(report)
    for i, ((_, desc), cases) in enumerate(_groups(report)):
        c0 = cases[0]
        lines += ["", f"**({chr(ord('a') + i)}) {desc}; {c0.n_tensors} tensor(s), "
                      f"{c0.numel:,} elements**", "",
                  "| threads | method | min ms | median ms | / clone |",
                  "|---:|---|---:|---:|---:|"]
        for c in cases:
            clone = next(t for t in c.timings if t.key == "clone").median_ms
            for t in c.timings:
                lines.append(f"| {c.threads} | {t.label} | {_ms(t.min_ms)} | {_ms(t.median_ms)} "
                             f"| {t.median_ms / clone:.2f} |")
        lines.append("")
        for c in cases:
            lines.append(f"- {c.threads} thread(s), medians: {_ratio_line(c)}")
    lines += _steady_lines(report, "- ")
    if report.sweep:
        lines += ["", "| threads | dtype | n | select_ef us | select us | topk us | np.partition us "
                      "| copy_ us | select_ef / topk |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report.sweep:
            lines.append(f"| {r['threads']} | {r['dtype']} | {r['n']:,} | {r['select_ef_us']:.1f} "
                         f"| {r['select_us']:.1f} | {r['topk_us']:.1f} | {r['partition_us']:.1f} "
                         f"| {r['copy_us']:.1f} | {r['select_ef_us'] / r['topk_us']:.2f} |")
    return "\n".join(lines) + "\n"


def to_json(report: BenchReport) -> str:
    return json.dumps(dataclasses.asdict(report), indent=2)


# --------------------------------------------------------------------------------------
# Command line (wired into `dgp bench` by dgp_kernels.cli)
# --------------------------------------------------------------------------------------
def _thread_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive thread counts like '1,2', got {text!r}")
    return values


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    return parse


def _dtype_list(text: str) -> List[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in SWEEP_DTYPES]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(SWEEP_DTYPES)}, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_thread_list, default=[1, 2], metavar="LIST",
                   help="comma-separated thread counts, each set with torch.set_num_threads "
                        "(default: 1,2)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_REPEATS} timed repeats instead of {DEFAULT_REPEATS} "
                        "(unless --repeats is given)")
    p.add_argument("--size", type=_int_at_least(0), default=DEFAULT_SIZE, metavar="N",
                   help=f"elements of the single large tensor, 0 to skip it "
                        f"(default: {DEFAULT_SIZE:_})")
    p.add_argument("--repeats", type=_int_at_least(1), default=None, metavar="R",
                   help=f"timed repetitions per method (default: {DEFAULT_REPEATS}, "
                        f"--quick: {QUICK_REPEATS})")
    p.add_argument("--warmup", type=_int_at_least(0), default=1, metavar="W",
                   help="untimed calls of every method before timing (default: 1)")
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18_cifar",
                   help="model whose gradient list is case (a) (default: resnet18_cifar)")
    p.add_argument("--grads", choices=("real", "random"), default="real",
                   help="real: one forward/backward on a random batch; random: randn tensors "
                        "of the same shapes (default: real)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: 0)")
    p.add_argument("--gpu", choices=("auto", "on", "off"), default="auto",
                   help="also run the GPU benchmark (dgp_kernels.benchmarks_gpu: Triton kernels "
                        "vs the authors' operator on 25M, ResNet-18 and ResNet-50 inputs): "
                        "auto = when a CUDA device is present (default: auto)")
    p.add_argument("--steady-steps", type=_int_at_least(0), default=DEFAULT_STEADY_STEPS,
                   metavar="S",
                   help="consecutive error-feedback steps of the model list timed with and "
                        f"without a BandHint, 0 to skip (default: {DEFAULT_STEADY_STEPS})")
    p.add_argument("--sweep", action="store_true",
                   help="also the size sweep: one tensor per size from 10 to --sweep-max "
                        "entries, ours vs torch.topk, np.partition and copy_ (minutes)")
    p.add_argument("--sweep-max", type=_int_at_least(10), default=100_000_000, metavar="N",
                   help="largest size of the sweep (default: 100_000_000)")
    p.add_argument("--sweep-dtypes", type=_dtype_list, default=["float32", "bfloat16"],
                   metavar="LIST", help="dtypes of the sweep (default: float32,bfloat16)")
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    p.add_argument("--plot", metavar="PATH",
                   help="also draw the steady-state steps (ms per call and step, per thread "
                        "count) as a PNG (needs matplotlib: the eval extra)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    repeats = args.repeats if args.repeats is not None else (
        QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    return BenchConfig(threads=list(args.threads), size=args.size, repeats=repeats,
                       warmup=args.warmup, model=args.model, grads=args.grads, seed=args.seed,
                       steady_steps=getattr(args, "steady_steps", DEFAULT_STEADY_STEPS),
                       sweep=getattr(args, "sweep", False),
                       sweep_max=getattr(args, "sweep_max", 100_000_000),
                       sweep_dtypes=list(getattr(args, "sweep_dtypes", ["float32", "bfloat16"])))


def run_from_args(args: argparse.Namespace) -> int:
    # Check output paths before a run that may take minutes, not after it.
    for opt in ("json", "markdown", "plot"):
        path = getattr(args, opt, None)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"dgp bench: error: --{opt} {path!r}: directory "
                  f"{os.path.dirname(os.path.abspath(path))!r} does not exist", file=sys.stderr)
            return 2
    if getattr(args, "plot", None):
        try:  # before the run, not after it
            optional.pyplot("dgp bench --plot")
        except ImportError as exc:
            print(f"dgp bench: error: {exc}", file=sys.stderr)
            return 2
    gpu = getattr(args, "gpu", "auto")
    if gpu == "on" and not torch.cuda.is_available():
        print("dgp bench: error: --gpu on, but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    report = run(config_from_args(args))
    sys.stdout.write(format_table(report))
    sys.stdout.flush()
    if gpu == "on" or (gpu == "auto" and torch.cuda.is_available()):
        from . import benchmarks_gpu

        print("\n## GPU (CUDA tensors)\n")
        benchmarks_gpu.main(["--size", str(args.size or benchmarks_gpu.DEFAULT_SIZE)])
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(report) + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(report))
    plot = getattr(args, "plot", None)
    if plot:
        if report.steady:
            plot_steady(report, plot)
        else:
            print("dgp bench: --plot: no steady-state rows to draw (--steady-steps 0)",
                  file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dgp bench`` as a standalone program (used by bench/select_table.py)."""
    parser = argparse.ArgumentParser(prog="select_table", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
