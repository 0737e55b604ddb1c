"""Candidate refinement: narrow both boundary windows of every layer to one key.

* ``refine_kernel``: one digit level for all layers in one launch: the histogram of the
  next ``W``-bit digit of the keys inside each boundary window, from the candidate slots
  (``FROM_CAND``) or from the data (the exact path's fallback when the boundary buckets
  are huge: every level is then a full read). The last program of each layer keeps the
  digit holding each boundary's rank (``FINAL``: the keys are then exact and it writes the
  thresholds). The sampled path runs one such level (``W`` = ``RANGE_BITS``), the exact
  path one per digit.
* ``compact_kernel`` (sampled path): copies the candidates still inside a window (a
  fraction 2^-RANGE_BITS of them, a few thousand for a 25M-entry layer) into a second
  slot, and the last program of each layer runs every remaining level on those alone
  (:func:`tail_refine`, 32-bin digits in registers). A layer whose second slot overflows
  (many ties inside one digit) is marked missed and rerun on the exact path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    TAIL_BINS, TAIL_BITS, base, finish_layer, key_of, last_program, load_v, locate_row, masked_histogram,
    narrow,
)


@triton.jit
def _window(bnd, row, NB2, KEY32: tl.constexpr):
    """``(lo, hk, rem)`` of boundary ``row`` (lo and hk in the key's integer type)."""
    lo = tl.load(bnd + row)
    hk = tl.load(bnd + NB2 + row)
    rem = tl.load(bnd + 2 * NB2 + row)
    if KEY32:
        lo = lo.to(tl.int32)
        hk = hk.to(tl.int32)
        rem = rem.to(tl.int32)
    return lo, hk, rem


@triton.jit
def _chunk(chk_seg, chk_start, src_n, bnd, S, CHUNK_: tl.constexpr, KEY32: tl.constexpr):
    """This program's chunk: its layer, start and end, and both boundary windows."""
    NB2 = 2 * S
    pid = tl.program_id(0)
    seg = tl.load(chk_seg + pid)
    start = tl.load(chk_start + pid).to(tl.int32)
    end = tl.minimum(start + CHUNK_, tl.load(src_n + seg).to(tl.int32))
    lo_h, hk_h, rem_h = _window(bnd, 2 * seg, NB2, KEY32)
    lo_l, hk_l, rem_l = _window(bnd, 2 * seg + 1, NB2, KEY32)
    return seg, start, end, lo_h, hk_h, rem_h, lo_l, hk_l, rem_l


# (kernel signatures: the data-pass constexprs every kernel takes, which the duplicate
# report pairs with gather.hist_kernel's)
@triton.jit
def refine_kernel(
    g_ptrs, e_ptrs, src_n, chk_seg, chk_start, chk_nchk, src_off, keys, bnd, hist, tick,
    thr, S,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    FROM_CAND: tl.constexpr, W: tl.constexpr, NBINS: tl.constexpr, TILE_: tl.constexpr,
    CHUNK_: tl.constexpr, FINAL: tl.constexpr,
):
    """One chunk of one layer: the ``W``-bit digit ``(key - lo) >> (rem - W)`` of its keys
    inside each boundary's window, histogrammed into the layer's two zeroed rows of
    ``NBINS`` bins (one relaxed atomic per non-empty bin); the layer's last program then
    narrows both windows to the digit holding each rank."""
    NB2 = 2 * S
    seg, start, end, lo_h, hk_h, rem_h, lo_l, hk_l, rem_l = _chunk(
        chk_seg, chk_start, src_n, bnd, S, CHUNK_, KIND != 1)
    h_hi = tl.zeros([NBINS], dtype=tl.int32)
    h_lo = tl.zeros([NBINS], dtype=tl.int32)
    for off in range(start, end, TILE_):
        offs = off + tl.arange(0, TILE_)
        m = offs < end
        if FROM_CAND:
            key = tl.load(keys + tl.load(src_off + seg) + offs, mask=m, other=0)
        else:
            g_base = base(g_ptrs, seg, DT, ALIGNED)
            e_base = base(e_ptrs, seg, DT, ALIGNED)
            key = key_of(load_v(g_base, e_base, offs, m, KIND, HAS_E, True), KIND)
        m_hi = m & (key >= lo_h) & (key <= hk_h)
        m_lo = m & (key >= lo_l) & (key <= hk_l)
        d_hi = ((key - lo_h) >> (rem_h - W)).to(tl.int32)
        d_lo = ((key - lo_l) >> (rem_l - W)).to(tl.int32)
        h_hi += masked_histogram(d_hi, m_hi, NBINS, TILE_)
        h_lo += masked_histogram(d_lo, m_lo, NBINS, TILE_)
    bins = tl.arange(0, NBINS)
    row = hist + seg.to(tl.int64) * (2 * NBINS)
    tl.atomic_add(row + bins, h_hi, mask=h_hi != 0, sem="relaxed")
    tl.atomic_add(row + NBINS + bins, h_lo, mask=h_lo != 0, sem="relaxed")
    if last_program(tick, seg, tl.load(chk_nchk + seg) - 1):
        d, r, _s = locate_row(row, tl.load(bnd + 3 * NB2 + 2 * seg), NBINS, 1 << W)
        narrow(bnd, 2 * seg, d, r, W, NB2)
        d, r, _s = locate_row(row + NBINS, tl.load(bnd + 3 * NB2 + 2 * seg + 1), NBINS, 1 << W)
        narrow(bnd, 2 * seg + 1, d, r, W, NB2)
        if FINAL:
            finish_layer(seg, bnd, thr, S, NB2)


@triton.jit
def compact_kernel(
    src_n, chk_seg, chk_start, chk_nchk, src_off, keys, bnd, keys2, off2, cap2, fill2, tick,
    active, flags, tail_n, thr, S,
    KIND: tl.constexpr, TILE_: tl.constexpr, CHUNK_: tl.constexpr,
):
    """One chunk of one layer's candidate slot: the keys inside either boundary window are
    appended to the layer's second slot (``keys2`` from ``off2[seg]``, at most
    ``cap2[seg]``; one relaxed atomic per tile reserves a range); the layer's last program
    runs :func:`tail_refine`."""
    seg, start, end, lo_h, hk_h, rem_h, lo_l, hk_l, rem_l = _chunk(
        chk_seg, chk_start, src_n, bnd, S, CHUNK_, KIND != 1)
    src = keys + tl.load(src_off + seg)
    dst = keys2 + tl.load(off2 + seg)
    cap = tl.load(cap2 + seg)
    for off in range(start, end, TILE_):
        offs = off + tl.arange(0, TILE_)
        m = offs < end
        key = tl.load(src + offs, mask=m, other=0)
        k = (m & (((key >= lo_h) & (key <= hk_h)) | ((key >= lo_l) & (key <= hk_l)))).to(tl.int32)
        nk = tl.sum(k, axis=0)
        if nk > 0:
            at = tl.atomic_add(fill2 + seg, nk.to(tl.int64), sem="relaxed")
            pos = at + (tl.cumsum(k, axis=0) - k)
            tl.store(dst + pos, key, mask=(k != 0) & (pos < cap))
    if last_program(tick, seg, tl.load(chk_nchk + seg) - 1):
        tail_refine(seg, dst, tl.load(fill2 + seg, cache_modifier=".cg"), cap, bnd, active,
                    flags, tail_n, thr, S, KIND, TILE_)


@triton.jit
def _locate_regs(h, r, NBINS: tl.constexpr, NB):
    """:func:`.common.locate_row` of a histogram held in registers (``h[j]``: digit ``j``):
    the largest digit ``d`` whose keys and the larger ones number more than ``r``, and
    ``r`` minus the keys of larger digits."""
    j = tl.arange(0, NBINS)
    h = tl.where(j < NB, h, 0).to(tl.int64)
    at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
    d = tl.maximum(tl.sum((at_or_above > r).to(tl.int32), axis=0) - 1, 0)
    above = tl.sum(tl.where(j == d, at_or_above - h, 0), axis=0)
    return d, r - above


@triton.jit
def tail_refine(seg, keys2, cnt, cap, bnd, active, flags, tail_n, thr, S,
                KIND: tl.constexpr, TILE_: tl.constexpr):
    """Every remaining digit level of layer ``seg`` in this one program, over the ``cnt``
    keys of its second slot (``TAIL_BITS``-bit digits, histograms in registers), then the
    thresholds. A slot that overflowed (``cnt > cap``) marks the layer missed instead."""
    NB2 = 2 * S
    KEY32: tl.constexpr = KIND != 1
    NBINS: tl.constexpr = TAIL_BINS
    act = tl.load(active + seg) != 0
    missed = tl.load(flags + S + seg) != 0
    over = act & (~missed) & (cnt > cap)
    if over:
        tl.store(flags + S + seg, 1)
        tl.store(tail_n + seg, 0)
    run = act & (~missed) & (~over)
    if run:
        rem_h = tl.load(bnd + 2 * NB2 + 2 * seg)
        rem_l = tl.load(bnd + 2 * NB2 + 2 * seg + 1)
        while (rem_h > 0) | (rem_l > 0):
            lo_h, hk_h, _r0 = _window(bnd, 2 * seg, NB2, KEY32)
            lo_l, hk_l, _r1 = _window(bnd, 2 * seg + 1, NB2, KEY32)
            w_h = tl.minimum(rem_h, TAIL_BITS)
            w_l = tl.minimum(rem_l, TAIL_BITS)
            sh_h = rem_h - w_h
            sh_l = rem_l - w_l
            if KEY32:
                sh_h = sh_h.to(tl.int32)
                sh_l = sh_l.to(tl.int32)
            h_hi = tl.zeros([NBINS], dtype=tl.int32)
            h_lo = tl.zeros([NBINS], dtype=tl.int32)
            for off in range(0, cnt, TILE_):
                offs = off + tl.arange(0, TILE_)
                m = offs < cnt
                # (through L2: other programs of the launch wrote the slot)
                key = tl.load(keys2 + offs, mask=m, other=0, cache_modifier=".cg")
                m_hi = m & (key >= lo_h) & (key <= hk_h) & (rem_h > 0)
                m_lo = m & (key >= lo_l) & (key <= hk_l) & (rem_l > 0)
                h_hi += masked_histogram(((key - lo_h) >> sh_h).to(tl.int32), m_hi, NBINS, TILE_)
                h_lo += masked_histogram(((key - lo_l) >> sh_l).to(tl.int32), m_lo, NBINS, TILE_)
            if rem_h > 0:
                d, r = _locate_regs(h_hi, tl.load(bnd + 3 * NB2 + 2 * seg), NBINS, 1 << w_h)
                narrow(bnd, 2 * seg, d, r, w_h, NB2)
            if rem_l > 0:
                d, r = _locate_regs(h_lo, tl.load(bnd + 3 * NB2 + 2 * seg + 1), NBINS, 1 << w_l)
                narrow(bnd, 2 * seg + 1, d, r, w_l, NB2)
            rem_h = rem_h - w_h
            rem_l = rem_l - w_l
        finish_layer(seg, bnd, thr, S, NB2)
