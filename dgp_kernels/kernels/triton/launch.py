"""The launcher: sequences the phases of one call over all its layers.

Sampled path (the default for float32/float16/bfloat16), six launches whatever the number
of layers, no host synchronisation until one read of a few flags at the end:

1. memset of the call's zeroed workspace (histograms, tickets, counters, descriptors);
2. ``sample_kernel``: sampled first-digit histograms, key ranges per boundary;
3. ``gather_kernel``: first full read of ``g`` (and ``e``): NaN flags, totals, candidates
   into per-layer slots, validation of the ranges;
4. ``refine_kernel``: one ``RANGE_BITS``-bit digit level over the candidates;
5. ``compact_kernel``: the candidates left in a window into a second slot, then every
   remaining level in one program per layer: exact thresholds;
6. ``write_kernel``: second full read, counts, look-back prefix, ordered writes.

Then the flags (NaN per layer, sample missed per layer) come back to the host: a NaN
raises (the write pass wrote nothing), and missed layers are rerun on the exact path.

Exact path (float64, forced, and the rerun): memset, ``hist_kernel`` (full read), one host
synchronisation (NaN flags, candidate counts), then ``gather_kernel`` and one
``refine_kernel`` per digit over a candidate buffer, or, when the boundary buckets are
huge, one ``refine_kernel`` per (wider) digit over the data, then ``write_kernel``.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .common import (
    FIRST_DIGIT_BITS, INF_KEY, KINDS, LANES, MAX_LAYER, RANGE_BITS, REL_BINS, TL_DTYPE,
)
from .gather import gather_kernel, hist_kernel
from .plan import Plan, block_table, cumulative, get_plan, to_device
from .refine import compact_kernel, refine_kernel
from .sample import sample_kernel
from .tuning import DEFAULT, Tuning
from .write import write_kernel

SAMPLED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class CallInfo:
    """What a call did (pass one as ``info=`` to :func:`band_multi_triton`): the path, the
    layers whose sample missed (rerun exactly), every device launch in order (kernels by
    name, ``"memset"`` for the workspace fill), and the host synchronisations."""

    path: str = ""
    missed: List[int] = field(default_factory=list)
    launches: List[str] = field(default_factory=list)
    syncs: int = 0
    replayed: bool = False  # served by a CUDA graph replay
    # dry run (``compile_check``): record ``(kernel, grid, args, constexprs)`` instead of
    # launching; the host reads then see zeroed flags (one candidate per layer assumed)
    dry_run: bool = False
    records: List[tuple] = field(default_factory=list)


@dataclass(frozen=True)
class Mode:
    """What a call computes, beyond the shapes: selects the kernel variants."""

    dtype: torch.dtype
    has_e: bool
    dense: bool
    sparse: bool  # write indices and values
    aligned: bool  # every data pointer 16-byte aligned


def _run(kernel, grid, info: Optional[CallInfo], *args, **consts) -> None:
    """Every Triton launch of the backend goes through here (``info`` counts them)."""
    if info is not None:
        info.launches.append(kernel.fn.__name__)
        if info.dry_run:
            info.records.append((kernel, grid, args, consts))
            return
    kernel[grid](*args, **consts)


def _arena(device, n64: int, n32: int, info: Optional[CallInfo]) -> Tuple[Tensor, Tensor]:
    """One zeroed workspace (one memset) as an int64 part and an int32 part."""
    if info is not None:
        info.launches.append("memset")
    raw = torch.zeros(8 * max(n64, 1) + 4 * max(n32, 1), dtype=torch.uint8, device=device)
    return raw[:8 * max(n64, 1)].view(torch.int64), raw[8 * max(n64, 1):].view(torch.int32)


def _split(t: Tensor, sizes: Sequence[int]) -> List[Tensor]:
    return list(torch.split(t[:sum(sizes)], list(sizes)))


def _write(plan: Plan, ptrs, S, cfg: Mode, tuning, seg_n, thr, desc, ticket, stop,
           info) -> None:
    """Phase 6 (both paths): the ordered write with its look-back prefix."""
    if plan.n_blocks == 0 or not (cfg.sparse or cfg.has_e or cfg.dense):
        return
    g_ptrs, e_ptrs, d_ptrs, o_ptrs = ptrs
    _run(write_kernel, (plan.n_blocks,), info,
         g_ptrs, e_ptrs, d_ptrs, o_ptrs, seg_n, plan.blk_seg, plan.blk_start, plan.seg_first,
         plan.active, thr, plan.out_off, desc, ticket, stop, S, max(plan.n_blocks, 1),
         DT=TL_DTYPE[cfg.dtype], KIND=KINDS[cfg.dtype][0], HAS_E=cfg.has_e,
         ALIGNED=cfg.aligned, WRITE_SPARSE=cfg.sparse, WRITE_E=cfg.has_e,
         WRITE_DENSE=cfg.dense, BLOCK_=tuning.block, LB=tuning.lookback,
         num_warps=tuning.num_warps)


def launch_sampled(plan: Plan, ptrs: Tensor, S: int, cfg: Mode, tuning: Tuning,
                   info: Optional[CallInfo]) -> Tensor:
    """Queue the sampled path (no host synchronisation, so it can be captured in a CUDA
    graph). ``ptrs``: int64 pointer table (g, e, dense: S each; the two outputs). Returns
    the flags ``[NaN per layer, missed per layer, wide per layer, the call's NaN]``."""
    device = plan.seg_n.device
    kind, key_bits = KINDS[cfg.dtype][:2]
    shift = key_bits - FIRST_DIGIT_BITS
    fine = tuning.fine_bits if tuning.fine_bits <= shift else 0
    nb1 = 1 << FIRST_DIGIT_BITS
    nbins_a = 1 << RANGE_BITS.value
    nblk = max(plan.n_blocks, 1)
    sizes64 = [4 * S, 3 * S + 1, S, S, S, 2 * S * LANES, 3 * nblk, 1]
    sizes32 = [S * nb1 + S * (nb1 << fine), 2 * S * nbins_a]
    w64, w32 = _arena(device, sum(sizes64), sum(sizes32), info)
    tick, flags, fill, fill2, tail_n, totals, desc, ticket = _split(w64, sizes64)
    tick = tick.view(4, S)
    hist, hist_a = _split(w32, sizes32)
    state = torch.empty(8 * S + 5 * S, dtype=torch.int64, device=device)
    bnd, thr = state[:8 * S], state[8 * S:]  # windows [4, 2S]; thresholds [5, S]
    key_dtype = torch.int64 if key_bits > 31 else torch.int32
    cand_key = torch.empty(max(plan.n_cap, 1), dtype=key_dtype, device=device)
    keys2 = torch.empty(max(plan.n_cap2, 1), dtype=key_dtype, device=device)
    g_ptrs, e_ptrs = ptrs[0], ptrs[1]
    common = dict(DT=TL_DTYPE[cfg.dtype], KIND=kind, HAS_E=cfg.has_e, ALIGNED=cfg.aligned,
                  num_warps=tuning.num_warps)
    _run(sample_kernel, (S, tuning.sample_split), info,
         g_ptrs, e_ptrs, plan.seg_n, hist, tick[0], plan.rank0, plan.active, bnd,
         flags[2 * S:], S, SHIFT=shift, NBINS=nb1, SAMPLE_=tuning.sample,
         SPLIT=tuning.sample_split, TILE_=tuning.tile, SIGMAS=tuning.sample_sigmas,
         SLACK=tuning.sample_slack, REL=REL_BINS.value, FINE=fine, **common)
    _run(gather_kernel, (plan.n_blocks,), info,
         g_ptrs, e_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start, bnd, plan.cap_off, plan.cap,
         fill, cand_key, totals, flags, tick[1], plan.seg_nblk, plan.active, tail_n, S,
         SAMPLED=True, INF_KEY=INF_KEY[cfg.dtype], BLOCK_=tuning.block, LANES=LANES, **common)
    chunks = (fill, plan.cap_seg, plan.cap_start, plan.cap_nchk, plan.cap_off, cand_key)
    _run(refine_kernel, (plan.n_cap_chunks,), info,
         g_ptrs, e_ptrs, *chunks, bnd, hist_a, tick[2], thr, S, FROM_CAND=True, W=RANGE_BITS.value,
         NBINS=nbins_a, TILE_=tuning.tile, CHUNK_=tuning.cand_chunk, FINAL=False, **common)
    _run(compact_kernel, (plan.n_cap_chunks,), info,
         *chunks, bnd, keys2, plan.off2, plan.cap2, fill2, tick[3], plan.active, flags,
         tail_n, thr, S, KIND=kind, TILE_=tuning.tile, CHUNK_=tuning.cand_chunk,
         num_warps=tuning.num_warps)
    _write(plan, ptrs, S, cfg, tuning, tail_n, thr, desc, ticket, flags[3 * S:], info)
    return flags


def launch_exact(plan: Plan, ptrs: Tensor, S: int, cfg: Mode, tuning: Tuning,
                 nan_message: Callable[[int], str], info: Optional[CallInfo]) -> None:
    """Queue the exact path: the first-digit histogram, one host synchronisation (NaN
    raises before anything is written; the candidate counts choose candidates or data),
    then one refinement launch per digit and the write."""
    device = plan.seg_n.device
    kind, key_bits, widths_cand, widths_data = KINDS[cfg.dtype]
    shift = key_bits - FIRST_DIGIT_BITS
    nb1 = 1 << FIRST_DIGIT_BITS
    nblk = max(plan.n_blocks, 1)
    levels = max(len(widths_cand), len(widths_data))
    bins = [max([1 << ws[i] for ws in (widths_cand, widths_data) if i < len(ws)] + [32])
            for i in range(levels)]  # per level, the larger of the two digit widths
    sizes64 = [(1 + levels) * S, 2 * S, S, 3 * nblk, 1]
    sizes32 = [S * nb1] + [2 * S * b for b in bins]
    w64, w32 = _arena(device, sum(sizes64), sum(sizes32), info)
    tick, flags, fill, desc, ticket = _split(w64, sizes64)
    tick = tick.view(1 + levels, S)
    hist, *level_hists = _split(w32, sizes32)
    state = torch.empty(8 * S + 5 * S, dtype=torch.int64, device=device)
    bnd, thr = state[:8 * S], state[8 * S:]
    g_ptrs, e_ptrs = ptrs[0], ptrs[1]
    common = dict(DT=TL_DTYPE[cfg.dtype], KIND=kind, HAS_E=cfg.has_e, ALIGNED=cfg.aligned,
                  num_warps=tuning.num_warps)
    if plan.n_chunks:
        _run(hist_kernel, (plan.n_chunks,), info,
             g_ptrs, e_ptrs, plan.seg_n, plan.chk_seg, plan.chk_start, plan.chk_nchk, hist,
             flags, tick[0], plan.rank0, plan.active, bnd, S, INF_KEY=INF_KEY[cfg.dtype],
             SHIFT=shift, NBINS=nb1, TILE_=tuning.tile, CHUNK_=tuning.chunk, **common)
    host = flags.tolist()  # the exact path's one mid-call host synchronisation
    if info is not None:
        info.syncs += 1
    for i, f in enumerate(host[:S]):
        if f:
            raise ValueError(nan_message(i))
    if plan.n_blocks == 0:
        return
    cand_ns = host[S:]
    if info is not None and info.dry_run:
        cand_ns = [1] * S
    n_cand = sum(cand_ns)
    if tuning.path == "candidates":
        use_cand = True
    elif tuning.path == "data":
        use_cand = False
    else:
        use_cand = n_cand <= max(tuning.cand_min, plan.n_total // tuning.cand_fraction)
    if use_cand:
        widths = widths_cand
        cc_seg, cc_start, _, cc_count = block_table(cand_ns, tuning.cand_chunk)
        cand_n, c_seg, c_start, c_nchk, cand_off = to_device(
            [cand_ns, cc_seg, cc_start, cc_count, cumulative(cand_ns)], device)
        cand_key = torch.empty(max(n_cand, 1), dtype=torch.int64 if key_bits > 31 else torch.int32,
                               device=device)
        _run(gather_kernel, (plan.n_blocks,), info,
             g_ptrs, e_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start, bnd, cand_off, cand_n,
             fill, cand_key, fill, flags, tick[0], plan.seg_nblk, plan.active, fill, S,
             SAMPLED=False, INF_KEY=INF_KEY[cfg.dtype], BLOCK_=tuning.block, LANES=LANES,
             **common)
        src = (fill, c_seg, c_start, c_nchk, cand_off, cand_key)
        n_src, chunk = len(cc_seg), tuning.cand_chunk
    else:
        widths = widths_data
        src = (plan.seg_n, plan.chk_seg, plan.chk_start, plan.chk_nchk, plan.seg_n, g_ptrs)
        n_src, chunk = plan.n_chunks, tuning.chunk
    for level, w in enumerate(widths):
        # >= 32 bins: older triton lowers tl.histogram with a warp-ballot scheme that
        # asserts num_bins % 32 == 0 (the 4-bit digit of 16-bit floats uses 16 of 32)
        if n_src:
            _run(refine_kernel, (n_src,), info,
                 g_ptrs, e_ptrs, *src, bnd, level_hists[level], tick[1 + level], thr, S,
                 FROM_CAND=use_cand, W=w, NBINS=max(1 << w, 32), TILE_=tuning.tile,
                 CHUNK_=chunk, FINAL=level == len(widths) - 1, **common)
    _write(plan, ptrs, S, cfg, tuning, plan.seg_n, thr, desc, ticket, plan.zero, info)


def check_layers(ns: Sequence[int]) -> None:
    """Layers the data passes can index in int32, or a clear error before any launch."""
    for i, n in enumerate(ns):
        if n > MAX_LAYER:
            raise ValueError(
                f"tensor {i} of the call has {n} elements; the Triton kernels index a layer "
                f"with 32-bit integers and take at most {MAX_LAYER} (2^31 - 2^16) elements "
                "per tensor: split it into smaller layers, or run it through "
                "dgp_kernels.ops.reference (pure torch, any size, slower)")


def sampled_outcome(flags, S: int, nan_message, info: Optional[CallInfo]) -> List[int]:
    """The sampled path's one device->host synchronisation: raise on a NaN (the write pass
    wrote nothing), else return the layers whose sample missed (to rerun exactly)."""
    host = flags[:2 * S].tolist() if isinstance(flags, Tensor) else flags
    if info is not None:
        info.syncs += 1
    for i, f in enumerate(host[:S]):
        if f:
            raise ValueError(nan_message(i))
    missed = [i for i, f in enumerate(host[S:]) if f]
    if info is not None:
        info.missed = missed
    return missed


def pointer_table(gs, e_list, d_list, out_idx, out_val) -> List[int]:
    return [t.data_ptr() for x in (gs, e_list, d_list) for t in x] + [
        out_idx.data_ptr(), out_val.data_ptr()]


def band_multi_triton(
    gs: Sequence[Tensor],
    top: float,
    keep: float,
    *,
    residuals: Optional[Sequence[Tensor]] = None,
    dense: Optional[Sequence[Tensor]] = None,
    want_sparse: bool = True,
    nan_message: Optional[Callable[[int], str]] = None,
    tuning: Tuning = DEFAULT,
    graphs: bool = False,
    info: Optional[CallInfo] = None,
) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """Band selection of the layers ``gs`` (contiguous, one dtype and device) in one call.

    ``residuals`` (contiguous, like ``gs``): error feedback, ``v = g + e`` and ``e`` is
    overwritten with ``v`` minus the band. ``dense`` (contiguous, like ``gs``; may be ``gs``
    itself): receives ``v`` with everything outside the band zeroed. ``want_sparse``:
    return ``(indices int64, values, offsets int64[len(gs)+1])`` concatenated over layers.
    ``nan_message(i)``: the ``ValueError`` text when layer ``i`` holds a NaN; nothing is
    written before that check. ``tuning``: how to split the work (every setting gives the
    same bits). ``graphs``: replay the sampled path from a CUDA graph captured per (shapes,
    dtype, mode, tuning) (see :mod:`.graphs`). ``info``: filled with what the call did.
    """
    from . import graphs as _graphs  # (graphs imports this module)

    nan_message = nan_message or (lambda i: f"gs[{i}] contains NaN")
    S = len(gs)
    dtype, device = gs[0].dtype, gs[0].device
    ns = tuple(g.numel() for g in gs)
    check_layers(ns)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "dgp ops cannot run inside a CUDA graph capture: each call reads a few flags "
                "back to the host (NaN, sample misses). Call them outside the capture; "
                "dgp_kernels.kernels.triton.cuda_graphs() makes dgp_kernels capture and "
                "replay its own kernels.")
        if device.index != torch.cuda.current_device():
            # Triton launches on the current device and stream: run on the tensors' own
            with torch.cuda.device(device):
                return band_multi_triton(
                    gs, top, keep, residuals=residuals, dense=dense, want_sparse=want_sparse,
                    nan_message=nan_message, tuning=tuning, graphs=graphs, info=info)
    has_e = residuals is not None
    plan = get_plan(ns, top, keep, device, tuning)
    e_list = residuals if has_e else gs
    d_list = dense if dense is not None else gs
    n_out = plan.total if want_sparse else 1
    out_idx = torch.empty(n_out, dtype=torch.int64, device=device)
    out_val = torch.empty(n_out, dtype=dtype, device=device)
    if tuning.path == "auto":
        sampled = plan.n_total >= tuning.sampled_min_total and dtype in SAMPLED_DTYPES
    else:
        sampled = tuning.path == "sampled"
    sampled = bool(sampled and plan.n_blocks)
    table = pointer_table(gs, e_list, d_list, out_idx, out_val)
    cfg = Mode(dtype, has_e, dense is not None, want_sparse and plan.total > 0,
               functools.reduce(operator.or_, table[:3 * S], 0) & 15 == 0)
    if info is not None:
        info.path = "sampled" if sampled else "exact"
    flags = None
    missed: List[int] = []
    if sampled and graphs and device.type == "cuda":
        flags, offsets = _graphs.replay(plan, table, S, cfg, tuning, info)
        if flags is not None:
            missed = sampled_outcome(flags, S, nan_message, info)
    if flags is None:  # eager
        ptrs, offsets = to_device([table, plan.out_off_host], device)
        ptrs = torch.split(ptrs, [S, S, S, 2])
        if sampled:
            flags = launch_sampled(plan, ptrs, S, cfg, tuning, info)
            missed = sampled_outcome(flags, S, nan_message, info)
        else:
            launch_exact(plan, ptrs, S, cfg, tuning, nan_message, info)
    if missed:  # the layers whose sample missed, on the exact path, into their slots
        pick = lambda xs: None if xs is None else [xs[i] for i in missed]  # noqa: E731
        sub_info = CallInfo() if info is not None else None
        sub = band_multi_triton(
            pick(gs), top, keep, residuals=pick(residuals), dense=pick(dense),
            want_sparse=want_sparse, nan_message=lambda j: nan_message(missed[j]),
            tuning=tuning.replace(path="auto", sampled_min_total=1 << 62), info=sub_info)
        if info is not None:
            info.launches += sub_info.launches
            info.syncs += sub_info.syncs
        if want_sparse:
            sub_off = 0
            for i in missed:
                a, b = plan.out_off_host[i], plan.out_off_host[i + 1]
                out_idx[a:b] = sub[0][sub_off:sub_off + b - a]
                out_val[a:b] = sub[1][sub_off:sub_off + b - a]
                sub_off += b - a
    return (out_idx, out_val, offsets) if want_sparse else None
