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

from collections import OrderedDict
from dataclasses import dataclass
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
# Blocks per step of the per-layer scan over block counts (one program per layer).
SCAN_TILE = 1024
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
    g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, prefix, cnt, blk_cstart, blk_ccount,
    cand_off, cand_fill, cand_key,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr,
    SHIFT: tl.constexpr, BLOCK_: tl.constexpr,
):
    """Phase 2 (candidate path): per block, count the keys whose first digit lies strictly
    between the two boundary buckets (all kept) into ``cnt[0]``, and append the keys *in* a
    boundary bucket to the layer's candidate slot. One atomic per block reserves a
    contiguous range, recorded in ``blk_cstart``/``blk_ccount`` so that the block's
    candidates can be counted again without atomics once the thresholds are exact."""
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
    b_hi = tl.load(prefix + 2 * seg)  # -1 for layers with an empty band: matches nothing
    b_lo = tl.load(prefix + 2 * seg + 1)
    tl.store(cnt + pid, tl.sum((m & (dig > b_lo) & (dig < b_hi)).to(tl.int32), axis=0))
    c = (m & ((dig == b_hi) | (dig == b_lo))).to(tl.int32)
    nc = tl.sum(c, axis=0)
    tl.store(blk_ccount + pid, nc)
    if nc > 0:
        base = tl.load(cand_off + seg) + tl.atomic_add(cand_fill + seg, nc)
        tl.store(blk_cstart + pid, base)
        tl.store(cand_key + base + (tl.cumsum(c, axis=0) - c), key, mask=c != 0)


@triton.jit
def _cand_count_kernel(
    blk_seg, blk_cstart, blk_ccount, cand_key, t_hi, t_lo, cnt, num_blocks,
    BLOCK_: tl.constexpr,
):
    """Phase 3a (candidate path): add each block's candidates strictly inside
    (T_lo, T_hi) to ``cnt[0]`` and count its ties of T_hi and T_lo (``cnt[1]``, ``cnt[2]``)."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    nc = tl.load(blk_ccount + pid)
    start = tl.load(blk_cstart + pid, mask=nc > 0, other=0)
    offs = tl.arange(0, BLOCK_)
    m = offs < nc
    key = tl.load(cand_key + start + offs, mask=m, other=0)
    th = tl.load(t_hi + seg)
    tlo = tl.load(t_lo + seg)
    strict = tl.sum((m & (key > tlo) & (key < th)).to(tl.int32), axis=0)
    tl.store(cnt + pid, tl.load(cnt + pid) + strict)
    tl.store(cnt + num_blocks + pid, tl.sum((m & (key == th)).to(tl.int32), axis=0))
    tl.store(cnt + 2 * num_blocks + pid, tl.sum((m & (key == tlo)).to(tl.int32), axis=0))


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
def _locate_row(hrow, r, NBINS: tl.constexpr, NB: tl.constexpr):
    """Digit whose bucket holds rank ``r`` counting from the largest digit down, ``r``
    minus the entries of larger digits, and the bucket's size (``NB`` used bins)."""
    j = tl.arange(0, NBINS)
    h = tl.load(hrow + (NB - 1 - j), mask=j < NB, other=0).to(tl.int64)  # largest first
    cum = tl.cumsum(h, axis=0)
    pos = tl.minimum(tl.sum((cum <= r).to(tl.int32), axis=0), NB - 1)
    size = tl.sum(tl.where(j == pos, h, 0), axis=0)
    before = tl.sum(tl.where(j == pos, cum, 0), axis=0) - size
    return NB - 1 - pos, r - before, size


@triton.jit
def _locate_kernel(
    hist, prefix, rank, active, flags, t_hi, t_lo, skip_hi, end_hi, take_lo, S,
    NBINS: tl.constexpr, WIDTH: tl.constexpr, FIRST: tl.constexpr, FINAL: tl.constexpr,
):
    """Scan of one digit level for one layer (both boundaries), on the device: append the
    boundary digits to ``prefix`` and reduce ``rank``. ``FIRST``: one shared histogram row
    per layer, and ``flags[S + seg]`` gets the layer's candidate count (both boundary
    buckets, once if they coincide). ``FINAL``: the prefixes are now the exact boundary
    keys; write the thresholds and tie limits the compaction applies."""
    seg = tl.program_id(0)
    act = tl.load(active + seg) != 0
    if FIRST:
        row_hi = hist + seg.to(tl.int64) * NBINS
        row_lo = row_hi
    else:
        row_hi = hist + (2 * seg).to(tl.int64) * NBINS
        row_lo = row_hi + NBINS
    d_hi, r_hi, s_hi = _locate_row(row_hi, tl.load(rank + 2 * seg), NBINS, 1 << WIDTH)
    d_lo, r_lo, s_lo = _locate_row(row_lo, tl.load(rank + 2 * seg + 1), NBINS, 1 << WIDTH)
    if FIRST:
        p_hi = d_hi.to(tl.int64)
        p_lo = d_lo.to(tl.int64)
        n_cand = s_hi + tl.where(d_lo != d_hi, s_lo, 0)
        tl.store(flags + S + seg, tl.where(act, n_cand, 0))
    else:
        p_hi = (tl.load(prefix + 2 * seg) << WIDTH) | d_hi
        p_lo = (tl.load(prefix + 2 * seg + 1) << WIDTH) | d_lo
    p_hi = tl.where(act, p_hi, -1)  # a layer with an empty band matches no key
    p_lo = tl.where(act, p_lo, -1)
    tl.store(prefix + 2 * seg, p_hi)
    tl.store(prefix + 2 * seg + 1, p_lo)
    tl.store(rank + 2 * seg, r_hi)
    tl.store(rank + 2 * seg + 1, r_lo)
    if FINAL:
        same = p_hi == p_lo  # both boundaries in one tie group: ordinals in [skip, take]
        tl.store(t_hi + seg, p_hi)  # -1 when inactive: keys are >= 0, nothing kept
        tl.store(t_lo + seg, tl.where(same | (~act), 0x7FFFFFFFFFFFFFFF, p_lo))
        tl.store(skip_hi + seg, r_hi)
        tl.store(end_hi + seg, tl.where(same, r_lo, 1 << 62))
        tl.store(take_lo + seg, r_lo)


@triton.jit
def _scan_kernel(
    cnt, num_blocks, seg_first, seg_nblk, offsets, skip_hi, end_hi, take_lo,
    blk_ord_hi, blk_ord_lo, blk_out, SCAN: tl.constexpr,
):
    """Per layer, exclusive prefix sums over its blocks: the ordinal of each block's first
    T_hi / T_lo tie, and each block's first output slot (kept = strictly inside, plus the
    ties whose ordinals fall in the kept range)."""
    seg = tl.program_id(0)
    b0 = tl.load(seg_first + seg)
    nb = tl.load(seg_nblk + seg)
    skip = tl.load(skip_hi + seg)
    endh = tl.load(end_hi + seg)
    take = tl.load(take_lo + seg)
    carry_h = b0 * 0
    carry_l = b0 * 0
    carry_k = tl.load(offsets + seg)
    for t in range(0, nb, SCAN):
        i = t + tl.arange(0, SCAN)
        m = i < nb
        b = b0 + i
        c0 = tl.load(cnt + b, mask=m, other=0).to(tl.int64)
        ch = tl.load(cnt + num_blocks + b, mask=m, other=0).to(tl.int64)
        cl = tl.load(cnt + 2 * num_blocks + b, mask=m, other=0).to(tl.int64)
        oh = carry_h + tl.cumsum(ch, axis=0) - ch
        ol = carry_l + tl.cumsum(cl, axis=0) - cl
        kh = tl.maximum(tl.minimum(oh + ch, endh + 1) - tl.maximum(oh, skip), 0)
        kl = tl.maximum(tl.minimum(ol + cl, take + 1) - ol, 0)
        k = c0 + kh + kl
        ok = carry_k + tl.cumsum(k, axis=0) - k
        tl.store(blk_ord_hi + b, oh, mask=m)
        tl.store(blk_ord_lo + b, ol, mask=m)
        tl.store(blk_out + b, ok, mask=m)
        carry_h += tl.sum(ch, axis=0)
        carry_l += tl.sum(cl, axis=0)
        carry_k += tl.sum(k, axis=0)


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
def _block_table(ns: Sequence[int], size: int) -> Tuple[List[int], List[int], List[int], List[int]]:
    """``(segment of block, start of block, first block of segment, blocks of segment)``."""
    seg, start, first, count = [], [], [], []
    for s, n in enumerate(ns):
        nb = -(-n // size)
        first.append(len(seg))
        count.append(nb)
        seg.extend([s] * nb)
        start.extend(range(0, nb * size, size))
    return seg, start, first, count


def _to_device(parts: Sequence[Sequence[int]], device: torch.device) -> List[Tensor]:
    """Int64 tensors of ``parts`` on ``device`` in one (pinned, asynchronous) transfer."""
    host = torch.tensor([x for p in parts for x in p], dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, [len(p) for p in parts]))


@dataclass
class _Plan:
    """Everything about a call that depends only on the layer sizes, ``top`` and ``keep``
    (cached: a training loop calls with the same shapes every step, and building the block
    tables in Python costs ~1 ms for 25M elements)."""

    counts: List[Tuple[int, int]]
    total: int
    n_chunks: int
    n_blocks: int
    seg_n: Tensor
    chk_seg: Tensor
    chk_start: Tensor
    blk_seg: Tensor
    blk_start: Tensor
    seg_first: Tensor
    seg_nblk: Tensor
    rank0: Tensor  # [2S] ranks of the upper and lower boundary of each layer
    offsets: Tensor  # [S+1] first output slot of each layer
    active: Tensor  # [S] 1 when the layer's band is non-empty


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _plan(ns: Tuple[int, ...], top: float, keep: float, device: torch.device) -> _Plan:
    key = (ns, float(top), float(keep), str(device))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    counts = [band_counts(n, top, keep) for n in ns]
    out_off = [0]
    for _, kk in counts:
        out_off.append(out_off[-1] + kk)
    c_seg, c_start, _, _ = _block_table(ns, CHUNK)
    b_seg, b_start, b_first, b_count = _block_table(ns, BLOCK)
    rows = []
    for kt, kk in counts:
        rows += [kt, kt + kk - 1] if kk > 0 else [0, 0]
    tensors = _to_device(
        [ns, c_seg, c_start, b_seg, b_start, b_first, b_count, rows, out_off,
         [int(kk > 0) for _, kk in counts]], device)
    plan = _Plan(counts, out_off[-1], len(c_seg), len(b_seg), *tensors)
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


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
    full-data refinement (False); None picks by the boundary buckets' size.
    """
    S = len(gs)
    dtype, device = gs[0].dtype, gs[0].device
    kind, key_bits, widths = _KINDS[dtype]
    key_dtype = torch.int64 if kind == 1 else torch.int32
    has_e = residuals is not None
    ns = tuple(g.numel() for g in gs)
    plan = _plan(ns, top, keep, device)
    total, n_chunks, n_blocks = plan.total, plan.n_chunks, plan.n_blocks
    e_list = residuals if has_e else gs
    d_list = dense if dense is not None else gs
    g_ptrs, e_ptrs, d_ptrs = _to_device(
        [[t.data_ptr() for t in x] for x in (gs, e_list, d_list)], device)
    common = dict(DT=_TL_DTYPE[dtype], KIND=kind, HAS_E=has_e, num_warps=8)
    offsets = plan.offsets.clone()  # returned to the caller: not the cached tensor

    # Phase 1: NaN flags + first digit. Nothing is written to user memory before the check.
    shift = key_bits - FIRST_DIGIT_BITS
    nb1 = 1 << FIRST_DIGIT_BITS
    i64 = dict(dtype=torch.int64, device=device)
    # One zeroed int32 workspace for every histogram and the candidate fill counters.
    nbins = [max(1 << w, 32) for w in widths]  # see _refine_kernel's launch below
    ws = torch.zeros(S * nb1 + sum(2 * S * b for b in nbins) + S, dtype=torch.int32,
                     device=device)
    sizes = [S * nb1] + [2 * S * b for b in nbins] + [S]
    hist, *level_hists, fill = torch.split(ws, sizes)
    hist = hist.view(S, nb1)
    flags = torch.zeros(2 * S, **i64)  # [NaN flag per layer, candidate count per layer]
    prefix = torch.empty(2 * S, **i64)  # rows 2s: upper boundary, 2s+1: lower boundary
    rank = plan.rank0.clone()
    t_hi, t_lo, skip_hi, end_hi, take_lo = torch.empty((5, S), **i64)
    thresholds = (t_hi, t_lo, skip_hi, end_hi, take_lo)
    if n_chunks:
        _hist_kernel[(n_chunks,)](
            g_ptrs, e_ptrs, plan.seg_n, plan.chk_seg, plan.chk_start, hist, flags,
            INF_KEY=_INF_KEY[dtype], SHIFT=shift, NBINS=nb1, TILE_=TILE, CHUNK_=CHUNK, **common,
        )
    _locate_kernel[(S,)](
        hist, prefix, rank, plan.active, flags, *thresholds, S,
        NBINS=nb1, WIDTH=FIRST_DIGIT_BITS, FIRST=True, FINAL=False,
    )
    host_flags = flags.tolist()  # the one device->host sync of a call
    for i, f in enumerate(host_flags[:S]):
        if f:
            raise ValueError(nan_message(i))

    if want_sparse:
        out_idx = torch.empty(total, **i64)
        out_val = torch.empty(total, dtype=dtype, device=device)
    else:
        out_idx = torch.empty(1, **i64)
        out_val = torch.empty(1, dtype=dtype, device=device)
    if n_blocks == 0 or (total == 0 and not has_e and dense is None):
        return (out_idx, out_val, offsets) if want_sparse else None

    cand_ns = host_flags[S:]
    n_cand = sum(cand_ns)
    if candidates is None:
        candidates = n_cand <= max(CAND_MIN, sum(ns) // CAND_FRACTION)
    cnt = torch.empty((3, n_blocks), dtype=torch.int32, device=device)

    # Phase 2: exact boundary keys, one digit at a time, over the candidate slots or, when
    # the boundary buckets are huge, over the data.
    if candidates:
        cc_seg, cc_start, _, _ = _block_table(cand_ns, CHUNK)
        n_refine = len(cc_seg)
        slot = [0]
        for c in cand_ns:
            slot.append(slot[-1] + c)
        cand_n, cc_seg, cc_start, cand_off = _to_device([cand_ns, cc_seg, cc_start, slot], device)
        cand_key = torch.empty(max(n_cand, 1), dtype=key_dtype, device=device)
        blk_cand = torch.empty((2, n_blocks), **i64)  # first candidate, candidate count
        _gather_kernel[(n_blocks,)](
            g_ptrs, e_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start, prefix, cnt,
            blk_cand[0], blk_cand[1], cand_off, fill, cand_key, SHIFT=shift, BLOCK_=BLOCK,
            **common,
        )
        src = (cand_n, cc_seg, cc_start)
    else:
        cand_off, cand_key = plan.offsets, hist  # unused placeholders
        src = (plan.seg_n, plan.chk_seg, plan.chk_start)
        n_refine = n_chunks
    pshift = shift
    for level, w in enumerate(widths):
        # nbins[level] >= 32: older triton lowers tl.histogram with a warp-ballot scheme
        # that asserts num_bins % 32 == 0 (the 4-bit digit of 16-bit floats uses 16 of 32).
        h = level_hists[level]
        if n_refine:
            _refine_kernel[(n_refine,)](
                g_ptrs, e_ptrs, *src, cand_off, cand_key, prefix, h,
                FROM_CAND=candidates, PSHIFT=pshift, DSHIFT=pshift - w, DMASK=(1 << w) - 1,
                NBINS=nbins[level], TILE_=TILE, CHUNK_=CHUNK, **common,
            )
        _locate_kernel[(S,)](
            h, prefix, rank, plan.active, flags, *thresholds, S,
            NBINS=nbins[level], WIDTH=w, FIRST=False, FINAL=level == len(widths) - 1,
        )
        pshift -= w

    # Phase 3a: per block #strictly inside (T_lo, T_hi), #== T_hi, #== T_lo; then per layer
    # the tie ordinal and output slot of each block (prefix sums, no per-element atomics).
    if candidates:
        _cand_count_kernel[(n_blocks,)](
            plan.blk_seg, blk_cand[0], blk_cand[1], cand_key, t_hi, t_lo, cnt, n_blocks,
            BLOCK_=BLOCK, num_warps=8,
        )
    else:
        _count_kernel[(n_blocks,)](
            g_ptrs, e_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start, t_hi, t_lo, cnt,
            n_blocks, BLOCK_=BLOCK, **common,
        )
    blk_ord = torch.empty((3, n_blocks), **i64)
    _scan_kernel[(S,)](
        cnt, n_blocks, plan.seg_first, plan.seg_nblk, plan.offsets, skip_hi, end_hi, take_lo,
        blk_ord[0], blk_ord[1], blk_ord[2], SCAN=SCAN_TILE,
    )

    # Phase 3b: ordered compaction + residual / dense writes.
    _write_kernel[(n_blocks,)](
        g_ptrs, e_ptrs, d_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start,
        *thresholds, blk_ord[0], blk_ord[1], blk_ord[2], out_idx, out_val,
        WRITE_SPARSE=want_sparse and total > 0, WRITE_E=has_e, WRITE_DENSE=dense is not None,
        BLOCK_=BLOCK, **common,
    )
    return (out_idx, out_val, offsets) if want_sparse else None


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
