"""Sampled path, boundary search: key ranges from a sample, and their validation.

``sample_kernel`` histograms the first key digit of a strided sample of every layer (and
that digit extended by ``FINE`` bits); the program that completes a layer's sample then
turns the histograms into two key ranges that hold the layer's boundary ranks with high
probability (:func:`range_layer`). The gather pass (:mod:`.gather`) counts the data against
those ranges and its last program per layer checks them (:func:`validate_layer`): a layer
whose ranks fall outside its ranges (or whose ranges are too wide, or whose candidate slot
overflows) is marked missed, skipped by the rest of the call and rerun on the exact path.
Results never depend on the sample: only the speed does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import RANGE_BITS, base, key_of, last_program, load_v, locate_row, masked_histogram


@triton.jit
def sample_kernel(
    g_ptrs, e_ptrs, seg_n, hist, tick, rank0, active, bnd, wide, S,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    SHIFT: tl.constexpr, NBINS: tl.constexpr, SAMPLE_: tl.constexpr, SPLIT: tl.constexpr,
    TILE_: tl.constexpr, SIGMAS: tl.constexpr, SLACK: tl.constexpr, REL: tl.constexpr,
    FINE: tl.constexpr,
):
    """Program ``(seg, p)``: the ``p``-th of ``SPLIT`` parts of layer ``seg``'s sample
    (``min(n, SAMPLE_)`` entries at a fixed stride; the whole layer when ``n <= SAMPLE_``,
    so small layers get exact ranges) into the zeroed ``hist`` row (one atomic per
    non-empty bin) and, ``FINE``, the first digit extended by ``FINE`` bits into the
    layer's fine row after all S coarse rows (one relaxed atomic per sampled entry). The
    layer's last program runs :func:`range_layer`."""
    seg = tl.program_id(0)
    part = tl.program_id(1)
    n = tl.load(seg_n + seg)
    g_base = base(g_ptrs, seg, DT, ALIGNED)
    e_base = base(e_ptrs, seg, DT, ALIGNED)
    s = tl.minimum(n, SAMPLE_)
    stride = n // tl.maximum(s, 1)
    per = (s + SPLIT - 1) // SPLIT
    lo = part * per
    hi = tl.minimum(lo + per, s)
    h = tl.zeros([NBINS], dtype=tl.int32)
    frow = hist + S * NBINS + seg.to(tl.int64) * (NBINS << FINE)
    for off in range(lo, hi, TILE_):
        i = off + tl.arange(0, TILE_)
        m = i < hi
        key = key_of(load_v(g_base, e_base, i * stride, m, KIND, HAS_E, True), KIND)
        h += masked_histogram((key >> SHIFT).to(tl.int32), m, NBINS, TILE_)
        if FINE > 0:
            tl.atomic_add(frow + (key >> (SHIFT - FINE)).to(tl.int32), 1, mask=m, sem="relaxed")
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist + seg.to(tl.int64) * NBINS + bins, h, mask=h != 0, sem="relaxed")
    if last_program(tick, seg, SPLIT - 1):
        range_layer(seg, hist + seg.to(tl.int64) * NBINS, frow, n, rank0, active, bnd, wide,
                    S, NBINS, SAMPLE_, SIGMAS, SLACK, REL, FINE, SHIFT)


@triton.jit
def _sample_range(row, frow, rho, d, s, exact, NBINS: tl.constexpr, FINE: tl.constexpr,
                  SHIFT: tl.constexpr):
    """Keys ``[ka, kb]`` spanning sample ranks ``rho - d .. rho + d (+1)``, and the first
    digits ``a``, ``b`` of those ends: the first digit holding each end's rank, narrowed
    (``FINE``) to the ``2^FINE``-th of that digit holding it. A side that hits the end of
    the sample runs to the end of the key range (the layer's extreme values need not be in
    the sample)."""
    top = rho - d
    bottom = rho + d + (1 - exact.to(tl.int64))
    b, r_b, _s0 = locate_row(row, tl.maximum(top, 0), NBINS, NBINS)
    a, r_a, _s1 = locate_row(row, tl.minimum(bottom, s - 1), NBINS, NBINS)
    b64 = b.to(tl.int64)  # keys in int64 (float64's 63-bit keys)
    a64 = a.to(tl.int64)
    if FINE > 0:  # the sub-bucket of each end's digit that holds its rank
        fb, _r2, _s2 = locate_row(frow + (b64 << FINE), r_b, 1 << FINE, 1 << FINE)
        fa, _r3, _s3 = locate_row(frow + (a64 << FINE), r_a, 1 << FINE, 1 << FINE)
        kb = ((((b64 << FINE) | fb) + 1) << (SHIFT - FINE)) - 1
        ka = ((a64 << FINE) | fa) << (SHIFT - FINE)
    else:
        kb = ((b64 + 1) << SHIFT) - 1
        ka = a64 << SHIFT
    run_top = (top <= 0) & (~exact)
    run_bottom = (bottom >= s - 1) & (~exact)
    b = tl.where(run_top, NBINS - 1, b)
    kb = tl.where(run_top, kb * 0 + ((NBINS << SHIFT) - 1), kb)  # every key up to NaN's
    a = tl.where(run_bottom, 0, a)
    ka = tl.where(run_bottom, 0, ka)
    return a, b, ka, kb


@triton.jit
def _span_bits(ka, kb, BITS: tl.constexpr):
    """Smallest ``rem >= BITS`` with ``kb - ka < 2^rem``: the window ``[ka, kb]`` splits into
    at most ``2^BITS`` digits of ``rem - BITS`` bits."""
    rem = tl.full([], BITS, tl.int64)
    while ((kb - ka) >> rem) > 0:
        rem += 1
    return rem


@triton.jit
def range_layer(
    seg, row, frow, n, rank0, active, bnd, wide, S,
    NBINS: tl.constexpr, SAMPLE_: tl.constexpr, SIGMAS: tl.constexpr, SLACK: tl.constexpr,
    REL: tl.constexpr, FINE: tl.constexpr, SHIFT: tl.constexpr,
):
    """Key windows ``[lo, hk]`` that hold each boundary's rank of layer ``seg`` with high
    probability (``bnd`` rows lo, hk, rem, rank; ``rem`` such that the window splits into
    ``2^RANGE_BITS`` digits). In sample space a boundary sits at rank ``rho = R * s / n``
    give or take a binomial ``sqrt(s p (1 - p))``; the range spans the keys at ranks
    ``rho -/+ (SIGMAS * that + SLACK)`` (exactly ``rho`` when the whole layer was sampled).
    Ranges that share a first digit merge (the counts of the gather then see one range).
    ``wide[seg]`` = 1 when a range of an active layer spans more than ``REL`` first digits
    (too wide: the layer is rerun on the exact path)."""
    act = tl.load(active + seg) != 0
    s = tl.minimum(n, SAMPLE_)
    exact = s == n
    sf = tl.maximum(s, 1).to(tl.float32)
    rr_hi = tl.load(rank0 + 2 * seg)
    rho = (rr_hi * s) // tl.maximum(n, 1)
    p = rho.to(tl.float32) / sf
    d = tl.where(exact, 0, (SIGMAS * tl.sqrt(sf * p * (1.0 - p)) + SLACK).to(tl.int64))
    a_hi, b_hi, ka_hi, kb_hi = _sample_range(row, frow, rho, d, s, exact, NBINS, FINE, SHIFT)
    rr_lo = tl.load(rank0 + 2 * seg + 1)
    rho = (rr_lo * s) // tl.maximum(n, 1)
    p = rho.to(tl.float32) / sf
    d = tl.where(exact, 0, (SIGMAS * tl.sqrt(sf * p * (1.0 - p)) + SLACK).to(tl.int64))
    a_lo, b_lo, ka_lo, kb_lo = _sample_range(row, frow, rho, d, s, exact, NBINS, FINE, SHIFT)
    merge = b_lo >= a_hi
    a_hi = tl.where(merge, a_lo, a_hi)
    b_lo = tl.where(merge, b_hi, b_lo)
    ka_hi = tl.where(merge, ka_lo, ka_hi)
    kb_lo = tl.where(merge, kb_hi, kb_lo)
    too_wide = (b_hi - a_hi >= REL) | (b_lo - a_lo >= REL)
    NB2 = 2 * S
    tl.store(bnd + 2 * seg, tl.where(act, ka_hi, -1))  # -1: an empty band matches nothing
    tl.store(bnd + 2 * seg + 1, tl.where(act, ka_lo, -1))
    tl.store(bnd + NB2 + 2 * seg, tl.where(act, kb_hi, -1))
    tl.store(bnd + NB2 + 2 * seg + 1, tl.where(act, kb_lo, -1))
    tl.store(bnd + 2 * NB2 + 2 * seg, _span_bits(ka_hi, kb_hi, RANGE_BITS))
    tl.store(bnd + 2 * NB2 + 2 * seg + 1, _span_bits(ka_lo, kb_lo, RANGE_BITS))
    tl.store(bnd + 3 * NB2 + 2 * seg, rr_hi)
    tl.store(bnd + 3 * NB2 + 2 * seg + 1, rr_lo)
    tl.store(wide + seg, (act & too_wide).to(tl.int64))


@triton.jit
def validate_layer(seg, totals, bnd, active, cand_cap, cand_fill, flags, S, seg_n, tail_n,
                   LANES: tl.constexpr):
    """Is each boundary's rank of layer ``seg`` inside its range (else the sample missed)?
    Sums the layer's ``LANES`` copies of the gather's totals, writes ``flags[S + seg] = 1``
    on a miss, a candidate-slot overflow or a range too wide (``flags[2S + seg]``), and
    turns the ranks into ranks inside the ranges (rank minus the keys above the range). A
    missed layer gets no candidates (``cand_fill`` 0) and size 0 for the rest of the call
    (``tail_n``), which then neither reads nor writes it. Reads the gather's atomics through
    L2 (``.cg``)."""
    NB2 = 2 * S
    act = tl.load(active + seg) != 0
    j = tl.arange(0, LANES)
    row = totals + 2 * (seg * LANES + j)
    t0 = tl.sum(tl.load(row, cache_modifier=".cg"), axis=0)
    t1 = tl.sum(tl.load(row + 1, cache_modifier=".cg"), axis=0)
    above, n_h = t0 & 0xFFFFFFFF, t0 >> 32
    n_l, n_b = t1 & 0xFFFFFFFF, t1 >> 32
    r_hi = tl.load(bnd + 3 * NB2 + 2 * seg)
    r_lo = tl.load(bnd + 3 * NB2 + 2 * seg + 1)
    merged = tl.load(bnd + 2 * seg) == tl.load(bnd + 2 * seg + 1)
    ok_hi = (r_hi >= above) & (r_hi < above + n_h)
    base_lo = tl.where(merged, above, above + n_h + n_b)
    ok_lo = (r_lo >= base_lo) & (r_lo < base_lo + tl.where(merged, n_h, n_l))
    fill = tl.load(cand_fill + seg, cache_modifier=".cg")
    fits = fill <= tl.load(cand_cap + seg)
    bad = act & ~(ok_hi & ok_lo & fits)
    bad = bad | (act & (tl.load(flags + 2 * S + seg) != 0))
    tl.store(flags + S + seg, bad.to(tl.int64))
    tl.store(cand_fill + seg, tl.where(bad, 0, fill))
    tl.store(tail_n + seg, tl.where(bad, 0, tl.load(seg_n + seg)))
    tl.store(bnd + 3 * NB2 + 2 * seg, r_hi - above)
    tl.store(bnd + 3 * NB2 + 2 * seg + 1, r_lo - base_lo)
