"""GPU measurements of the device wire codec and the DDP hook's device path. Not part of
`pytest`.

    python bench/bench_gpu_codec.py                 # on a GPU: the ResNet-18 gradient list
    python bench/bench_gpu_codec.py --smoke         # anywhere: tiny shapes, Triton interpreter
    python bench/bench_gpu_codec.py --json out.json

Input: the DGP band (top 5 %, keep 20 %: ``dgp_kernels.select_multi``) of the CIFAR
ResNet-18's 62 gradient tensors (11,173,962 entries, ``randn`` with the model's shapes).
Rows (:func:`gpu_codec_rows`, for the one GPU measurement script to call):

* ``encode``: ``SparsePayload -> uint8 bytes on the GPU`` (``codec.encode_on_device``:
  device codings, value streams, CRC-32), in GB/s of dense float32 gradient; the bytes are
  checked against the C++ encoder given the same codings, and the payload / dense ratio is
  recorded;
* ``decode_accumulate x8``: 8 clients' payloads validated and summed into one float32
  buffer on the GPU (``codec.accumulate_on_device``), counted as 8 x dense bytes; the sum is
  checked bit for bit against the C++ accumulator;
* ``ddp_step``: one DDP training step (forward, backward, hook) of the CIFAR ResNet-18 on
  one process (world size 1, NCCL; gloo on CPU in smoke mode), without a hook and with the
  DGP hook on the device path; the difference is what the hook adds per step.

Times are medians of ``--repeat`` runs after warm-up, with CUDA events on a GPU. Each run
records device, torch and triton versions. In smoke mode (no GPU: the kernels run in
Triton's interpreter, so times mean nothing) the shapes are tiny and only the exactness
checks matter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # `python bench/bench_gpu_codec.py` from a checkout
    sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import dgp_kernels  # noqa: E402
from dgp_kernels.codec import SparsePayload, decode_accumulate, encode  # noqa: E402
from dgp_kernels.codec import wire  # noqa: E402
from tests.codec._helpers import dgp_payload, resnet18_cifar_shapes  # noqa: E402

SMOKE_SHAPES = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (10, 32), (10,)]


def _timer(device: torch.device, fn: Callable[[], object], repeat: int, warmup: int) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_codings(p: SparsePayload) -> List[str]:
    from dgp_kernels.kernels.triton.codec_encode import choose_coding

    return [wire.CODING_NAMES[choose_coding(l.numel, l.k, l.indices is not None, p.aligned)] for l in p.layers]


def codec_rows(device: torch.device, shapes, repeat: int, warmup: int, clients: int = 8) -> List[Dict]:
    dense = 4 * sum(torch.Size(s).numel() for s in shapes)
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(clients)]
    payloads = [dgp_payload(gs) for gs in grads]
    rows = []
    # encode
    data, bad = wire.encode_on_device(payloads[0])
    host = SparsePayload(tuple(type(l)(l.numel, l.indices.cpu(), l.values.cpu()) for l in payloads[0].layers))
    want = encode(host, force_coding=_device_codings(payloads[0]))
    exact = data.cpu().numpy().tobytes() == want and not bool(bad.any())
    t = _timer(device, lambda: wire.encode_on_device(payloads[0]), repeat, warmup)
    rows.append({"what": "encode", "seconds": t, "GB/s": dense / t / 1e9, "exact": exact,
                 "payload_bytes": int(data.numel()), "ratio": data.numel() / dense})
    # decode-accumulate of `clients` payloads
    datas = [wire.encode_on_device(p)[0] for p in payloads]
    buf, starts, lens, max_len, _ = wire._pack_payloads(datas, device)
    numels = [torch.Size(s).numel() for s in shapes]
    out = torch.zeros(sum(numels), device=device)
    st = wire.accumulate_on_device(buf, starts, lens, max_len, out, numels)
    ref = torch.zeros(sum(numels))
    decode_accumulate([d.cpu().numpy().tobytes() for d in datas], ref, numels=numels, backend="cpp"
                      if wire.cpp_available() else "python")
    exact = st.tolist()[-1] == 0 and torch.equal(out.cpu().view(torch.int32), ref.view(torch.int32))

    def acc():
        out.zero_()
        wire.accumulate_on_device(buf, starts, lens, max_len, out, numels)

    t = _timer(device, acc, repeat, warmup)
    rows.append({"what": f"decode_accumulate x{clients}", "seconds": t, "GB/s": clients * dense / t / 1e9,
                 "exact": exact})
    return rows


def _model(smoke: bool) -> torch.nn.Module:
    if smoke:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(16 * 6 * 6, 10))
    try:
        from dgp_kernels.cases.models import resnet18_cifar
    except ImportError:
        from dgp_kernels.sim.models import resnet18_cifar
    return resnet18_cifar()


def ddp_rows(device: torch.device, smoke: bool, repeat: int, warmup: int) -> List[Dict]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook
    from tests.integrations._ddp_worker import free_port

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=600))
    rows = []
    try:
        torch.manual_seed(0)
        batch = 128 if not smoke else 4
        x = torch.randn(batch, 3, 32 if not smoke else 8, 32 if not smoke else 8, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        base = None
        for hook in (False, True):
            model = DDP(_model(smoke).to(device), device_ids=[device.index] if device.type == "cuda" else None)
            state = None
            if hook:
                state = DGPHookState(compressor="dgp", codec="triton")
                model.register_comm_hook(state, dgp_hook)

            def step():
                model.zero_grad(set_to_none=False)
                torch.nn.functional.cross_entropy(model(x), y).backward()

            t = _timer(device, step, repeat, warmup)
            if state is not None:
                state.check()
            row = {"what": "ddp_step " + ("dgp hook (device codec)" if hook else "no hook"), "seconds": t}
            if hook:
                row["added_ms"] = (t - base) * 1e3
            else:
                base = t
            rows.append(row)
    finally:
        dist.destroy_process_group()
    return rows


def gpu_codec_rows(smoke: bool = False, repeat: int = 20, warmup: int = 3) -> Dict:
    """Every row plus the environment (device, versions)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not smoke:
        raise SystemExit("no GPU: run with --smoke (tiny shapes, Triton interpreter: exactness only)")
    import triton

    shapes = SMOKE_SHAPES if smoke else resnet18_cifar_shapes()
    if smoke:
        repeat, warmup = 1, 0
    rows = codec_rows(device, shapes, repeat, warmup) + ddp_rows(device, smoke, repeat, warmup)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "smoke": smoke,
        "shapes": "smoke" if smoke else "CIFAR ResNet-18 (62 tensors, 11,173,962 entries)",
        "repeat": repeat, "rows": rows,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs without a GPU (interpreter)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    res = gpu_codec_rows(a.smoke, a.repeat, a.warmup)
    print(f"device: {res['device']}  torch {res['torch']}  triton {res['triton']}  shapes: {res['shapes']}")
    for r in res["rows"]:
        extra = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k not in ("what", "seconds"))
        print(f"  {r['what']:<34} {r['seconds'] * 1e3:10.3f} ms  {extra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if not all(r.get("exact", True) for r in res["rows"]):
        raise SystemExit("exactness check failed")


if __name__ == "__main__":
    main()
