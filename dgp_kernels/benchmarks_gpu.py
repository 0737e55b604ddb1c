"""GPU benchmark of the Triton band selection. Skips without CUDA.

    dgp bench --gpu on                           # 25M float32, ResNet-18, ResNet-50
    python -m dgp_kernels.benchmarks_gpu --reps 50 --markdown out.md
    python -m dgp_kernels.benchmarks_gpu --variant b1k:block=1024 --variant w4:num_warps=4

Inputs: one 25M-element float32 ``randn`` tensor; the 62 gradient shapes of the CIFAR
ResNet-18 (``dgp_kernels.cases.models.resnet18_cifar``, 11.2M elements); the 161 parameter
shapes of an ImageNet ResNet-50 (torchvision layout, 25.6M elements, generated below, no
torchvision). Values are ``randn`` (the selection's cost does not depend on the layer
having been produced by a backward pass, only on sizes and the value distribution).

Methods, each with (``_ef``) and without error feedback, measured in the same process:

* ``ours``: ``dgp_kernels.select_ef_multi`` / ``select_multi`` on CUDA tensors (the Triton
  kernels registered for the CUDA key; the header says which backend served them), eager;
* ``ours[graphs]``: the same inside ``dgp_kernels.kernels.triton.cuda_graphs()`` (each call
  replays a captured CUDA graph);
* ``authors``: the DGP authors' operator, two ``torch.topk`` + two ``scatter_`` masks per
  tensor (``dgp_kernels.ops.baselines.authors_dgp``);
* ``topk``: one ``torch.topk`` of ``k_keep`` per tensor (classic gradient pruning, no EF);
* ``clone``: ``clone()`` of every tensor, the bandwidth yardstick;
* ``ours[NAME]`` (``--variant NAME:field=v,...``): ours with fields of the launcher's
  ``Tuning`` changed, timed in the same process as the rest.

Timing: CUDA events around each call on the current stream, after ``--warmup`` untimed calls
(the first compiles the kernels); residuals are zeroed before each call outside the events.
Median and min over ``--reps``. Bandwidth = mandatory bytes / median time, where mandatory
bytes are what any implementation must move: read ``g`` (and ``e``), write ``e`` (EF), write
the ``k`` kept entries (int64 index + value); ``clone`` reads and writes each tensor once.
The fraction is of the device's nominal peak HBM bandwidth from the table below (matched on
``torch.cuda.get_device_name()``; printed in the header, "n/a" when unknown).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

TOP, KEEP = 0.05, 0.20
DEFAULT_SIZE = 25_000_000

# Nominal peak HBM bandwidth (bytes/s) by device-name substring, most specific first.
PEAK_BW = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80 GB
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("V100", 0.9e12),
]


def peak_bandwidth(name: str) -> Optional[float]:
    for key, bw in PEAK_BW:
        if key in name:
            return bw
    return None


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def resnet18_shapes() -> Tuple[List[Tuple[int, ...]], str]:
    from dgp_kernels.cases.models import resnet18_cifar

    return [tuple(p.shape) for p in resnet18_cifar().parameters()], "dgp_kernels.cases.models"


def resnet50_shapes(num_classes: int = 1000) -> List[Tuple[int, ...]]:
    """torchvision ``resnet50()`` parameter shapes in ``parameters()`` order: 161 tensors,
    25,557,032 elements (bottlenecks [3, 4, 6, 3], expansion 4, 7x7 stem)."""
    shapes: List[Tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_planes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = planes * 4
            shapes += [(planes, in_planes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (out, planes, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_planes, 1, 1), (out,), (out,)]
            in_planes = out
    return shapes + [(num_classes, 2048), (num_classes,)]


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------
def _methods():
    import dgp_kernels

    from dgp_kernels.ops.baselines import authors_dgp, single_topk

    # name -> (fn(gs, es), uses error feedback)
    return {
        "ours_ef": (lambda gs, es: dgp_kernels.select_ef_multi(gs, es, TOP, KEEP), True),
        "ours": (lambda gs, es: dgp_kernels.select_multi(gs, TOP, KEEP), False),
        "authors_ef": (lambda gs, es: authors_dgp(gs, es, TOP, KEEP), True),
        "authors": (lambda gs, es: authors_dgp(gs, None, TOP, KEEP), False),
        "topk": (lambda gs, es: single_topk(gs, KEEP), False),
        "clone": (lambda gs, es: [g.clone() for g in gs], False),
    }


def _with_tuning(base: str, changes: Dict[str, str]) -> Callable:
    """Ours (``base``: ``ours_ef`` or ``ours``) through the Triton wrappers with the default
    ``Tuning`` changed by ``changes`` (field name -> text)."""
    from dgp_kernels.kernels.triton import DEFAULT, select_ef_multi_triton, select_multi_triton

    fields = {f: type(getattr(DEFAULT, f)) for f in DEFAULT.__dataclass_fields__}
    for name in changes:
        if name not in fields:
            raise SystemExit(f"benchmarks_gpu: --variant field {name!r} is not a field of "
                             f"Tuning ({', '.join(fields)})")
    tuning = DEFAULT.replace(**{k: fields[k](v) for k, v in changes.items()})
    if base == "ours_ef":
        return lambda gs, es: select_ef_multi_triton(gs, es, TOP, KEEP, tuning=tuning)
    return lambda gs, es: select_multi_triton(gs, TOP, KEEP, tuning=tuning)


def _with_graphs(fn: Callable) -> Callable:
    """``fn`` with CUDA-graph replay on (``cuda_graphs()``)."""
    from dgp_kernels.kernels.triton import cuda_graphs

    def call(gs, es):
        with cuda_graphs():
            return fn(gs, es)

    return call


def parse_variant(text: str) -> Tuple[str, Dict[str, str]]:
    """``'b1k:block=1024,num_warps=4'`` -> ``('b1k', {...})``."""
    name, _, spec = text.partition(":")
    changes = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    if not name or not changes:
        raise SystemExit(f"benchmarks_gpu: --variant {text!r} is not NAME:field=v[,field=v]")
    return name, changes


def mandatory_bytes(gs: Sequence[torch.Tensor], method: str) -> int:
    from dgp_kernels import band_counts

    method = method.split("[")[0]  # "ours_ef[fused]" moves what "ours_ef" moves
    s = gs[0].element_size()
    n = sum(g.numel() for g in gs)
    if method == "clone":
        return 2 * n * s
    k_keep = sum(band_counts(g.numel(), TOP, KEEP)[1] for g in gs)
    k = k_keep if method != "topk" else sum(band_counts(g.numel(), 0.0, KEEP)[1] for g in gs)
    ef = method.endswith("_ef")
    return (3 if ef else 1) * n * s + k * (8 + s)


def sample_misses(gs: Sequence[torch.Tensor], reps: int = 5) -> str:
    """How often the sampled path held every layer's boundaries on these inputs (layers
    it misses are rerun on the exact path)."""
    try:
        from dgp_kernels.kernels.triton import CallInfo, select_ef_multi_triton
    except ImportError:
        return "n/a"
    missed = 0
    for _ in range(reps):
        info = CallInfo()
        select_ef_multi_triton(gs, [torch.zeros_like(g) for g in gs], TOP, KEEP, info=info)
        missed += len(info.missed)
    return f"{missed} layer misses in {reps} calls"


def check_exact(gs: Sequence[torch.Tensor]) -> str:
    """Run ours and the pure-torch reference (sort-based, same device) on the same inputs
    and compare indices, values and residuals bit for bit: a timing of a wrong kernel is
    worthless."""
    import dgp_kernels
    from dgp_kernels.ops import reference

    ints = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}
    es = [torch.randn_like(g) * 0.1 for g in gs]
    es_ref = [e.clone() for e in es]
    ours = dgp_kernels.select_ef_multi(gs, es, TOP, KEEP)
    ref = reference.select_ef_multi(gs, es_ref, TOP, KEEP)
    same = torch.equal(ours[0], ref[0]) and torch.equal(ours[2], ref[2])
    same = same and torch.equal(ours[1].view(ints[ours[1].dtype]), ref[1].view(ints[ref[1].dtype]))
    same = same and all(torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))
                        for a, b in zip(es, es_ref))
    return "yes" if same else "NO (do not trust the timings below)"


def time_method(fn: Callable, gs, es, reps: int, warmup: int) -> List[float]:
    """Milliseconds per call from CUDA events; residuals zeroed outside the events.
    (On CPU tensors, for ``--cpu-smoke`` only: ``time.perf_counter``.)"""
    import time

    cuda = gs[0].is_cuda
    times = []
    for i in range(warmup + reps):
        if es is not None:
            for e in es:
                e.zero_()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(gs, es)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(gs, es)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times


def run(args) -> int:
    device = "cpu" if args.cpu_smoke else "cuda"
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("benchmarks_gpu: skipped, no CUDA device (torch.cuda.is_available() is False); "
              "the Triton kernels are checked on CPU by tests/kernels under TRITON_INTERPRET=1")
        return 0
    import dgp_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke run (timings meaningless)"
    peak = peak_bandwidth(dev)
    info = dgp_kernels.backend_info()
    print(f"# benchmarks_gpu: {dev} | peak {peak / 1e12 if peak else float('nan'):.2f} TB/s "
          f"(nominal, table in dgp_kernels/benchmarks_gpu.py) | torch {torch.__version__} | triton "
          f"{triton_version} | dgp_kernels {dgp_kernels.__version__} | CUDA backend: "
          f"{info.cuda} | {platform.node()}")
    clock = ""
    if device == "cuda":
        try:  # the SM clock now (boost clocks vary: say which one the numbers saw)
            clock = f" | SM clock {torch.cuda.clock_rate()} MHz"
        except Exception:  # (needs pynvml)
            clock = ""
    print(f"# top={TOP} keep={KEEP}; reps={args.reps} warmup={args.warmup}; times are CUDA-event "
          f"medians (min) in ms; GB/s = mandatory bytes / median{clock}")
    if device == "cuda" and info.cuda != "triton":
        print("# WARNING: CUDA tensors are not served by the Triton kernels (is triton "
              "installed?); 'ours' is the pure-torch reference")

    gen = torch.Generator(device=device).manual_seed(0)
    r18, r18_src = resnet18_shapes()
    inputs = {
        f"tensor {args.size / 1e6:g}M": [(args.size,)],
        f"resnet18 ({len(r18)} tensors, {r18_src})": r18,
        "resnet50 (161 tensors)": resnet50_shapes(),
    }
    if args.cpu_smoke:  # exercise the script's logic only
        inputs = {"tensor smoke": [(args.size,)], "layers smoke": [(30, 20), (7,), (0,), (5, 5)]}
    methods = _methods()
    variants = [parse_variant(v) for v in args.variant or []]
    if info.cuda == "triton" or args.cpu_smoke:
        for base in ("ours_ef", "ours"):
            fn, uses_ef = methods[base]
            methods[f"{base}[graphs]"] = (_with_graphs(fn), uses_ef)
        for vname, changes in variants:
            for base, uses_ef in (("ours_ef", True), ("ours", False)):
                methods[f"{base}[{vname}]"] = (_with_tuning(base, changes), uses_ef)
            print(f"# variant {vname}: ours with Tuning(" +
                  ", ".join(f"{k}={v}" for k, v in changes.items()) + ")")
    rows = []
    for label, shapes in inputs.items():
        gs = [torch.randn(s, device=device, generator=gen) for s in shapes]
        es = [torch.zeros_like(g) for g in gs]
        n = sum(g.numel() for g in gs)
        print(f"# {label}: ours bit-exact vs the reference (same device): {check_exact(gs)}; "
              f"sampled path: {sample_misses(gs)}")
        results: Dict[str, float] = {}
        for name, (fn, uses_ef) in methods.items():
            if name.startswith("authors") and args.skip_authors:
                continue
            t = time_method(fn, gs, es if uses_ef else None, args.reps, args.warmup)
            med = sorted(t)[len(t) // 2]
            results[name] = med
            nbytes = mandatory_bytes(gs, name)
            gbs = nbytes / (med * 1e-3) / 1e9
            frac = f"{gbs * 1e9 / peak:.0%}" if peak else "n/a"
            rows.append((label, n, name, med, min(t), gbs, frac))
        del gs, es
        if device == "cuda":
            torch.cuda.empty_cache()
        # speed-ups against the authors, per input
        pairs = [("ours_ef", "authors_ef"), ("ours", "authors")]
        pairs += [(f"{o}[{v}]", t) for v in ["graphs"] + [v for v, _ in variants]
                  for o, t in pairs[:2]]
        for ours, theirs in pairs:
            if ours in results and theirs in results:
                rows.append((label, n, f"{theirs}/{ours}", results[theirs] / results[ours],
                             math.nan, math.nan, "x"))

    header = "| input | elements | method | median ms | min ms | GB/s | of peak |"
    lines = [header, "|---|---:|---|---:|---:|---:|---:|"]
    for label, n, name, med, mn, gbs, frac in rows:
        if frac == "x":
            lines.append(f"| {label} | {n:,} | **{name}** | **{med:.1f}x** | | | |")
        else:
            lines.append(f"| {label} | {n:,} | {name} | {med:.3f} | {mn:.3f} | {gbs:,.0f} | {frac} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Device: {dev}; torch {torch.__version__}; triton {triton_version}\n\n")
            f.write(table + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="elements of the big tensor")
    p.add_argument("--reps", type=int, default=20, help="timed calls per method")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls (the first compiles)")
    p.add_argument("--skip-authors", action="store_true", help="skip the slow two-topk baseline")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--variant", action="append", metavar="NAME:field=v[,field=v]",
                   help="also time ours with fields of the Triton Tuning changed, in the same "
                        "process (repeatable), e.g. 'b1k:block=1024'")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the script's logic on small CPU tensors (no GPU; not a benchmark)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
