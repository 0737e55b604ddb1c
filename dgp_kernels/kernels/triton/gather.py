"""The first full read: exact first-digit histogram, or the gather of boundary candidates.

* ``hist_kernel`` (exact path): NaN flags and the histogram of every key's first digit;
  the last program of each layer locates the digit of both boundaries
  (:func:`locate_first_digit`) and the candidate count (read back by the launcher: the
  exact path's one mid-call host synchronisation).
* ``gather_kernel`` (both paths): per block, keys inside a boundary window are appended to
  the layer's candidate slot (one relaxed atomic per block reserves a contiguous range).
  On the sampled path this is the call's first full read, so it also flags NaN and adds
  its counts into the layer's totals, and the last program of each layer validates the
  sample's ranges (:func:`.sample.validate_layer`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    VEC, base, excl_cumsum, key_of, last_program, load_block, load_v, locate_row,
    masked_histogram, rows,
)
from .sample import validate_layer


@triton.jit
def hist_kernel(
    g_ptrs, e_ptrs, seg_n, chk_seg, chk_start, chk_nchk, hist, flags, tick, rank0, active,
    bnd, S,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    INF_KEY: tl.constexpr, SHIFT: tl.constexpr, NBINS: tl.constexpr, TILE_: tl.constexpr,
    CHUNK_: tl.constexpr,
):
    """NaN flag (``flags[seg]``) and first-digit histogram of one chunk of one layer; the
    layer's last program runs :func:`locate_first_digit`."""
    pid = tl.program_id(0)
    seg = tl.load(chk_seg + pid)
    start = tl.load(chk_start + pid).to(tl.int32)
    n = tl.load(seg_n + seg).to(tl.int32)
    g_base = base(g_ptrs, seg, DT, ALIGNED)
    e_base = base(e_ptrs, seg, DT, ALIGNED)
    end = tl.minimum(start + CHUNK_, n)
    h = tl.zeros([NBINS], dtype=tl.int32)
    nan = tl.zeros([TILE_], dtype=tl.int32)
    for off in range(start, end, TILE_):
        offs = off + tl.arange(0, TILE_)
        m = offs < end
        key = key_of(load_v(g_base, e_base, offs, m, KIND, HAS_E, True), KIND)
        # NaN <=> key above the key of inf (`v != v` misses bfloat16 NaN in the
        # interpreter, which holds bfloat16 as raw 16-bit integers)
        nan = nan | (m & (key > INF_KEY)).to(tl.int32)
        h += masked_histogram((key >> SHIFT).to(tl.int32), m, NBINS, TILE_)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist + seg.to(tl.int64) * NBINS + bins, h, mask=h != 0, sem="relaxed")
    if tl.max(nan, axis=0) > 0:
        tl.atomic_max(flags + seg, 1, sem="relaxed")
    if last_program(tick, seg, tl.load(chk_nchk + seg) - 1):
        locate_first_digit(seg, hist + seg.to(tl.int64) * NBINS, rank0, active, bnd, flags,
                           S, NBINS, SHIFT)


@triton.jit
def locate_first_digit(seg, row, rank0, active, bnd, flags, S, NBINS: tl.constexpr,
                       SHIFT: tl.constexpr):
    """Exact path: the first digit of both boundaries of layer ``seg`` from its histogram
    row: windows ``[d << SHIFT, (d + 1) << SHIFT)`` with the ranks inside them (``bnd``),
    and the candidate count (both buckets, once if they coincide; 0 for an empty band) in
    ``flags[S + seg]``. A layer with an empty band gets windows that match no key."""
    NB2 = 2 * S
    act = tl.load(active + seg) != 0
    d_hi, r_hi, s_hi = locate_row(row, tl.load(rank0 + 2 * seg), NBINS, NBINS)
    d_lo, r_lo, s_lo = locate_row(row, tl.load(rank0 + 2 * seg + 1), NBINS, NBINS)
    tl.store(flags + S + seg, tl.where(act, s_hi + tl.where(d_lo != d_hi, s_lo, 0), 0))
    lo_hi = tl.where(act, d_hi.to(tl.int64) << SHIFT, -1)
    lo_lo = tl.where(act, d_lo.to(tl.int64) << SHIFT, -1)
    width = (tl.full([], 1, tl.int64) << SHIFT) - 1
    tl.store(bnd + 2 * seg, lo_hi)
    tl.store(bnd + 2 * seg + 1, lo_lo)
    tl.store(bnd + NB2 + 2 * seg, tl.where(act, lo_hi + width, -1))
    tl.store(bnd + NB2 + 2 * seg + 1, tl.where(act, lo_lo + width, -1))
    tl.store(bnd + 2 * NB2 + 2 * seg, tl.full([], SHIFT, tl.int64))
    tl.store(bnd + 2 * NB2 + 2 * seg + 1, tl.full([], SHIFT, tl.int64))
    tl.store(bnd + 3 * NB2 + 2 * seg, r_hi)
    tl.store(bnd + 3 * NB2 + 2 * seg + 1, r_lo)


@triton.jit
def gather_kernel(
    g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, bnd, cand_off, cand_cap, cand_fill, cand_key,
    totals, flags, tick, seg_nblk, active, tail_n, S,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    SAMPLED: tl.constexpr, INF_KEY: tl.constexpr, BLOCK_: tl.constexpr, LANES: tl.constexpr,
):
    """One program per block of ``BLOCK_`` entries: a block entirely inside its layer runs
    the unmasked body (vectorised loads, the mask a constant the compiler folds away), the
    layer's last block the masked one."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    start = tl.load(blk_start + pid).to(tl.int32)
    n = tl.load(seg_n + seg).to(tl.int32)
    a = (g_ptrs, e_ptrs, bnd, cand_off, cand_cap, cand_fill, cand_key, totals, flags, tick,
         seg_nblk, active, tail_n, seg_n, S)
    if start <= n - BLOCK_:
        _gather_block(pid, seg, start, n, True, a, DT, KIND, HAS_E, ALIGNED, SAMPLED,
                      INF_KEY, BLOCK_, LANES)
    else:
        _gather_block(pid, seg, start, n, False, a, DT, KIND, HAS_E, ALIGNED, SAMPLED,
                      INF_KEY, BLOCK_, LANES)


@triton.jit
def _gather_block(
    pid, seg, start, n, FULL: tl.constexpr, a,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    SAMPLED: tl.constexpr, INF_KEY: tl.constexpr, BLOCK_: tl.constexpr, LANES: tl.constexpr,
):
    """Block ``pid`` of layer ``seg``: append the keys inside the upper window (``bnd`` row
    ``2*seg``) or the lower one (row ``2*seg+1``) to the layer's candidate slot. ``SAMPLED``:
    also the NaN flags (``flags[seg]`` and the call's ``flags[3S]``) and the layer's totals
    (above the upper window, in it, in the lower window only, strictly between; ``LANES``
    copies by block, against contention: two relaxed int64 atomics of two 32-bit fields);
    candidates beyond the slot's capacity are dropped (the validation then marks the layer
    missed), and the layer's last program validates it."""
    (g_ptrs, e_ptrs, bnd, cand_off, cand_cap, cand_fill, cand_key, totals, flags, tick,
     seg_nblk, active, tail_n, seg_n, S) = a
    NB2 = 2 * S
    _offs, m, _v, key = load_block(g_ptrs, e_ptrs, seg, start, n, FULL, DT, KIND, HAS_E,
                                   ALIGNED, BLOCK_)
    ha = tl.load(bnd + 2 * seg)  # -1 for an empty band: matches nothing
    la = tl.load(bnd + 2 * seg + 1)
    hb = tl.load(bnd + NB2 + 2 * seg)
    lb = tl.load(bnd + NB2 + 2 * seg + 1)
    if KIND != 1:  # 32-bit compares (the windows of 15/31-bit keys fit)
        ha, hb, la, lb = ha.to(tl.int32), hb.to(tl.int32), la.to(tl.int32), lb.to(tl.int32)
    in_h = m & (key >= ha) & (key <= hb)
    in_l = m & (key >= la) & (key <= lb) & (~in_h)
    c = (in_h | in_l).to(tl.int32)
    nc = tl.sum(c, axis=0)
    if SAMPLED:
        strict = m & (key > lb) & (key < ha)
        # per-block counts in 12-bit fields of int32 sums (BLOCK_ <= 2048)
        pa = tl.sum(strict.to(tl.int32) | (in_h.to(tl.int32) << 12), axis=0)
        pb = tl.sum(in_l.to(tl.int32) | ((m & (key > hb)).to(tl.int32) << 12), axis=0)
        # a NaN in the block (a count, not a max: an int64 max reduction missed the NaN of
        # float64 blocks on an H200 with Triton 3.6, where this count form passed)
        if tl.sum((m & (key > INF_KEY)).to(tl.int32), axis=0) > 0:
            tl.atomic_max(flags + seg, 1, sem="relaxed")
            tl.atomic_max(flags + 3 * S, 1, sem="relaxed")  # the call holds a NaN: no writes
        lane = totals + 2 * (seg * LANES + pid % LANES)  # fields < 2^31: no carry
        tl.atomic_add(lane, (pb >> 12).to(tl.int64) | ((pa >> 12).to(tl.int64) << 32),
                      sem="relaxed")
        tl.atomic_add(lane + 1, (pb & 0xFFF).to(tl.int64) | ((pa & 0xFFF).to(tl.int64) << 32),
                      sem="relaxed")
    if nc > 0:
        rel = tl.atomic_add(cand_fill + seg, nc.to(tl.int64), sem="relaxed")
        c2 = rows(c, BLOCK_, VEC[KIND])
        cs = excl_cumsum(c2)  # int32 position in the block's reservation
        room = tl.maximum(tl.minimum(tl.load(cand_cap + seg) - rel, BLOCK_), 0).to(tl.int32)
        dst = cand_key + (tl.load(cand_off + seg) + rel)
        tl.store(dst + cs, rows(key, BLOCK_, VEC[KIND]), mask=(c2 != 0) & (cs < room))
    if SAMPLED:
        if last_program(tick, seg, tl.load(seg_nblk + seg) - 1):
            validate_layer(seg, totals, bnd, active, cand_cap, cand_fill, flags, S, seg_n,
                           tail_n, LANES)
