"""pytest-benchmark suites for DGP band selection. Not part of `pytest`.

    pytest bench/bench_select.py --benchmark-only --benchmark-group-by=group
    DGP_BENCH_SIZE=2000000 DGP_BENCH_THREADS=1 DGP_BENCH_ROUNDS=3 pytest bench/bench_select.py

Two inputs, each a benchmark group per thread count: the gradient list of the CIFAR ResNet-18
(62 tensors, 11.2M elements, one real forward/backward on a random batch of 8) and one
float32 ``randn`` tensor of ``DGP_BENCH_SIZE`` elements (default 25M). Methods: ours
(``select_ef_multi``, ``select_multi``, ``select`` per layer) against the baselines in
:mod:`dgp_kernels.ops.baselines` (the authors' operator with error feedback, one topk per
layer, clone) and ``copy_`` into existing buffers. Residuals are zeroed in ``setup``
(untimed) so every round does the same work.

Environment: ``DGP_BENCH_SIZE`` (elements of the large tensor), ``DGP_BENCH_THREADS``
(comma-separated, default ``1,2``), ``DGP_BENCH_ROUNDS`` (timed rounds, default 5).
The one-process comparison table with ratios is ``dgp bench`` (dgp_kernels/benchmarks.py).
With a CUDA device the ``*-cuda`` groups time the same inputs on the GPU.
"""

import os

import pytest
import torch

import dgp_kernels
from dgp_kernels.speed import model_gradients
from dgp_kernels.ops.baselines import authors_dgp, clone_all, single_topk

SIZE = int(os.environ.get("DGP_BENCH_SIZE", "25000000"))
THREADS = [int(t) for t in os.environ.get("DGP_BENCH_THREADS", "1,2").split(",")]
ROUNDS = int(os.environ.get("DGP_BENCH_ROUNDS", "5"))
TOP, KEEP = 0.05, 0.20


@pytest.fixture(scope="session")
def resnet18_grads():
    return model_gradients("resnet18_cifar", "real", batch=8, seed=0)[0]


@pytest.fixture(scope="session")
def big_tensor():
    return [torch.randn(SIZE, generator=torch.Generator().manual_seed(1))]


@pytest.fixture(params=["resnet18", "tensor"])
def case(request):
    name = request.param
    gs = request.getfixturevalue("resnet18_grads" if name == "resnet18" else "big_tensor")
    return name, gs


@pytest.fixture(params=THREADS, ids=lambda t: f"t{t}")
def threads(request):
    prev = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(prev)


def _run(benchmark, case, threads, fn, residuals=None):
    name, gs = case
    benchmark.group = f"{name}-{threads}thread"
    benchmark.extra_info.update(
        threads=threads, n_tensors=len(gs), numel=sum(g.numel() for g in gs),
        backend=str(dgp_kernels.backend_info()), torch=torch.__version__,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
    )

    def setup():
        for e in residuals or ():
            e.zero_()

    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def test_ours_select_ef_multi(benchmark, case, threads):
    gs = case[1]
    res = [torch.zeros_like(g) for g in gs]
    _run(benchmark, case, threads, lambda: dgp_kernels.select_ef_multi(gs, res, TOP, KEEP), res)


def test_ours_select_multi(benchmark, case, threads):
    gs = case[1]
    _run(benchmark, case, threads, lambda: dgp_kernels.select_multi(gs, TOP, KEEP))


def test_ours_select_per_layer(benchmark, case, threads):
    gs = case[1]
    _run(benchmark, case, threads, lambda: [dgp_kernels.select(g, TOP, KEEP) for g in gs])


def test_authors_ef(benchmark, case, threads):
    gs = case[1]
    res = [torch.zeros_like(g) for g in gs]
    _run(benchmark, case, threads, lambda: authors_dgp(gs, res, TOP, KEEP), res)


def test_single_topk(benchmark, case, threads):
    gs = case[1]
    _run(benchmark, case, threads, lambda: single_topk(gs, KEEP))


def test_clone(benchmark, case, threads):
    gs = case[1]
    _run(benchmark, case, threads, lambda: clone_all(gs))


def test_copy(benchmark, case, threads):
    gs = case[1]
    bufs = [torch.empty_like(g) for g in gs]
    _run(benchmark, case, threads, lambda: [b.copy_(g) for b, g in zip(bufs, gs)])


# --------------------------------------------------------------------------------------
# GPU: the same inputs as CUDA tensors; skipped without a CUDA device. Each timed
# call ends with torch.cuda.synchronize(), so the wall time is the device time plus launch
# overhead (dgp_kernels/benchmarks_gpu.py gives CUDA-event times and bandwidth).
# --------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["resnet18", "tensor"])
def cuda_case(request):
    name = request.param
    gs = request.getfixturevalue("resnet18_grads" if name == "resnet18" else "big_tensor")
    return name, [g.cuda() for g in gs]


def _run_cuda(benchmark, case, fn, residuals=None):
    name, gs = case
    benchmark.group = f"{name}-cuda"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), n_tensors=len(gs),
                                numel=sum(g.numel() for g in gs), torch=torch.__version__)

    def setup():
        for e in residuals or ():
            e.zero_()
        torch.cuda.synchronize()

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, setup=setup, rounds=max(ROUNDS, 10), warmup_rounds=2, iterations=1)


@needs_cuda
def test_cuda_ours_select_ef_multi(benchmark, cuda_case):
    gs = cuda_case[1]
    res = [torch.zeros_like(g) for g in gs]
    _run_cuda(benchmark, cuda_case, lambda: dgp_kernels.select_ef_multi(gs, res, TOP, KEEP), res)


@needs_cuda
def test_cuda_ours_select_multi(benchmark, cuda_case):
    gs = cuda_case[1]
    _run_cuda(benchmark, cuda_case, lambda: dgp_kernels.select_multi(gs, TOP, KEEP))


@needs_cuda
def test_cuda_authors_ef(benchmark, cuda_case):
    gs = cuda_case[1]
    res = [torch.zeros_like(g) for g in gs]
    _run_cuda(benchmark, cuda_case, lambda: authors_dgp(gs, res, TOP, KEEP), res)


@needs_cuda
def test_cuda_single_topk(benchmark, cuda_case):
    gs = cuda_case[1]
    _run_cuda(benchmark, cuda_case, lambda: single_topk(gs, KEEP))


@needs_cuda
def test_cuda_clone(benchmark, cuda_case):
    gs = cuda_case[1]
    _run_cuda(benchmark, cuda_case, lambda: clone_all(gs))
