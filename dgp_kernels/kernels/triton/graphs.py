"""CUDA-graph replay of the sampled path (opt-in, explicit).

The sampled path has no host synchronisation before its final flag read, so one call is
one graph: a memset and five kernels, replayed with the call's pointers. Turn it on for
the ``torch.ops.dgp.*`` ops inside a ``with cuda_graphs():`` block (a context variable:
per thread and per asyncio task), or per call with ``band_multi_triton(..., graphs=True)``.

The first call per key (shapes, top, keep, dtype, mode, tuning, stream) runs eagerly so
that every kernel is compiled, the second captures, later ones replay: the pointers of the
call's tensors go into the graph's static table by one asynchronous copy, outputs are
written through that table into the call's fresh tensors, and the workspaces live in the
graph's private memory pool (about a quarter of the elements as candidate keys, plus
per-block descriptors), one pool per cached graph (``CACHE_SIZE``).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

CACHE_SIZE = 4

_ENABLED: contextvars.ContextVar = contextvars.ContextVar("dgp_cuda_graphs", default=False)


@contextlib.contextmanager
def cuda_graphs(enabled: bool = True) -> Iterator[None]:
    """Inside the block, the Triton implementations of the ``dgp::`` ops replay their
    sampled path from CUDA graphs (one per shape set and mode). Results are the same bits;
    what changes is the host time per call. Calls inside a *user's* graph capture still
    raise: every call reads its flags back to the host."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether the calling context asked for graph replay (:func:`cuda_graphs`)."""
    return _ENABLED.get()


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    table: Tensor  # the pointer table the graph reads: refilled before each replay
    flags: Tensor  # the sampled path's flags the graph writes
    plan: object  # keeps the plan's tensors (read by the graph) alive


_GRAPHS: "OrderedDict[tuple, _Graph]" = OrderedDict()
_SEEN: "OrderedDict[tuple, bool]" = OrderedDict()
_LOCK = threading.Lock()


def replay(plan, table: List[int], S: int, cfg, tuning, info) -> Tuple[Optional[list], Optional[Tensor]]:
    """``(flags, offsets)`` of the call replayed from its graph (captured on the key's
    second call; ``flags``: the NaN and missed flags read back to the host), or
    ``(None, None)`` on the first call (run it eagerly). Host threads take turns on a graph
    until its flags are read (the key includes the stream, so calls on different streams
    use different graphs)."""
    from .launch import launch_sampled
    from .plan import to_device

    key = (plan.key, cfg, tuning, torch.cuda.current_stream().cuda_stream)
    with _LOCK:
        entry = _GRAPHS.get(key)
        if entry is None:
            if key not in _SEEN:
                _SEEN[key] = True
                if len(_SEEN) > 4 * CACHE_SIZE:
                    _SEEN.popitem(last=False)
                return None, None
            static = torch.empty(len(table), dtype=torch.int64, device=plan.seg_n.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                flags = launch_sampled(plan, torch.split(static, [S, S, S, 2]), S, cfg,
                                       tuning, None)
            entry = _Graph(graph, static, flags, plan)
            _GRAPHS[key] = entry
            if len(_GRAPHS) > CACHE_SIZE:
                _GRAPHS.popitem(last=False)
        else:
            _GRAPHS.move_to_end(key)
        host = torch.tensor(table, dtype=torch.int64).pin_memory()
        entry.table.copy_(host, non_blocking=True)
        entry.graph.replay()
        if info is not None:
            info.replayed = True
        (offsets,) = to_device([plan.out_off_host], plan.seg_n.device)
        return entry.flags[:2 * S].tolist(), offsets


def clear_cache() -> None:
    """Drop every captured graph (and its memory pool)."""
    with _LOCK:
        _GRAPHS.clear()
        _SEEN.clear()
