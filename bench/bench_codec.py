"""Wire codec throughput and payload sizes. Not part of `pytest`.

    pytest bench/bench_codec.py --benchmark-only --benchmark-group-by=group
    DGP_BENCH_THREADS=1 DGP_BENCH_ROUNDS=3 pytest bench/bench_codec.py
    python bench/bench_codec.py [--repeats 7] [--threads 1,2] [--clients 10] [--grads random|real]

Input: the DGP band (top 5 %, keep 20 %, ``dgp_kernels.select_multi``) of the CIFAR
ResNet-18's 62 gradient tensors (11,173,962 entries; ``randn`` with the model's shapes by
default, or one real forward/backward with ``--grads real``). Throughput is in GB/s of
*dense float32 gradient* (44.7 MB per client), so it compares directly with the rate at
which gradients are produced:

* ``encode``: ``SparsePayload -> bytes`` (coding choice, index and value streams, CRC32);
* ``decode``: ``bytes -> SparsePayload`` with full validation;
* ``decode_accumulate``: 10 clients' bytes summed into dense float32 buffers (validated
  first), counted as 10 x dense bytes.

Baselines measured in the same process: the pure-Python fallback (``backend="python"``) and
``torch.save`` of the dense gradients to memory (what sending dense tensors costs to
serialise). Sizes: payload bytes / dense float32 bytes for each value dtype.

:func:`codec_table` returns the rows and :func:`print_codec_table` prints them (the lead's
``dgp bench`` can call it); both record device, versions and thread count.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # `python bench/bench_codec.py` from a checkout
    sys.path.insert(0, os.path.dirname(HERE))

import dgp_kernels  # noqa: E402
from dgp_kernels.codec import decode, decode_accumulate, encode, wire  # noqa: E402
from tests.codec._helpers import dgp_payload, random_grads, resnet18_cifar_shapes  # noqa: E402

THREADS = [int(t) for t in os.environ.get("DGP_BENCH_THREADS", "1,2").split(",")]
ROUNDS = int(os.environ.get("DGP_BENCH_ROUNDS", "5"))
CLIENTS = 10
VALUE_DTYPES = ("float32", "bfloat16", "float16")


def resnet18_gradients(kind: str = "random", seed: int = 0) -> List[torch.Tensor]:
    """The 62 gradient tensors: ``randn`` with the model's shapes, or one real backward."""
    if kind == "real":
        from dgp_kernels.speed import model_gradients  # the lead's helper (same gradients as bench_select)

        return list(model_gradients("resnet18_cifar", "real", batch=8, seed=seed)[0])
    if kind != "random":
        raise ValueError(f"grads must be 'random' or 'real', got {kind!r}")
    return random_grads(resnet18_cifar_shapes(), seed=seed)


def _environment() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": platform.node(), "cpu": cpu, "cores": str(os.cpu_count()),
        "torch": torch.__version__, "dgp_kernels": dgp_kernels.__version__,
        "codec_backend": "cpp" if wire.cpp_available() else "python",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _time(fn: Callable[[], object], repeats: int, setup: Optional[Callable[[], None]] = None) -> List[float]:
    if setup:
        setup()
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def codec_table(threads: Sequence[int] = (1, 2), repeats: int = 5, clients: int = CLIENTS,
                grads: str = "random", python_baseline: bool = True) -> Dict[str, object]:
    """Measure sizes and throughput; returns ``{"env": ..., "sizes": [...], "rows": [...]}``."""
    gs = resnet18_gradients(grads)
    numels = [g.numel() for g in gs]
    dense = 4 * sum(numels)
    payload = dgp_payload(gs)
    sizes = []
    for vd in VALUE_DTYPES:
        n = len(encode(payload, vd))
        sizes.append({"value_dtype": vd, "bytes": n, "ratio": n / dense})
    data = encode(payload)
    many = [encode(dgp_payload(resnet18_gradients(grads, seed=c))) for c in range(clients)]
    outs = [torch.zeros(n) for n in numels]

    def zero():
        for o in outs:
            o.zero_()

    rows = []
    prev = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            cases = [
                ("encode", "cpp", lambda: encode(payload, backend="cpp"), None, 1),
                ("decode", "cpp", lambda: decode(data, numels, backend="cpp"), None, 1),
                (f"decode_accumulate x{clients}", "cpp",
                 lambda: decode_accumulate(many, outs, backend="cpp", strict=True), zero, clients),
                ("encode bfloat16", "cpp", lambda: encode(payload, "bfloat16", backend="cpp"), None, 1),
                ("torch.save dense", "baseline", lambda: torch.save(gs, io.BytesIO()), None, 1),
            ]
            if python_baseline and t == threads[0]:
                cases += [
                    ("encode", "python", lambda: encode(payload, backend="python"), None, 1),
                    ("decode", "python", lambda: decode(data, numels, backend="python"), None, 1),
                    (f"decode_accumulate x{clients}", "python",
                     lambda: decode_accumulate(many, outs, backend="python", strict=True), zero, clients),
                ]
            for name, be, fn, setup, mult in cases:
                if be == "cpp" and not wire.cpp_available():
                    continue
                ts = _time(fn, repeats, setup)
                med, best = statistics.median(ts), min(ts)
                rows.append({"op": name, "backend": be, "threads": t, "median_ms": med * 1e3,
                             "min_ms": best * 1e3, "GB/s": mult * dense / med / 1e9,
                             "GB/s (min)": mult * dense / best / 1e9})
    finally:
        torch.set_num_threads(prev)
    env = _environment()
    env.update(grads=grads, tensors=str(len(gs)), dense_MB=f"{dense / 1e6:.1f}", repeats=str(repeats))
    return {"env": env, "sizes": sizes, "rows": rows}


def print_codec_table(**kw) -> Dict[str, object]:
    """Print :func:`codec_table` as Markdown (for bench/RESULTS.md) and return it."""
    res = codec_table(**kw)
    env = res["env"]
    print("Wire codec, ResNet-18 gradient list, DGP top 5 % keep 20 %  ·  " +
          ", ".join(f"{k}={v}" for k, v in env.items()))
    print()
    print("| value dtype | payload bytes | / dense float32 |")
    print("|---|---:|---:|")
    for s in res["sizes"]:
        print(f"| {s['value_dtype']} | {s['bytes']:,} | {s['ratio']:.4f} |")
    print()
    print("| op | backend | threads | median ms | min ms | GB/s dense (median) | GB/s (min) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['op']} | {r['backend']} | {r['threads']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} "
              f"| {r['GB/s']:.2f} | {r['GB/s (min)']:.2f} |")
    return res


# ------------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module")
def resnet18_case():
    gs = resnet18_gradients("random")
    payload = dgp_payload(gs)
    numels = [g.numel() for g in gs]
    return {
        "grads": gs, "payload": payload, "numels": numels, "dense": 4 * sum(numels),
        "data": {vd: encode(payload, vd) for vd in VALUE_DTYPES},
        "clients": [encode(dgp_payload(resnet18_gradients("random", seed=c))) for c in range(CLIENTS)],
    }


@pytest.fixture(params=THREADS, ids=lambda t: f"t{t}")
def threads(request):
    prev = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(prev)


@pytest.fixture(params=["cpp", "python"])
def backend(request):
    if request.param == "cpp" and not wire.cpp_available():
        pytest.skip("dgp_kernels._C not built")
    return request.param


def _run(benchmark, case, threads, backend, group, fn, dense_bytes, setup=None):
    benchmark.group = f"{group}-{threads}thread"
    benchmark.extra_info.update(threads=threads, backend=backend, dense_bytes=dense_bytes,
                                payload_ratio={vd: len(d) / case["dense"] for vd, d in case["data"].items()},
                                **_environment())
    rounds = 1 if backend == "python" else ROUNDS  # the fallback is ~10x slower
    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info["GB/s dense"] = dense_bytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_encode(benchmark, resnet18_case, threads, backend, value_dtype):
    p = resnet18_case["payload"]
    _run(benchmark, resnet18_case, threads, backend, f"encode-{value_dtype}",
         lambda: encode(p, value_dtype, backend=backend), resnet18_case["dense"])


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_decode(benchmark, resnet18_case, threads, backend, value_dtype):
    d, n = resnet18_case["data"][value_dtype], resnet18_case["numels"]
    _run(benchmark, resnet18_case, threads, backend, f"decode-{value_dtype}",
         lambda: decode(d, n, backend=backend), resnet18_case["dense"])


def test_decode_accumulate_10_clients(benchmark, resnet18_case, threads, backend):
    outs = [torch.zeros(n) for n in resnet18_case["numels"]]

    def zero():
        for o in outs:
            o.zero_()

    cl = resnet18_case["clients"]
    _run(benchmark, resnet18_case, threads, backend, f"decode_accumulate-x{CLIENTS}",
         lambda: decode_accumulate(cl, outs, backend=backend, strict=True), CLIENTS * resnet18_case["dense"],
         setup=zero)


def test_baseline_torch_save_dense(benchmark, resnet18_case, threads):
    gs = resnet18_case["grads"]
    _run(benchmark, resnet18_case, threads, "baseline", "encode-float32",
         lambda: torch.save(gs, io.BytesIO()), resnet18_case["dense"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--grads", choices=("random", "real"), default="random")
    ap.add_argument("--no-python", action="store_true", help="skip the slow pure-Python baseline")
    a = ap.parse_args()
    print_codec_table(threads=[int(t) for t in a.threads.split(",")], repeats=a.repeats, clients=a.clients,
                      grads=a.grads, python_baseline=not a.no_python)
