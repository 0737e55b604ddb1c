"""The launch plan: everything about a call that depends only on its shapes.

A plan holds the segment tables (per layer: size, ranks, output offset, first block) and
the block and chunk tables of every launch (``block -> (layer, start)``), built on the
host and copied to the device in one transfer. Plans are cached per (layer sizes, top,
keep, device, stream, tuning): a training loop calls with the same shapes every step, and
building the tables in Python costs about 1 ms for 25M elements. Per stream, because a
plan's tables are copied on the stream that built it and go back to that stream's memory
pool when the cache drops the plan.
"""

from __future__ import annotations

import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ...ops.checks import band_counts
from .tuning import Tuning

CACHE_SIZE = 16


def block_table(ns: Sequence[int], size: int) -> Tuple[List[int], List[int], List[int], List[int]]:
    """``(layer of block, start of block, first block of layer, blocks of layer)``."""
    seg, start, first, count = [], [], [], []
    for s, n in enumerate(ns):
        nb = -(-n // size)
        first.append(len(seg))
        count.append(nb)
        seg.extend([s] * nb)
        start.extend(range(0, nb * size, size))
    return seg, start, first, count


def cumulative(xs: Sequence[int]) -> List[int]:
    """``[0, x0, x0 + x1, ...]``."""
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def to_device(parts: Sequence[Sequence[int]], device: torch.device) -> List[Tensor]:
    """Int64 tensors of ``parts`` on ``device`` in one (pinned, asynchronous) transfer.
    (Through an ``array``: half the host time of ``torch.tensor`` on a list of a few
    hundred pointers.)"""
    flat = array.array("q", [x for p in parts for x in p])
    host = torch.frombuffer(flat, dtype=torch.int64) if flat else torch.empty(0, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, [len(p) for p in parts]))


@dataclass
class Plan:
    """The shape-only tables of a call (device tensors, int64) and their sizes."""

    key: tuple
    counts: List[Tuple[int, int]]  # (k_top, k_keep) per layer
    out_off_host: List[int]
    total: int  # entries kept in all
    n_total: int  # entries in all
    n_blocks: int
    n_chunks: int
    n_cap: int  # sampled path: candidate slot entries in all
    n_cap_chunks: int
    n_cap2: int  # sampled path: second slot entries in all
    seg_n: Tensor  # [S] layer sizes
    rank0: Tensor  # [2S] ranks of the upper and lower boundary of each layer
    out_off: Tensor  # [S+1] first output slot of each layer
    active: Tensor  # [S] 1 when the layer's band is non-empty
    blk_seg: Tensor  # blocks of the full passes
    blk_start: Tensor
    seg_first: Tensor  # [S] first block of each layer
    seg_nblk: Tensor  # [S] blocks of each layer
    chk_seg: Tensor  # chunks of the data (exact histogram, refinement over the data)
    chk_start: Tensor
    chk_nchk: Tensor
    cap: Tensor  # [S] sampled path: candidate slot of each layer
    cap_off: Tensor  # [S+1]
    cap_seg: Tensor  # chunks over the slots
    cap_start: Tensor
    cap_nchk: Tensor
    cap2: Tensor  # [S] sampled path: second slot of each layer
    off2: Tensor  # [S+1]
    zero: Tensor  # [1] a zero flag (the write pass's ``stop`` on the exact path)


_PLANS: "OrderedDict[tuple, Plan]" = OrderedDict()


def capacity(n: int, tuning: Tuning) -> int:
    """Candidate slot of a layer on the sampled path: the whole layer when it was sampled
    entirely (its boundary buckets may hold everything), else ``n / cand_fraction``."""
    return n if n <= tuning.sample else max(tuning.sample, n // tuning.cand_fraction)


def capacity2(n: int, tuning: Tuning) -> int:
    """Second slot of a layer (the keys one program refines): ``tail_min`` or n / 1024."""
    return min(capacity(n, tuning), max(tuning.tail_min, n >> 10))


def get_plan(ns: Tuple[int, ...], top: float, keep: float, device: torch.device,
             tuning: Tuning) -> Plan:
    """The cached plan of layer sizes ``ns`` (built on a miss)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (ns, float(top), float(keep), str(device), stream, tuning)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    counts = [band_counts(n, top, keep) for n in ns]
    out_off = cumulative([kk for _, kk in counts])
    ranks = []
    for kt, kk in counts:
        ranks += [kt, kt + kk - 1] if kk > 0 else [0, 0]
    b_seg, b_start, b_first, b_count = block_table(ns, tuning.block)
    c_seg, c_start, _, c_count = block_table(ns, tuning.chunk)
    caps = [capacity(n, tuning) for n in ns]
    cap_off = cumulative(caps)
    p_seg, p_start, _, p_count = block_table(caps, tuning.cand_chunk)
    caps2 = [capacity2(n, tuning) for n in ns]
    off2 = cumulative(caps2)
    tensors = to_device(
        [ns, ranks, out_off, [int(kk > 0) for _, kk in counts], b_seg, b_start, b_first,
         b_count, c_seg, c_start, c_count, caps, cap_off, p_seg, p_start, p_count, caps2,
         off2, [0]], device)
    plan = Plan(key, counts, out_off, out_off[-1], sum(ns), len(b_seg), len(c_seg),
                cap_off[-1], len(p_seg), off2[-1], *tensors)
    _PLANS[key] = plan
    if len(_PLANS) > CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def clear_cache() -> None:
    """Drop every cached plan (their device tables go back to the memory pool)."""
    _PLANS.clear()
