"""Triton kernels for DGP band selection: kernel -> launcher -> wrapper, top to bottom.

Implements every ``dgp::`` op of :mod:`dgp_kernels.ops.select` for CUDA tensors (and, under
``TRITON_INTERPRET=1``, for CPU tensors, which is how CI checks them without a GPU).
Semantics are the contract of ../shared/DESIGN.md §2, bit for bit:

* ``v = g`` or, with error feedback, ``v = g + e`` rounded once to the storage dtype exactly as
  torch does (float16/bfloat16 add in float32 and round to nearest even once);
* key ``bits(v) & ~sign`` (31 bits for float32, 15 for float16/bfloat16, 63 for float64)
  orders ``|v|``; ranks by key descending, ties by ascending flat index; the band is ranks
  ``[k_top, k_top + k_keep)``; output indices (int64) ascending, values unchanged;
* a NaN in ``v`` raises ``ValueError`` naming the tensor before anything is written.

Phases (each one launch for *all* layers, driven by a segment table of per-layer pointers
and a block table ``block -> (layer, start)``; no grid-wide synchronisation, so the
interpreter, which runs programs one after another, executes them as the GPU would):

1. ``_hist_kernel``: ``v`` on the fly, NaN flag per layer, histogram of the first 11-bit key
   digit per layer. Nothing is written to user memory.
   Host: one sync reads the NaN flags (the only device->host sync of a call).
   Torch glue (on device, tiny): locate the digit bucket holding rank ``k_top`` (upper
   boundary) and rank ``k_top + k_keep - 1`` (lower boundary) of each layer.
2. ``_refine_kernel`` (one launch per remaining digit: 2 for float32, 1 for 16-bit floats,
   5 for float64): histogram of the next digit restricted to the keys whose prefix equals
   each boundary's prefix, until both boundary keys ``T_hi``, ``T_lo`` are exact, together
   with the boundary's ordinal among its equal keys (its rank inside the tie group, which
   by the tie rule is its position in index order). This reads the data again instead of
   keeping a candidate buffer, so a huge boundary bucket (all zeros, all equal) costs
   nothing extra and needs no fallback.
3. ``_count_kernel``: per block counts of keys strictly inside ``(T_lo, T_hi)`` and equal to
   each boundary; torch glue turns them into per-block output offsets and tie ordinals
   (segmented exclusive prefix sums: no per-element atomics).
   ``_write_kernel``: ordered compaction. Within a block, ``cumsum`` of the tie flags gives
   each tied entry its ordinal; kept = strictly inside, or tied at ``T_hi`` with ordinal
   ``>= skip_hi``, or tied at ``T_lo`` with ordinal ``<= take_lo``. Writes indices and
   values, the residual ``v`` with kept positions ``+0.0`` (error feedback), or the dense
   pruned tensor.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...ops import reference
from ...ops._checks import band_counts, check_fractions, check_grad, check_grads, check_residual

__all__ = [
    "select_triton",
    "select_ef_triton",
    "prune_triton",
    "prune_inplace_triton",
    "select_multi_triton",
    "select_ef_multi_triton",
    "band_multi_triton",
]

# Elements per program of the counting/compaction passes. 2048 lets one program hold a
# block in registers with 8 warps (8 elements per thread) and keeps the per-block tables
# small (25M elements -> 12k blocks, 300 KB of int64). Not tuned on a GPU yet.
BLOCK = 2048
# Histogram passes: each program loops over CHUNK elements TILE at a time and issues one
# atomic per non-empty bin at the end (2048 bins per 64K elements instead of one atomic per
# element), so the global atomics are ~1/32 of the traffic of a per-element scheme.
TILE = 2048
CHUNK = 32 * TILE
FIRST_DIGIT_BITS = 11  # DESIGN.md §4: the first 11-bit digit covers the float exponent
# Candidate path while the boundary buckets hold at most max(CAND_MIN, n / CAND_FRACTION)
# entries in all: randn data puts ~3% and ~6% of n in the buckets of ranks 5% and 25%
# (an 11-bit digit of float32 is 1/8 of an octave). Beyond that (all zeros, all equal,
# few distinct values) the fallback refines over the data: one more read per digit but
# no buffer.
CAND_MIN = 1 << 16
CAND_FRACTION = 4

# dtype -> (KIND, key bits, digit widths after the first): the widths sum to the key bits.
_KINDS = {
    torch.float32: (0, 31, (10, 10)),
    torch.float64: (1, 63, (11, 11, 11, 11, 8)),
    torch.float16: (2, 15, (4,)),
    torch.bfloat16: (3, 15, (4,)),
}
_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
# Key of +inf: a larger key is a NaN.
_INF_KEY = {
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
}
_INT64_MAX = (1 << 63) - 1
_NEVER = 1 << 62  # "no upper limit" for tie ordinals; +1 cannot overflow


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _load_v(g_base, e_base, offs, m, KIND: tl.constexpr, HAS_E: tl.constexpr):
    """``v = g`` or ``v = g + e`` rounded once to the storage dtype, as torch computes it."""
    g = tl.load(g_base + offs, mask=m, other=0.0)
    if HAS_E:
        e = tl.load(e_base + offs, mask=m, other=0.0)
        if KIND == 2:  # float16: torch adds in float32 and rounds once (to nearest even)
            v = (g.to(tl.float32) + e.to(tl.float32)).to(tl.float16)
        elif KIND == 3:
            # bfloat16: round the float32 sum to nearest even by hand. The interpreter's
            # float32 -> bfloat16 cast truncates (measured: 501 of 1000 sums differed
            # from torch), the GPU's rounds; integer rounding is the same on both.
            bits = (g.to(tl.float32) + e.to(tl.float32)).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            v = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:  # float32 / float64: one IEEE add
            v = g + e
    else:
        v = g
    return v


@triton.jit
def _key(v, KIND: tl.constexpr):
    """Sign-cleared bit pattern of ``v``: orders ``|v|`` (int32, int64 for float64)."""
    if KIND == 0:
        k = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    elif KIND == 1:
        k = v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        k = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return k


@triton.jit
def _masked_histogram(d, m, NBINS: tl.constexpr, TILE_: tl.constexpr):
    """Histogram of ``d`` over the lanes where ``m``; masked lanes go to bin 0 and are taken
    back out (``tl.histogram``'s own ``mask=`` is recent; this works on every triton 3.x)."""
    h = tl.histogram(tl.where(m, d, 0), NBINS)
    n_off = TILE_ - tl.sum(m.to(tl.int32), axis=0)
    return h - tl.where(tl.arange(0, NBINS) == 0, n_off, 0)


@triton.jit
def _hist_kernel(
    g_ptrs, e_ptrs, seg_n, chk_seg, chk_start, hist, nan_flag,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, INF_KEY: tl.constexpr,
    SHIFT: tl.constexpr, NBINS: tl.constexpr, TILE_: tl.constexpr, CHUNK_: tl.constexpr,
):
    """Phase 1: NaN flag and first-digit histogram of one chunk of one layer."""
    pid = tl.program_id(0)
    seg = tl.load(chk_seg + pid)
    start = tl.load(chk_start + pid)
    n = tl.load(seg_n + seg)
    g_base = tl.load(g_ptrs + seg).to(tl.pointer_type(DT))
    e_base = tl.load(e_ptrs + seg).to(tl.pointer_type(DT))
    end = tl.minimum(start + CHUNK_, n)
    h = tl.zeros([NBINS], dtype=tl.int32)
    nan = tl.zeros([TILE_], dtype=tl.int32)
    for off in range(start, end, TILE_):
        offs = off + tl.arange(0, TILE_)
        m = offs < end
        v = _load_v(g_base, e_base, offs, m, KIND, HAS_E)
        key = _key(v, KIND)
        # NaN <=> key above the key of inf (`v != v` misses bfloat16 NaN in the
        # interpreter, which holds bfloat16 as raw 16-bit integers).
        nan = nan | (m & (key > INF_KEY)).to(tl.int32)
        d = (key >> SHIFT).to(tl.int32)
        h += _masked_histogram(d, m, NBINS, TILE_)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist + seg.to(tl.int64) * NBINS + bins, h, mask=h != 0)
    if tl.max(nan, axis=0) > 0:
        tl.atomic_max(nan_flag + seg, 1)


@triton.jit
def _gather_kernel(
    g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, bkt_hi, bkt_lo, strict_cnt,
    cand_off, cand_fill, cand_key, cand_idx,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr,
    SHIFT: tl.constexpr, BLOCK_: tl.constexpr,
):
    """Phase 2 (candidate path): per block, count the keys whose first digit lies strictly
    between the two boundary buckets (all kept), and append the keys and layer-local indices
    of the entries *in* a boundary bucket to the layer's candidate slot (one atomic per
    block reserves the space; order inside a slot does not matter)."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(seg_n + seg)
    g_base = tl.load(g_ptrs + seg).to(tl.pointer_type(DT))
    e_base = tl.load(e_ptrs + seg).to(tl.pointer_type(DT))
    offs = start + tl.arange(0, BLOCK_)
    m = offs < n
    key = _key(_load_v(g_base, e_base, offs, m, KIND, HAS_E), KIND)
    dig = key >> SHIFT
    b_hi = tl.load(bkt_hi + seg)
    b_lo = tl.load(bkt_lo + seg)
    tl.store(strict_cnt + pid, tl.sum((m & (dig > b_lo) & (dig < b_hi)).to(tl.int32), axis=0))
    c = (m & ((dig == b_hi) | (dig == b_lo))).to(tl.int32)
    nc = tl.sum(c, axis=0)
    if nc > 0:
        base = tl.load(cand_off + seg) + tl.atomic_add(cand_fill + seg, nc)
        pos = base + (tl.cumsum(c, axis=0) - c)
        tl.store(cand_key + pos, key, mask=c != 0)
        tl.store(cand_idx + pos, offs, mask=c != 0)


@triton.jit
def _refine_kernel(
    g_ptrs, e_ptrs, seg_n, chk_seg, chk_start, cand_off, cand_key, prefix, hist,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, FROM_CAND: tl.constexpr,
    PSHIFT: tl.constexpr, DSHIFT: tl.constexpr, DMASK: tl.constexpr, NBINS: tl.constexpr,
    TILE_: tl.constexpr, CHUNK_: tl.constexpr,
):
    """Phase 2: histogram of the next digit of the keys whose higher bits equal the upper
    (row ``2*seg``) or lower (row ``2*seg+1``) boundary prefix of their layer. Keys come
    from the layer's candidate slot (``FROM_CAND``; ``seg_n`` then holds slot sizes) or are
    recomputed from the data (the fallback for huge boundary buckets)."""
    pid = tl.program_id(0)
    seg = tl.load(chk_seg + pid)
    start = tl.load(chk_start + pid)
    n = tl.load(seg_n + seg)
    g_base = tl.load(g_ptrs + seg).to(tl.pointer_type(DT))
    e_base = tl.load(e_ptrs + seg).to(tl.pointer_type(DT))
    c_base = tl.load(cand_off + seg)
    p_hi = tl.load(prefix + 2 * seg)
    p_lo = tl.load(prefix + 2 * seg + 1)
    end = tl.minimum(start + CHUNK_, n)
    h_hi = tl.zeros([NBINS], dtype=tl.int32)
    h_lo = tl.zeros([NBINS], dtype=tl.int32)
    for off in range(start, end, TILE_):
        offs = off + tl.arange(0, TILE_)
        m = offs < end
        if FROM_CAND:
            key = tl.load(cand_key + c_base + offs, mask=m, other=0)
        else:
            key = _key(_load_v(g_base, e_base, offs, m, KIND, HAS_E), KIND)
        top = key >> PSHIFT
        d = ((key >> DSHIFT) & DMASK).to(tl.int32)
        h_hi += _masked_histogram(d, m & (top == p_hi), NBINS, TILE_)
        h_lo += _masked_histogram(d, m & (top == p_lo), NBINS, TILE_)
    bins = tl.arange(0, NBINS)
    row = seg.to(tl.int64) * 2
    tl.atomic_add(hist + row * NBINS + bins, h_hi, mask=h_hi != 0)
    tl.atomic_add(hist + (row + 1) * NBINS + bins, h_lo, mask=h_lo != 0)


@triton.jit
def _count_kernel(
    g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, t_hi, t_lo, counts, num_blocks,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, BLOCK_: tl.constexpr,
):
    """Phase 3a: per block, #keys strictly inside (T_lo, T_hi), #keys == T_hi, #keys == T_lo."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(seg_n + seg)
    g_base = tl.load(g_ptrs + seg).to(tl.pointer_type(DT))
    e_base = tl.load(e_ptrs + seg).to(tl.pointer_type(DT))
    offs = start + tl.arange(0, BLOCK_)
    m = offs < n
    key = _key(_load_v(g_base, e_base, offs, m, KIND, HAS_E), KIND)
    th = tl.load(t_hi + seg)
    tlo = tl.load(t_lo + seg)
    strict = m & (key > tlo) & (key < th)
    eq_hi = m & (key == th)
    eq_lo = m & (key == tlo)
    tl.store(counts + pid, tl.sum(strict.to(tl.int32), axis=0))
    tl.store(counts + num_blocks + pid, tl.sum(eq_hi.to(tl.int32), axis=0))
    tl.store(counts + 2 * num_blocks + pid, tl.sum(eq_lo.to(tl.int32), axis=0))


@triton.jit
def _write_kernel(
    g_ptrs, e_ptrs, d_ptrs, seg_n, blk_seg, blk_start,
    t_hi, t_lo, skip_hi, end_hi, take_lo, blk_ord_hi, blk_ord_lo, blk_out,
    out_idx, out_val,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr,
    WRITE_SPARSE: tl.constexpr, WRITE_E: tl.constexpr, WRITE_DENSE: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    """Phase 3b: ordered compaction of one block with the tie rule at both thresholds."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(seg_n + seg)
    g_base = tl.load(g_ptrs + seg).to(tl.pointer_type(DT))
    e_base = tl.load(e_ptrs + seg).to(tl.pointer_type(DT))
    offs = start + tl.arange(0, BLOCK_)
    m = offs < n
    v = _load_v(g_base, e_base, offs, m, KIND, HAS_E)
    key = _key(v, KIND)
    th = tl.load(t_hi + seg)
    tlo = tl.load(t_lo + seg)
    strict = m & (key > tlo) & (key < th)
    eq_hi = m & (key == th)
    eq_lo = m & (key == tlo)
    # Ordinal of each tied entry inside its tie group = entries of the group before it in
    # index order (earlier blocks: blk_ord_*, this block: exclusive cumsum).
    eh = eq_hi.to(tl.int32)
    ord_hi = tl.load(blk_ord_hi + pid) + (tl.cumsum(eh, axis=0) - eh)
    el = eq_lo.to(tl.int32)
    ord_lo = tl.load(blk_ord_lo + pid) + (tl.cumsum(el, axis=0) - el)
    kept = (
        strict
        | (eq_hi & (ord_hi >= tl.load(skip_hi + seg)) & (ord_hi <= tl.load(end_hi + seg)))
        | (eq_lo & (ord_lo <= tl.load(take_lo + seg)))
    )
    if WRITE_SPARSE:
        k = kept.to(tl.int32)
        pos = tl.load(blk_out + pid) + (tl.cumsum(k, axis=0) - k)
        tl.store(out_idx + pos, offs, mask=kept)
        tl.store(out_val + pos, v, mask=kept)
    zero = tl.zeros_like(v)  # +0.0
    if WRITE_E:
        tl.store(e_base + offs, tl.where(kept, zero, v), mask=m)
    if WRITE_DENSE:
        d_base = tl.load(d_ptrs + seg).to(tl.pointer_type(DT))
        tl.store(d_base + offs, tl.where(kept, v, zero), mask=m)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _block_table(ns: Sequence[int], size: int) -> Tuple[List[int], List[int], List[int]]:
    """``(segment of block, start of block, first block of segment)`` for blocks of ``size``."""
    seg, start, first = [], [], []
    for s, n in enumerate(ns):
        first.append(len(seg))
        nb = -(-n // size)
        seg.extend([s] * nb)
        start.extend(range(0, nb * size, size))
    return seg, start, first


def _locate(hist: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """For each row, the digit whose bucket holds rank ``r`` (ranks count from the largest
    digit down), ``r`` minus the entries in larger buckets, and the bucket's size."""
    nb = hist.shape[-1]
    desc = hist.flip(-1).to(torch.int64)
    cum = desc.cumsum(-1)
    j = torch.searchsorted(cum, r.unsqueeze(-1), right=True).clamp_(max=nb - 1)
    size = desc.gather(-1, j)
    before = cum.gather(-1, j) - size
    return (nb - 1 - j).squeeze(-1), r - before.squeeze(-1), size.squeeze(-1)


def _seg_exclusive(c: Tensor, blk_seg: Tensor, first_blk: Tensor) -> Tensor:
    """Exclusive prefix sums of per-block counts ``c[..., B]`` restarting at each segment."""
    ex = c.cumsum(-1) - c
    base = ex.index_select(-1, first_blk.clamp(max=max(c.shape[-1] - 1, 0)))
    return ex - base.index_select(-1, blk_seg)


def band_multi_triton(
    gs: Sequence[Tensor],
    top: float,
    keep: float,
    *,
    residuals: Optional[Sequence[Tensor]] = None,
    dense: Optional[Sequence[Tensor]] = None,
    want_sparse: bool = True,
    nan_message=None,
    candidates: Optional[bool] = None,
) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """Run the phases over the layers ``gs`` (contiguous, one dtype and device).

    ``residuals`` (contiguous, like ``gs``): error feedback, ``v = g + e`` and ``e`` is
    overwritten with ``v`` minus the band. ``dense`` (contiguous, like ``gs``; may be ``gs``
    itself): receives ``v`` with everything outside the band zeroed. ``want_sparse``:
    return ``(indices int64, values, offsets int64[len(gs)+1])`` concatenated over layers.
    ``nan_message(i)``: the ``ValueError`` text when layer ``i`` holds a NaN; nothing is
    written before that check. ``candidates``: force the candidate path (True) or the
    full-data refinement (False); None picks by the boundary buckets' size (tests use it).
    """
    S = len(gs)
    dtype, device = gs[0].dtype, gs[0].device
    kind, key_bits, widths = _KINDS[dtype]
    dt = _TL_DTYPE[dtype]
    inf_key = _INF_KEY[dtype]
    key_dtype = torch.int64 if kind == 1 else torch.int32
    has_e = residuals is not None
    ns = [g.numel() for g in gs]
    counts = [band_counts(n, top, keep) for n in ns]
    out_off = [0]
    for _, kk in counts:
        out_off.append(out_off[-1] + kk)
    total = out_off[-1]
    common = dict(DT=dt, KIND=kind, HAS_E=has_e, num_warps=8)

    # One host->device transfer carries every table of the call.
    c_seg, c_start, _ = _block_table(ns, CHUNK)
    b_seg, b_start, b_first = _block_table(ns, BLOCK)
    e_list = residuals if has_e else gs
    d_list = dense if dense is not None else gs
    rows = []
    for kt, kk in counts:  # ranks of the upper and lower boundary of each layer
        rows += [kt, kt + kk - 1] if kk > 0 else [0, 0]
    parts = [
        [g.data_ptr() for g in gs], [e.data_ptr() for e in e_list],
        [d.data_ptr() for d in d_list], ns, c_seg, c_start, b_seg, b_start, b_first, rows,
        out_off, [int(kk > 0) for _, kk in counts],
    ]
    (g_ptrs, e_ptrs, d_ptrs, seg_n, chk_seg, chk_start, blk_seg, blk_start, first_blk,
     r, offsets, active) = _to_device(parts, device)
    active = active.bool()
    n_chunks, n_blocks = len(c_seg), len(b_seg)

    # Phase 1: NaN flags + first digit. Nothing is written to user memory before the check.
    shift = key_bits - FIRST_DIGIT_BITS
    nb1 = 1 << FIRST_DIGIT_BITS
    hist = torch.zeros((S, nb1), dtype=torch.int32, device=device)
    nan_flag = torch.zeros(S, dtype=torch.int64, device=device)
    if n_chunks:
        _hist_kernel[(n_chunks,)](
            g_ptrs, e_ptrs, seg_n, chk_seg, chk_start, hist, nan_flag,
            INF_KEY=inf_key, SHIFT=shift, NBINS=nb1, TILE_=TILE, CHUNK_=CHUNK, **common,
        )
    digit, r, size = _locate(hist.repeat_interleave(2, dim=0), r)
    b_hi, b_lo = digit[0::2], digit[1::2]
    # Candidates of a layer: both boundary buckets (once when they coincide).
    cand_cnt = torch.where(active, size[0::2] + torch.where(b_lo != b_hi, size[1::2], 0), 0)
    flags = torch.cat([nan_flag, cand_cnt]).tolist()  # the one device->host sync
    for i, f in enumerate(flags[:S]):
        if f:
            raise ValueError(nan_message(i))
    cand_ns = flags[S:]
    if candidates is None:
        candidates = sum(cand_ns) <= max(CAND_MIN, sum(ns) // CAND_FRACTION)

    if want_sparse:
        out_idx = torch.empty(total, dtype=torch.int64, device=device)
        out_val = torch.empty(total, dtype=dtype, device=device)
    else:
        out_idx = torch.empty(1, dtype=torch.int64, device=device)
        out_val = torch.empty(1, dtype=dtype, device=device)
    if n_blocks == 0 or (total == 0 and not has_e and dense is None):
        return (out_idx, out_val, offsets) if want_sparse else None

    # Phase 2: exact boundary keys, one digit at a time (rows 2s: upper, 2s+1: lower),
    # over the candidate slots or, when the boundary buckets are huge, over the data.
    refine_src = dict(seg_n=seg_n, chk_seg=chk_seg, chk_start=chk_start)
    cand_off = offsets  # unused unless candidates
    cand_key = cand_idx = strict_cnt = None
    n_refine = n_chunks
    if candidates:
        cc_seg, cc_start, _ = _block_table(cand_ns, CHUNK)
        slot = [0]
        for c in cand_ns:
            slot.append(slot[-1] + c)
        cand_seg_n, cc_seg_t, cc_start_t, cand_off = _to_device(
            [cand_ns, cc_seg, cc_start, slot], device)
        n_cand = slot[-1]
        cand_key = torch.empty(max(n_cand, 1), dtype=key_dtype, device=device)
        cand_idx = torch.empty(max(n_cand, 1), dtype=torch.int64, device=device)
        strict_cnt = torch.empty(n_blocks, dtype=torch.int32, device=device)
        fill = torch.zeros(S, dtype=torch.int32, device=device)
        never = torch.full_like(b_hi, -1)
        _gather_kernel[(n_blocks,)](
            g_ptrs, e_ptrs, seg_n, blk_seg, blk_start,
            torch.where(active, b_hi, never), torch.where(active, b_lo, never), strict_cnt,
            cand_off, fill, cand_key, cand_idx, SHIFT=shift, BLOCK_=BLOCK, **common,
        )
        refine_src = dict(seg_n=cand_seg_n, chk_seg=cc_seg_t, chk_start=cc_start_t)
        n_refine = len(cc_seg)
    prefix = digit
    pshift = shift
    for w in widths:
        dshift = pshift - w
        # >= 32 bins: older triton lowers tl.histogram with a warp-ballot scheme that
        # asserts num_bins % 32 == 0 (the 4-bit digit of 16-bit floats uses 16 of 32).
        nbins = max(1 << w, 32)
        h = torch.zeros((2 * S, nbins), dtype=torch.int32, device=device)
        if n_refine:
            pre = torch.where(active.repeat_interleave(2), prefix, -1)
            _refine_kernel[(n_refine,)](
                g_ptrs, e_ptrs, refine_src["seg_n"], refine_src["chk_seg"],
                refine_src["chk_start"], cand_off, cand_key if candidates else hist, pre, h,
                FROM_CAND=candidates, PSHIFT=pshift, DSHIFT=dshift, DMASK=(1 << w) - 1,
                NBINS=nbins,
                TILE_=TILE, CHUNK_=CHUNK, **common,
            )
        digit, r, _ = _locate(h[:, : 1 << w], r)
        prefix = (prefix << w) | digit
        pshift = dshift
    t_hi, t_lo = prefix[0::2], prefix[1::2]
    skip_hi, take_lo = r[0::2], r[1::2]
    same = t_hi == t_lo  # both boundaries inside one tie group: ordinals in [skip, take]
    end_hi = torch.where(same, take_lo, _NEVER)
    t_lo = torch.where(same | ~active, _INT64_MAX, t_lo)  # never equal, nothing above it
    t_hi = torch.where(active, t_hi, -1)  # keys are >= 0: nothing kept in empty bands
    t_hi, t_lo, skip_hi, end_hi, take_lo = (
        x.contiguous() for x in (t_hi, t_lo, skip_hi, end_hi, take_lo)
    )

    # Phase 3a: per block #strictly inside, #== T_hi, #== T_lo.
    if candidates:
        # Everything outside the boundary buckets was counted by the gather pass; the
        # candidates (every tie of T_hi and T_lo among them) add theirs per block.
        n_cand = slot[-1]
        cnt = torch.zeros((3, n_blocks), dtype=torch.int64, device=device)
        cnt[0] = strict_cnt
        if n_cand:
            cseg = torch.repeat_interleave(
                torch.arange(S, device=device), cand_seg_n, output_size=n_cand)
            k = cand_key[:n_cand]
            th, tlo = t_hi[cseg], t_lo[cseg]
            blk = first_blk[cseg] + cand_idx[:n_cand] // BLOCK
            cnt[0].index_add_(0, blk, ((k > tlo) & (k < th)).long())
            cnt[1].index_add_(0, blk, (k == th).long())
            cnt[2].index_add_(0, blk, (k == tlo).long())
    else:
        cnt = torch.empty((3, n_blocks), dtype=torch.int32, device=device)
        _count_kernel[(n_blocks,)](
            g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, t_hi, t_lo, cnt, n_blocks,
            BLOCK_=BLOCK, **common,
        )
        cnt = cnt.to(torch.int64)
    # Tie ordinals and output offsets of each block (segmented prefix sums).
    ex = _seg_exclusive(cnt, blk_seg, first_blk)
    ord_hi, ord_lo = ex[1], ex[2]
    s_skip, s_end, s_take = skip_hi[blk_seg], end_hi[blk_seg], take_lo[blk_seg]
    kept_hi = (torch.minimum(ord_hi + cnt[1], s_end + 1) - torch.maximum(ord_hi, s_skip)).clamp_(min=0)
    kept_lo = (torch.minimum(ord_lo + cnt[2], s_take + 1) - ord_lo).clamp_(min=0)
    kept = cnt[0] + kept_hi + kept_lo
    blk_out = offsets[blk_seg] + _seg_exclusive(kept, blk_seg, first_blk)

    # Phase 3b: ordered compaction + residual / dense writes.
    _write_kernel[(n_blocks,)](
        g_ptrs, e_ptrs, d_ptrs, seg_n, blk_seg, blk_start,
        t_hi, t_lo, skip_hi, end_hi, take_lo, ord_hi.contiguous(), ord_lo.contiguous(),
        blk_out, out_idx, out_val,
        WRITE_SPARSE=want_sparse and total > 0, WRITE_E=has_e, WRITE_DENSE=dense is not None,
        BLOCK_=BLOCK, **common,
    )
    return (out_idx, out_val, offsets) if want_sparse else None


def _to_device(parts: Sequence[Sequence[int]], device: torch.device) -> List[Tensor]:
    """Int64 tensors of ``parts`` on ``device`` in one (pinned, asynchronous) transfer."""
    host = torch.tensor([x for p in parts for x in p], dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, [len(p) for p in parts]))


# --------------------------------------------------------------------------------------
# Wrappers: one per dgp:: op (same arguments and results as the reference).
# --------------------------------------------------------------------------------------
_NAN = "{} contains NaN; DGP cannot rank NaN gradients"
_NAN_EF = (
    "{} contains NaN (a NaN gradient or residual, or inf - inf); DGP cannot rank NaN gradients"
)


def _flat(t: Tensor) -> Tensor:
    """Contiguous flat view (a copy only for non-contiguous inputs)."""
    return t.contiguous().view(-1)


def select_triton(g: Tensor, top: float = 0.05, keep: float = 0.20) -> Tuple[Tensor, Tensor]:
    """Triton ``dgp::select``: ``(indices int64[k_keep] ascending, values g.dtype[k_keep])``."""
    check_fractions(top, keep)
    check_grad(g, "g")
    idx, val, _ = band_multi_triton([_flat(g)], top, keep, nan_message=lambda i: _NAN.format("g"))
    return idx, val


def select_ef_triton(
    g: Tensor, residual: Tensor, top: float = 0.05, keep: float = 0.20
) -> Tuple[Tensor, Tensor]:
    """Triton ``dgp::select_ef``: band of ``v = g + residual``; ``residual <- v`` minus the band
    (kept positions ``+0.0``). ``residual`` is untouched when ``v`` holds a NaN."""
    check_fractions(top, keep)
    check_grad(g, "g")
    check_residual(g, residual, "residual")
    e = _flat(residual)  # a view when contiguous: written in place
    idx, val, _ = band_multi_triton(
        [_flat(g)], top, keep, residuals=[e],
        nan_message=lambda i: _NAN_EF.format("g + residual"),
    )
    if e.data_ptr() != residual.data_ptr() or not residual.is_contiguous():
        residual.copy_(e.view(residual.shape))
    return idx, val


def prune_triton(g: Tensor, top: float = 0.05, keep: float = 0.20) -> Tensor:
    """Triton ``dgp::prune``: new contiguous tensor like ``g`` holding only the band."""
    check_fractions(top, keep)
    check_grad(g, "g")
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    band_multi_triton(
        [_flat(g)], top, keep, dense=[out.view(-1)], want_sparse=False,
        nan_message=lambda i: _NAN.format("g"),
    )
    return out


def prune_inplace_triton(g: Tensor, top: float = 0.05, keep: float = 0.20) -> None:
    """Triton ``dgp::prune_``: zero every entry of ``g`` outside the band, in place."""
    check_fractions(top, keep)
    check_grad(g, "g")
    work = _flat(g)
    band_multi_triton(
        [work], top, keep, dense=[work], want_sparse=False,
        nan_message=lambda i: _NAN.format("g"),
    )
    if not g.is_contiguous():
        g.copy_(work.view(g.shape))


def select_multi_triton(
    gs: Sequence[Tensor], top: float = 0.05, keep: float = 0.20
) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton ``dgp::select_multi``: every layer in one launch per phase; returns
    ``(indices, values, offsets)`` as the reference (layer-local indices)."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    if not gs:
        return reference.select_multi(gs, top, keep)
    return band_multi_triton(
        [_flat(g) for g in gs], top, keep, nan_message=lambda i: _NAN.format(f"gs[{i}]")
    )


def select_ef_multi_triton(
    gs: Sequence[Tensor], residuals: Sequence[Tensor], top: float = 0.05, keep: float = 0.20
) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton ``dgp::select_ef_multi``: fused error feedback for every layer; all residuals
    are untouched when any layer's ``g + residual`` holds a NaN."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    if len(residuals) != len(gs):
        raise ValueError(
            f"residuals has {len(residuals)} tensors but gs has {len(gs)}; "
            "they must pair up one residual per gradient"
        )
    for i, (g, e) in enumerate(zip(gs, residuals)):
        check_residual(g, e, f"residuals[{i}]")
    if not gs:
        return reference.select_ef_multi(gs, residuals, top, keep)
    es = [_flat(e) for e in residuals]
    out = band_multi_triton(
        [_flat(g) for g in gs], top, keep, residuals=es,
        nan_message=lambda i: _NAN_EF.format(f"gs[{i}] + residuals[{i}]"),
    )
    for e, res in zip(es, residuals):
        if not res.is_contiguous():
            res.copy_(e.view(res.shape))
    return out


IMPLS = {
    "select": select_triton,
    "select_ef": select_ef_triton,
    "prune": prune_triton,
    "prune_": prune_inplace_triton,
    "select_multi": select_multi_triton,
    "select_ef_multi": select_ef_multi_triton,
}
