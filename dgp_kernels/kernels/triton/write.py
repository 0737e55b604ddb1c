"""The ordered write: the second full read, and the only pass that writes.

``write_kernel`` runs one program per block of a layer, in index order of a *virtual*
block id taken from a ticket (an atomic counter) when the program starts, so that every
block a program waits for has already started. Each block counts its keys strictly inside
``(T_lo, T_hi)`` and its ties of each threshold, publishes those counts, and finds the
counts of all blocks before it in its layer by a decoupled look-back (the single-pass
prefix scan of Merrill and Garland, as in CUB): it reads the descriptors of ``LB``
predecessors at a time, adds their block counts until it meets one that already holds
its inclusive prefix, then publishes its own inclusive prefix. With those it applies the
tie rule (kept ties: ordinal in ``[skip_hi, end_hi]`` at ``T_hi``, ``<= take_lo`` at
``T_lo``), and writes int64 indices and values at their output slots, the residual (``v``
with kept positions ``+0.0``) and/or the dense output.

No separate count pass and no scan launch: the counts come from the data this pass reads
anyway. In the interpreter (programs one after another) every predecessor has finished
when a block looks back, in any program order, because the ticket, not the program id,
orders the blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import VEC, base, excl_cumsum, key_of, load_v, rows

VALID = tl.constexpr(1 << 62)  # a published descriptor word (its counts below)


@triton.jit
def write_kernel(
    g_ptrs, e_ptrs, d_ptrs, o_ptrs, seg_n, blk_seg, blk_start, seg_first, active, thr,
    out_off, desc, ticket, stop, S, NBLK,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    WRITE_SPARSE: tl.constexpr, WRITE_E: tl.constexpr, WRITE_DENSE: tl.constexpr,
    BLOCK_: tl.constexpr, LB: tl.constexpr,
):
    """``seg_n``: the layers' sizes for this pass (0: a layer the sampled path missed, left
    to the exact rerun); ``stop[0]`` set: the call holds a NaN and nothing is written.
    ``desc``: int64 ``[3, NBLK]`` zeroed descriptors (block counts; inclusive prefix in two
    words)."""
    vid = tl.atomic_add(ticket, 1, sem="relaxed")
    seg = tl.load(blk_seg + vid)
    start = tl.load(blk_start + vid).to(tl.int32)
    n = tl.load(seg_n + seg).to(tl.int32)
    n = tl.where(tl.load(stop) != 0, 0, n)
    if start < n:
        a = (g_ptrs, e_ptrs, d_ptrs, o_ptrs, seg_first, active, thr, out_off, desc, S, NBLK)
        if start <= n - BLOCK_:
            _write_block(vid, seg, start, n, True, a, DT, KIND, HAS_E, ALIGNED, WRITE_SPARSE,
                         WRITE_E, WRITE_DENSE, BLOCK_, LB)
        else:
            _write_block(vid, seg, start, n, False, a, DT, KIND, HAS_E, ALIGNED, WRITE_SPARSE,
                         WRITE_E, WRITE_DENSE, BLOCK_, LB)


@triton.jit
def _lookback(desc, NBLK, vid, first, LB: tl.constexpr):
    """Counts (strictly inside, T_hi ties, T_lo ties) of the blocks ``first .. vid - 1``:
    descriptor words of ``LB`` predecessors at a time (volatile loads: other programs
    write them while this one waits), nearest first; block counts are added until a block
    with its inclusive prefix published; a window that holds a block with neither yet is
    read again."""
    i = tl.arange(0, LB)
    acc0 = tl.zeros([], tl.int64)
    acc1 = tl.zeros([], tl.int64)
    acc2 = tl.zeros([], tl.int64)
    j = vid - 1
    going = j >= first
    while going:
        idx = j - i
        m = idx >= first
        a = tl.load(desc + idx, mask=m, other=0, volatile=True)
        i0 = tl.load(desc + NBLK + idx, mask=m, other=0, volatile=True)
        i1 = tl.load(desc + 2 * NBLK + idx, mask=m, other=0, volatile=True)
        inc = m & ((i0 & VALID) != 0) & ((i1 & VALID) != 0)
        p = tl.min(tl.where(inc, i, LB), axis=0)  # the nearest inclusive prefix
        need = m & (i < p)
        ready = tl.sum((need & ((a & VALID) == 0)).to(tl.int32), axis=0) == 0
        if ready:
            aa = tl.where(need, a, 0)
            at_p = i == p
            acc0 += tl.sum(aa & 0xFFF, axis=0) + tl.sum(tl.where(at_p, (i0 >> 31) & 0x7FFFFFFF, 0), axis=0)
            acc1 += tl.sum((aa >> 12) & 0xFFF, axis=0) + tl.sum(tl.where(at_p, i0 & 0x7FFFFFFF, 0), axis=0)
            acc2 += tl.sum((aa >> 24) & 0xFFF, axis=0) + tl.sum(tl.where(at_p, i1 & 0x7FFFFFFF, 0), axis=0)
            going = (p == LB) & (j - LB >= first)
            j = j - LB
    return acc0, acc1, acc2


@triton.jit
def _write_block(
    vid, seg, start, n, FULL: tl.constexpr, a,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    WRITE_SPARSE: tl.constexpr, WRITE_E: tl.constexpr, WRITE_DENSE: tl.constexpr,
    BLOCK_: tl.constexpr, LB: tl.constexpr,
):
    """Block ``vid`` of layer ``seg``. ``FULL``: the block lies inside its layer (unmasked,
    vectorised loads and stores); else masked."""
    (g_ptrs, e_ptrs, d_ptrs, o_ptrs, seg_first, active, thr, out_off, desc, S, NBLK) = a
    V: tl.constexpr = VEC[KIND]
    offs = start + tl.arange(0, BLOCK_)
    if FULL:
        m = tl.full([BLOCK_], 1, tl.int1)
    else:
        m = offs < n
    g_base = base(g_ptrs, seg, DT, ALIGNED)
    e_base = base(e_ptrs, seg, DT, ALIGNED)
    v = load_v(g_base, e_base, offs, m, KIND, HAS_E, not FULL)
    key = key_of(v, KIND)
    act = tl.load(active + seg) != 0
    th = tl.where(act, tl.load(thr + seg), -1)  # -1: an empty band keeps nothing
    tlo = tl.where(act, tl.load(thr + S + seg), 0x7FFFFFFFFFFFFFFF)
    if KIND != 1:  # T_lo may be INT64_MAX (no lower tie group): above every non-NaN key
        th = th.to(tl.int32)
        tlo = tl.minimum(tlo, 0x7FFFFFFF).to(tl.int32)
    strict = m & (key > tlo) & (key < th)
    eq_hi = m & (key == th)
    eq_lo = m & (key == tlo)
    # the block's counts in 12-bit fields (BLOCK_ <= 2048): one reduction
    own = tl.sum(strict.to(tl.int64) | (eq_hi.to(tl.int64) << 12) | (eq_lo.to(tl.int64) << 24),
                 axis=0)
    tl.atomic_xchg(desc + vid, own | VALID, sem="relaxed")
    first = tl.load(seg_first + seg)
    x0, x1, x2 = _lookback(desc, NBLK, vid, first, LB)
    c0 = own & 0xFFF
    c1 = (own >> 12) & 0xFFF
    c2 = (own >> 24) & 0xFFF
    tl.atomic_xchg(desc + NBLK + vid, VALID | ((x0 + c0) << 31) | (x1 + c1), sem="relaxed")
    tl.atomic_xchg(desc + 2 * NBLK + vid, VALID | (x2 + c2), sem="relaxed")
    skip = tl.load(thr + 2 * S + seg)
    endh = tl.load(thr + 3 * S + seg)
    take = tl.load(thr + 4 * S + seg)
    kept = strict
    if (c1 + c2) > 0:  # the tie rule, only in blocks holding a threshold key
        e2 = eq_hi.to(tl.int32) | (eq_lo.to(tl.int32) << 16)
        cs = tl.reshape(excl_cumsum(rows(e2, BLOCK_, V)), [BLOCK_])
        ord_hi = x1 + (cs & 0xFFFF)
        ord_lo = x2 + (cs >> 16)
        kept = kept | (eq_hi & (ord_hi >= skip) & (ord_hi <= endh)) | (eq_lo & (ord_lo <= take))
    if WRITE_SPARSE:
        # kept ties before this block: ordinals [0, x1) inside [skip, endh], [0, x2) <= take
        kh = tl.maximum(tl.minimum(x1, endh + 1) - skip, 0)
        kl = tl.minimum(x2, take + 1)
        first_slot = tl.load(out_off + seg) + x0 + kh + kl
        kept2 = rows(kept, BLOCK_, V)
        cs = excl_cumsum(kept2.to(tl.int32))  # int32 slot inside the block's output range
        # outputs through the pointer table (like the inputs), so that a captured CUDA
        # graph writes into each call's fresh outputs
        out_idx = tl.load(o_ptrs).to(tl.pointer_type(tl.int64))
        out_val = tl.load(o_ptrs + 1).to(tl.pointer_type(DT))
        tl.store((out_idx + first_slot) + cs, rows(offs, BLOCK_, V).to(tl.int64), mask=kept2)
        tl.store((out_val + first_slot) + cs, rows(v, BLOCK_, V), mask=kept2)
    zero = tl.zeros_like(v)  # +0.0
    if WRITE_E:
        tl.store(e_base + offs, tl.where(kept, zero, v), mask=m)
    if WRITE_DENSE:
        d_base = base(d_ptrs, seg, DT, ALIGNED)
        tl.store(d_base + offs, tl.where(kept, v, zero), mask=m)
