"""Worker processes for the DDP hook tests (spawned; importable by the children).

Everything a rank does is a function of (rank, step) only, so the parent can replay it in
one process (:func:`simulate`) and compare bit for bit.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Dict, List

import torch
from torch import nn

IN, HID, OUT, BATCH = 8, 16, 4, 16
STEPS = 8
LR = 0.5


class Net(nn.Module):
    """A small MLP whose layers are *registered* in the reverse of the order they are used:
    DDP's first buckets follow the reverse registration order, the rebuilt ones (after
    step 1) the order in which gradients became ready, so the bucket layout changes."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(HID, OUT)
        self.hidden = nn.Linear(HID, HID)
        self.inp = nn.Linear(IN, HID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(rank: int, step: int):
    """The batch of ``rank`` at ``step``: inputs and labels of a fixed random teacher."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, IN, generator=g)
    teacher = torch.Generator().manual_seed(12345)
    w = torch.randn(IN, OUT, generator=teacher)
    return x, (x @ w).argmax(1)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_now() -> None:
    """Leave a rank whose work is saved without the interpreter's shutdown: once (CI,
    2026-11-26) a rank that had saved its results and destroyed its process group was
    aborted at exit by C++ teardown ("terminate called without an active exception", exit
    code -6), which would fail the test for nothing the hook did."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def _train(rank: int, compressor: str, params: Dict, steps: int = STEPS, codec: str = "auto",
           bucket_cap_mb: float = 0.0002) -> Dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook

    # default ~200 bytes: one bucket per tensor after the rebuild
    model = DDP(make_model(), bucket_cap_mb=bucket_cap_mb)
    state = DGPHookState(compressor=compressor, params=params, codec=codec)
    model.register_comm_hook(state, dgp_hook)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    snaps: List[torch.Tensor] = []
    losses: List[float] = []
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        snaps.append(flat_params(model.module))
    state.check()  # the device codec's flags of the last step
    return {
        "params": torch.stack(snaps),
        "losses": losses,
        "steps": [s.__dict__ for s in state.steps],
        "layouts": [{i: list(k) for i, k in lay.items()} for lay in state.layouts],
        "names": {(p.data_ptr(), p.numel()): n for n, p in model.module.named_parameters()},
    }


def _run_rank(rank: int, out_dir: str, body) -> None:
    """Run ``body()`` (which sets up the group and returns what this rank saves), save it,
    wait for every rank before tearing the group down (nobody tears it down under
    another), and on any failure leave the traceback in ``rank<r>.err``."""
    import torch.distributed as dist

    try:
        result = body()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    _exit_now()


def train_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Train :class:`Net` with the DGP hook, then with the ADGP hook; save what happened."""

    def body():
        _init(rank, world, port, 60.0)
        return {
            "dgp": _train(rank, "dgp", {"top": 0.05, "keep": 0.2}),
            "adgp": _train(rank, "adgp", {"top": 0.05, "keep": 0.2}),
        }

    _run_rank(rank, out_dir, body)


DEVICE_STEPS = 3


def device_codec_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """The hook's device path on CPU tensors: the Triton codec forced (interpreter), both
    modes, a few steps, two buckets per step (the interpreter is slow)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

    def body():
        _init(rank, world, port, 120.0)
        return {
            "dgp": _train(rank, "dgp", {"top": 0.05, "keep": 0.2}, DEVICE_STEPS, "triton", 0.001),
            "adgp": _train(rank, "adgp", {"top": 0.05, "keep": 0.2}, DEVICE_STEPS, "triton", 0.001),
        }

    _run_rank(rank, out_dir, body)


def failure_worker(idx: int, ports: List[int], out_dir: str, timeout_s: float) -> None:
    """Two independent 2-rank groups in one spawn (process ``idx``: group ``idx // 2``, rank
    ``idx % 2``). Group 0: rank 1 crashes before step 2. Group 1: rank 1 hangs before step 2
    (it waits, bounded, until rank 0 has reported, then exits). Rank 0 of each group records
    how long its step took to fail and the error.

    Step 2, not 1: DDP's own forward of step 1 broadcasts the rebuilt bucket order, so a
    peer lost before it fails in DDP; from step 2 on the hook's collectives are the only
    ones."""
    group, rank = divmod(idx, 2)
    fail_file = os.path.join(out_dir, f"group{group}.fail")
    try:
        _init(rank, 2, ports[group], timeout_s)
        from torch.nn.parallel import DistributedDataParallel as DDP

        from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook

        model = DDP(make_model())
        model.register_comm_hook(DGPHookState(), dgp_hook)
        for step in range(4):
            if rank == 1 and step == 2:
                if group == 0:
                    os._exit(3)  # a crash: no clean shutdown of the process group
                deadline = time.monotonic() + timeout_s + 30.0
                while not os.path.exists(fail_file) and time.monotonic() < deadline:
                    time.sleep(0.1)  # hung, as far as rank 0 can tell
                os._exit(4)
            x, y = batch(rank, step)
            t0 = time.monotonic()
            try:
                nn.functional.cross_entropy(model(x), y).backward()
            except RuntimeError as exc:
                with open(fail_file + ".tmp", "w") as f:
                    f.write(f"{time.monotonic() - t0:.3f}\n{exc}")
                os.replace(fail_file + ".tmp", fail_file)
                os._exit(5)  # the process group is broken: exit without destroying it
        with open(os.path.join(out_dir, f"group{group}.done"), "w") as f:
            f.write("finished all steps")
    except BaseException:
        with open(os.path.join(out_dir, f"proc{idx}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def simulate(world: int, compressor: str, params: Dict, steps: int = STEPS) -> Dict:
    """One process replaying ``world`` ranks: one compressor (with error feedback) per rank,
    the decoded payloads summed in rank order in float32 and divided by ``world``, then SGD.
    For ``"adgp"``, rank 0's compressor state decides the positions (the broadcaster)."""
    from dgp_kernels import ops
    from dgp_kernels.codec import decode_accumulate, encode
    from dgp_kernels.compressor import AlignedPositions, get_compressor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        ps = list(model.parameters())
        numels = [p.numel() for p in ps]
        p = dict(params)
        top, keep = (p.pop("top"), p.pop("keep")) if compressor == "adgp" else (None, None)
        comps = [get_compressor(compressor, **p) for _ in range(world)]
        snaps = []
        for step in range(steps):
            grads = []
            for r in range(world):
                x, y = batch(r, step)
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                grads.append([q.grad.detach().clone().reshape(-1) for q in ps])
            acc = torch.zeros(sum(numels))
            if compressor == "adgp":
                res0 = comps[0].memory.peek()
                idx = []
                for i, g in enumerate(grads[0]):
                    v = g if res0 is None else g + res0[i].view(-1)
                    idx.append(ops.select(v, top, keep)[0])
                pos = AlignedPositions(tuple(idx), tuple(numels))
                chunks = []
                for r in range(world):
                    comps[r].set_positions(pos)
                    chunks.append(torch.cat([l.values for l in comps[r].compress(grads[r]).layers]))
                total = torch.stack(chunks).sum(0) / world
                flat_idx = torch.cat([ix + off for ix, off in zip(idx, [0] + list(torch.tensor(numels).cumsum(0)[:-1].tolist()))])
                acc[flat_idx] = total
            else:
                payloads = [encode(comps[r].compress(grads[r])) for r in range(world)]
                decode_accumulate(payloads, acc, numels=numels, strict=True)
                acc.div_(world)
            for q, a in zip(ps, acc.split(numels)):
                q.grad = a.view_as(q).clone()
            opt.step()
            snaps.append(flat_params(model))
        return {"params": torch.stack(snaps)}
    finally:
        torch.set_num_threads(threads)


def nccl_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One NCCL rank on CUDA: both hook modes for a few steps (device follows the bucket)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook

    def body():
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        out = {}
        for mode in ("dgp", "adgp"):
            model = DDP(make_model().cuda(), device_ids=[rank])
            state = DGPHookState(compressor=mode)
            model.register_comm_hook(state, dgp_hook)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            losses = []
            for step in range(4):
                x, y = batch(rank, step)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x.cuda()), y.cuda())
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            out[mode] = {"losses": losses, "steps": [s.__dict__ for s in state.steps],
                         "grad_device": str(next(model.parameters()).grad.device)}
        return out

    _run_rank(rank, out_dir, body)


OVERLAP_DELAY_S = 1.5
OVERLAP_STEPS = 3  # step 0 builds the buckets, step 1 rebuilds them, step 2 is observed


class Wide(nn.Module):
    """Four 128x128 layers: one bucket per layer with ``bucket_cap_mb=0.04``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(128, 128, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def overlap_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Both hook modes; in the last step rank 1 starts its backward pass
    ``OVERLAP_DELAY_S`` late, so no collective can complete before then. Rank 0 records
    when each hook call began and returned and when each returned future completed."""

    def body():
        _init(rank, world, port, 120.0)
        from torch.nn.parallel import DistributedDataParallel as DDP

        from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook

        out = {}
        for mode in ("dgp", "adgp"):
            torch.manual_seed(0)
            model = DDP(Wide(), bucket_cap_mb=0.04)
            state = DGPHookState(compressor=mode, params={"top": 0.05, "keep": 0.2})
            events: List[Dict] = []

            def timed(st, bucket, events=events):
                ev = {"index": bucket.index(), "call": time.perf_counter()}
                fut = dgp_hook(st, bucket)
                ev["returned"] = time.perf_counter()
                events.append(ev)

                def done(f, ev=ev):
                    ev["done"] = time.perf_counter()
                    return f.value()

                return fut.then(done)  # DDP waits for this one: "done" is set by then

            model.register_comm_hook(state, timed)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            snaps = []
            for step in range(OVERLAP_STEPS):
                g = torch.Generator().manual_seed(100 * rank + step)
                x = torch.randn(8, 128, generator=g)
                opt.zero_grad()
                loss = model(x).square().mean()
                del events[:]
                if step == OVERLAP_STEPS - 1 and rank == 1:
                    time.sleep(OVERLAP_DELAY_S)
                t0 = time.perf_counter()
                loss.backward()
                t_end = time.perf_counter()
                opt.step()
                snaps.append(flat_params(model.module))
            out[mode] = {"events": [dict(e, call=e["call"] - t0, returned=e["returned"] - t0,
                                         done=e["done"] - t0) for e in events],
                         "backward_s": t_end - t0, "params": torch.stack(snaps)}
        return out

    _run_rank(rank, out_dir, body)


THREADS_STEPS = 5
THREADS_DELAY_S = 1.0


class WideBN(nn.Module):
    """:class:`Wide` with a BatchNorm after each layer: DDP broadcasts its running statistics
    from rank 0 at the start of every forward pass, on the main thread, so the main thread's
    collectives and the aligned hook's worker-thread collectives share one process group."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(128, 128, bias=False) for _ in range(4))
        self.norms = nn.ModuleList(nn.BatchNorm1d(128) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms):
            x = torch.tanh(norm(layer(x)))
        return x


def _thread_busy_ns(native_id: int) -> int:
    """Nanoseconds a thread of this process spent on a CPU or ready to run and queued for
    one (schedstat fields 1 and 2): a thread that spins accumulates them at wall-clock rate
    however busy the machine is; a thread asleep on a lock or a socket does not."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        a = f.read().split()
    return int(a[0]) + int(a[1])


def threads_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """The aligned hook with bfloat16 values in a ``world``-rank group, several buckets and
    DDP's buffer broadcasts: every collective the hook issues is logged (op, size, dtype,
    issuing thread). In the last step the last rank starts its backward pass
    ``THREADS_DELAY_S`` late. Every other rank's hook worker then waits for that peer in
    the first bucket's collectives; a sampler thread records how long the worker was
    running or runnable in the middle of the wait, from 0.4 to 0.8 of the delay after the
    backward pass began (asleep: about 0)."""

    def body():
        import threading

        import torch.distributed as dist

        _init(rank, world, port, 60.0)
        from torch.nn.parallel import DistributedDataParallel as DDP

        from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook

        log: List = []
        lock = threading.Lock()

        def logged(name, fn):
            def call(tensor, *a, **k):
                with lock:
                    log.append((name, int(tensor.numel()), str(tensor.dtype), threading.current_thread().name))
                return fn(tensor, *a, **k)
            return call

        dist.broadcast = logged("broadcast", dist.broadcast)
        dist.all_reduce = logged("all_reduce", dist.all_reduce)
        torch.manual_seed(0)
        model = DDP(WideBN(), bucket_cap_mb=0.04)
        state = DGPHookState(compressor="adgp", params={"top": 0.05, "keep": 0.2, "value_dtype": "bfloat16"})
        model.register_comm_hook(state, dgp_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        snaps = []
        for step in range(THREADS_STEPS):
            g = torch.Generator().manual_seed(100 * rank + step)
            x = torch.randn(8, 128, generator=g)
            opt.zero_grad()
            loss = model(x).square().mean()
            last = step == THREADS_STEPS - 1
            if last and rank == world - 1:
                time.sleep(THREADS_DELAY_S)
            busy: List[float] = []
            if last:
                worker = next(t for t in threading.enumerate() if t.name == "dgp_hook-aligned")

                def sample(t0):
                    time.sleep(max(0.0, t0 + 0.4 * THREADS_DELAY_S - time.perf_counter()))
                    b0 = _thread_busy_ns(worker.native_id)
                    time.sleep(max(0.0, t0 + 0.8 * THREADS_DELAY_S - time.perf_counter()))
                    busy.append((_thread_busy_ns(worker.native_id) - b0) / 1e9)

                sampler = threading.Thread(target=sample, args=(time.perf_counter(),))
                sampler.start()
            t0 = time.perf_counter()
            loss.backward()
            wall = time.perf_counter() - t0
            if last:
                sampler.join()
            opt.step()
            snaps.append(flat_params(model.module))
        return {"log": log, "params": torch.stack(snaps), "backward_s": wall, "worker_busy_s": busy[0],
                "buckets": state.steps[-1].buckets}

    _run_rank(rank, out_dir, body)
