"""Device decoder of the wire format v1: validate many clients' payloads completely on the
device, then add the accepted ones into one flat float32 buffer, in client order, with the
CPU accumulator's float32 arithmetic (byte layout and rules: ``dgp_kernels/codec/README.md``).

Input: one uint8 buffer holding every client's payload at ``starts[c]``, ``lens[c]`` (int64
device tensors: the lengths are data, e.g. an all-gathered size vector; the host only needs
an upper bound ``max_len``), the server's layer sizes ``numels`` (host: they decide every
grid). A call is a fixed sequence of launches with **no host sync**:

| # | kernel | grid | does |
|---|---|---|---|
| 1-2 | ``crc32_ranges`` (``codec_common``) | clients x 4 KiB chunks, clients | CRC-32 of each payload body |
| 3 | ``_parse_kernel`` | clients | header, checksum, flags, meta, layer count, every layer-table rule (128 entries at a time, running sums carried), stream lengths adding up exactly; writes per (client, layer) the coding, ``k`` and absolute stream offsets, and the client's status |
| 4 | ``_check_kernel`` | clients x position blocks | bitmap bits (count per block, padding bits), raw32/raw64 indices (range, strict increase), values (NaN/inf) |
| 5 | ``torch.cumsum`` | | per client, running bitmap counts over the blocks |
| 6 | ``_finalize_kernel`` | 1 | bitmap popcount == ``k`` per layer; final status per client and the call's flags |
| 7 | ``_accumulate_kernel`` | position blocks | per block, clients in order: ``out[x] = out[x] + v`` or ``out[x] + float32(w) * v`` (no FMA: launched with ``enable_fp_fusion=False``), a CTA barrier between clients |

Status per client: 0 accepted, 1 rejected, 2 valid so far but its index streams use varint
or Rice (serial codings the device does not walk). ``status[C]`` holds the call's flags:
bit 0 some client rejected, bit 1 some client needs the host. The accumulate kernel adds
nothing at all when bit 1 is set, or when bit 0 is set and ``all_or_nothing``: the caller
then runs the host path on untouched buffers. The status vector (``C + 1`` int32) is the
only thing a caller needs to read back.

Bounds: every byte load is masked to ``[start, start + len)`` of its client (a garbage
offset reads zeros, never outside); the kernels after the parse only use a client's records
when its parse status is 0, i.e. every offset was checked against the payload length.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .codec_common import crc32_ranges, load_le, load_u8, serialized

BLOCK = 1024  # positions per program of the check / accumulate passes (a multiple of 8)
REC = 5       # per (client, layer): coding, k, index stream offset, value stream offset, dtype
MAX_PAYLOAD = 1 << 56
MAX_PAYLOAD_C: tl.constexpr = tl.constexpr(MAX_PAYLOAD)


@triton.jit
def _client_layer(rec, starts, lens, c, layer, L):
    """Client ``c``'s end of payload and its record of ``layer`` (coding, k, absolute offsets
    of the index and value streams, value dtype id)."""
    lim = tl.load(starts + c) + tl.load(lens + c)
    r = c * (L * 5) + layer * 5
    return (lim, tl.load(rec + r), tl.load(rec + r + 1), tl.load(rec + r + 2),
            tl.load(rec + r + 3), tl.load(rec + r + 4))


@triton.jit
def _parse_kernel(buf, starts, lens, crcs, lay, rec, status, L, has_aligned: tl.constexpr,
                  check_ak: tl.constexpr, TILE: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    start = tl.load(starts + c)
    n = tl.load(lens + c)
    lim = start + n
    ok = (n >= 20) & (n <= MAX_PAYLOAD_C)
    ok &= (load_u8(buf, start, lim) == 0x44) & (load_u8(buf, start + 1, lim) == 0x47)
    ok &= (load_u8(buf, start + 2, lim) == 0x50) & (load_u8(buf, start + 3, lim) == 0x57)
    ok &= load_le(buf, start + 4, lim, 2) == 1
    ok &= load_le(buf, start + n - 4, lim, 4) == tl.load(crcs + c)
    flags = load_le(buf, start + 6, lim, 2)
    ok &= (flags & ~1) == 0
    aligned = (flags & 1) != 0
    nl = load_le(buf, start + 8, lim, 4)
    num_meta = load_le(buf, start + 12, lim, 4)
    body = n - 4
    ok &= num_meta <= (body - 16) // 10
    q = start + 16
    i = tl.zeros((), tl.int64)
    kb = tl.arange(0, 256).to(tl.int64)
    while ok & (i < num_meta):
        kl = load_u8(buf, q, lim)
        ok &= (q < start + body) & (kl != 0) & (kl + 9 <= start + body - q)
        key = load_u8(buf, q + 1 + kb, lim)
        ok &= tl.max(((kb < kl) & ((key < 0x21) | (key > 0x7E))).to(tl.int32), 0) == 0
        q += kl + 9
        i += 1
    pos = q - start
    ok &= nl <= (body - pos) // 28
    ok &= nl == L
    ok &= (~aligned) | has_aligned
    table_end = pos + L * 28
    room = body - table_end
    itot = tl.zeros((), tl.int64)
    vtot = tl.zeros((), tl.int64)
    host = tl.zeros((), tl.int1)
    # The layer table, TILE entries at a time. Every term is checked to be >= 0 and the
    # stream lengths must add up to the room exactly, which implies every running-sum
    # check of the serial parser (no prefix can pass the room when the total equals it).
    ibase = start + table_end
    for t0 in range(0, L, TILE):
        ls = t0 + tl.arange(0, TILE).to(tl.int64)
        lm = tl.where(ok, ls < L, False)
        limv = tl.where(lm, lim, 0)
        e = start + pos + 28 * ls
        numel = load_le(buf, e, limv, 8)
        k = load_le(buf, e + 8, limv, 8)
        nb = load_le(buf, e + 16, limv, 8)
        coding = load_u8(buf, e + 24, limv)
        vd = load_u8(buf, e + 25, limv)
        param = load_u8(buf, e + 26, limv)
        okl = (numel >= 0) & (k >= 0) & (k <= numel) & (nb >= 0) & (nb <= room)
        okl &= (coding < 6) & (vd >= 1) & (vd <= 3) & (load_u8(buf, e + 27, limv) == 0)
        okl &= tl.where(coding == 3, param <= 63, param == 0)
        okl &= numel == tl.load(lay + 6 * ls, mask=lm, other=0)
        okl &= tl.where(aligned, coding == 0, True)
        if check_ak:
            okl &= tl.where(aligned, k == tl.load(lay + 6 * ls + 4, mask=lm, other=0), True)
        vs = tl.where(vd == 1, 4, 2)
        okl &= k <= room // vs
        kc = tl.minimum(tl.maximum(k, 0), room)  # keeps every product below 2^63 (room < 2^56)
        cb = (kc + 7) // 8
        need = tl.where(coding == 0, (nb == 0) & (tl.where(aligned, True, k == numel)),
               tl.where(coding == 1, nb == numel // 8 + ((numel & 7) != 0).to(tl.int64),
               tl.where(coding == 2, nb >= kc,
               tl.where(coding == 3, (nb >= cb) & (nb - cb >= (kc * param + 7) // 8),
               tl.where(coding == 4, nb == 4 * kc, (kc <= room // 8) & (nb == 8 * kc))))))
        okl &= need
        ok &= tl.max(tl.where(lm, (~okl).to(tl.int32), 0), 0) == 0
        nbv = tl.where(lm & okl, nb, 0)
        vbv = tl.where(lm & okl, kc * vs, 0)
        ioff = itot + tl.cumsum(nbv, 0) - nbv
        voff = vtot + tl.cumsum(vbv, 0) - vbv
        base = c * (L * 5) + ls * 5
        tl.store(rec + base, coding, mask=lm)
        tl.store(rec + base + 1, kc, mask=lm)
        tl.store(rec + base + 2, ibase + ioff, mask=lm)
        tl.store(rec + base + 3, voff, mask=lm)  # made absolute below, once itot is known
        tl.store(rec + base + 4, vd, mask=lm)
        host |= tl.max(tl.where(lm & ((coding == 2) | (coding == 3)), 1, 0), 0) != 0
        itot += tl.sum(nbv, 0)
        vtot += tl.sum(vbv, 0)
        ok &= itot + vtot <= room  # the sums stay below 2^63 tile after tile
    ok &= itot + vtot == room
    vbase = ibase + itot
    for t0 in range(0, L, TILE):
        ls = t0 + tl.arange(0, TILE).to(tl.int64)
        lm = tl.where(ok, ls < L, False)
        o = c * (L * 5) + ls * 5 + 3
        tl.store(rec + o, tl.load(rec + o, mask=lm, other=0) + vbase, mask=lm)
    st = tl.where(ok, tl.where(host, 2, 0), 1)
    tl.store(status + c, st.to(tl.int32))


@triton.jit
def _bits(buf, iabs, x, lim, m):
    byte = load_u8(buf, iabs + (x >> 3), tl.where(m, lim, 0))
    return (byte >> (x & 7)) & 1


@triton.jit
def _raw_index(buf, iabs, j, lim, m, wide):
    lo = load_le(buf, iabs + tl.where(wide, 8, 4) * j, tl.where(m, lim, 0), 4)
    hi = load_le(buf, iabs + 8 * j + 4, tl.where(tl.where(wide, m, False), lim, 0), 4)
    return lo | (hi << 32)


@triton.jit
def _check_kernel(buf, starts, lens, lay, blk, rec, status, cnt, bad, L, NB,
                  CHECK_VALUES: tl.constexpr, BLOCK_: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    c = pid // NB
    b = pid - c * NB
    layer = tl.load(blk + 2 * b)
    x0 = tl.load(blk + 2 * b + 1)
    st = tl.load(status + c)
    live = st == 0
    lim, coding, k, iabs, vabs, vd = _client_layer(rec, starts, lens, c, layer, L)
    numel = tl.load(lay + 6 * layer)
    x = x0 + tl.arange(0, BLOCK_).to(tl.int64)
    # bitmap: x < 8 * ceil(numel / 8) (padding bits included)
    mb = tl.where(live & (coding == 1), x < 8 * (numel // 8 + ((numel & 7) != 0).to(tl.int64)), False)
    bits = _bits(buf, iabs, x, lim, mb)
    err = tl.max((bits * (x >= numel).to(tl.int64)), 0) != 0
    tl.store(cnt + pid, tl.sum(bits * (x < numel).to(tl.int64), 0))
    # raw32 / raw64: entries x < k
    mr = tl.where(live & ((coding == 4) | (coding == 5)), x < k, False)
    wide = coding == 5
    v = _raw_index(buf, iabs, x, lim, mr, wide)
    pv = _raw_index(buf, iabs, x - 1, lim, mr & (x > 0), wide)
    pv = tl.where(x > 0, pv, -1)
    err |= tl.max((mr & ((v < 0) | (v >= numel) | (v <= pv))).to(tl.int32), 0) != 0
    if CHECK_VALUES:
        mv = tl.where(live, x < k, False)
        u = load_le(buf, vabs + tl.where(vd == 1, 4, 2) * x, tl.where(mv, lim, 0), 2)
        u4 = u | (load_le(buf, vabs + 4 * x + 2, tl.where(tl.where(vd == 1, mv, False), lim, 0), 2) << 16)
        nf = tl.where(vd == 1, (u4 & 0x7F800000) == 0x7F800000,
             tl.where(vd == 2, (u & 0x7F80) == 0x7F80, (u & 0x7C00) == 0x7C00))
        err |= tl.max((mv & nf).to(tl.int32), 0) != 0
    tl.atomic_or(bad + c, err.to(tl.int32), sem="relaxed")


@triton.jit
def _finalize_kernel(lay, rec, status, cnt, cum, bad, C, L, NB, all_or_nothing,
                     LP: tl.constexpr):
    ls = tl.arange(0, LP).to(tl.int64)
    lm = ls < L
    first = tl.load(lay + 6 * ls + 2, mask=lm, other=0)
    nblk = tl.load(lay + 6 * ls + 3, mask=lm, other=0)
    any_rej = tl.zeros((), tl.int32)
    any_host = tl.zeros((), tl.int32)
    for c in range(C):
        st = tl.load(status + c)
        o = c * (L * 5) + ls * 5
        coding = tl.load(rec + o, mask=lm, other=0)
        k = tl.load(rec + o + 1, mask=lm, other=0)
        has = lm & (nblk > 0)
        last = c * NB + first + nblk - 1
        f = c * NB + first
        pop = tl.load(cum + last, mask=has, other=0) - tl.load(cum + f, mask=has, other=0) \
            + tl.load(cnt + f, mask=has, other=0)
        mism = tl.max((lm & (coding == 1) & (pop != k)).to(tl.int32), 0)
        rej = (st == 1) | ((st != 1) & ((tl.load(bad + c) != 0) | (mism != 0)))
        st = tl.where(rej, 1, st)
        tl.store(status + c, st)
        any_rej |= (st == 1).to(tl.int32)
        any_host |= (st == 2).to(tl.int32)
    abort = (any_host != 0) | ((any_rej != 0) & (all_or_nothing != 0))
    tl.store(status + C, any_rej | (any_host << 1) | (abort.to(tl.int32) << 2))


@triton.jit
def _f16_to_f32(u):
    """IEEE half bits (int64 < 2^16) -> float32, exactly (subnormals, inf, NaN included)."""
    sign = (u >> 15) & 1
    e = (u >> 10) & 31
    mant = u & 1023
    normal = ((sign << 31) | ((e + 112) << 23) | (mant << 13)).to(tl.int32).to(tl.float32, bitcast=True)
    special = ((sign << 31) | (255 << 23) | (mant << 13)).to(tl.int32).to(tl.float32, bitcast=True)
    sub = mant.to(tl.float32) * 5.9604644775390625e-08  # mant * 2^-24: exact
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(e == 0, sub, tl.where(e == 31, special, normal))


@triton.jit
def _value(buf, vabs, j, vd, lim, m):
    lim_m = tl.where(m, lim, 0)
    u = load_le(buf, vabs + tl.where(vd == 1, 4, 2) * j, lim_m, 2)
    u4 = u | (load_le(buf, vabs + 4 * j + 2, tl.where(tl.where(vd == 1, m, False), lim, 0), 2) << 16)
    f32 = u4.to(tl.int32).to(tl.float32, bitcast=True)
    bf = (u << 16).to(tl.int32).to(tl.float32, bitcast=True)
    return tl.where(vd == 1, f32, tl.where(vd == 2, bf, _f16_to_f32(u)))


@triton.jit
def _accumulate_kernel(buf, starts, lens, lay, blk, rec, status, cnt, cum, weights, positions,
                       out, C, L, NB, nsteps, HAS_W: tl.constexpr, BLOCK_: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    flags = tl.load(status + C)
    layer = tl.load(blk + 2 * b)
    x0 = tl.load(blk + 2 * b + 1)
    numel = tl.load(lay + 6 * layer)
    ostart = tl.load(lay + 6 * layer + 1)
    fb = tl.load(lay + 6 * layer + 2)
    poff = tl.load(lay + 6 * layer + 5)
    x = x0 + tl.arange(0, BLOCK_).to(tl.int64)
    xm = x < numel
    for c in range(C):
        live = ((flags & 4) == 0) & (tl.load(status + c) == 0)
        lim, coding, k, iabs, vabs, vd = _client_layer(rec, starts, lens, c, layer, L)
        aligned_l = (coding == 0) & (k != numel)  # implicit with k < numel: an aligned layer
        is_list = (coding == 4) | (coding == 5) | aligned_l
        wide = coding == 5
        # list codings: first entry >= x0 by binary search, then up to BLOCK entries
        lo = tl.zeros((), tl.int64)
        if live & is_list:
            hi = k
            for _ in range(nsteps):  # ceil(log2(k + 1)) <= nsteps
                act = lo < hi
                mid = (lo + hi) // 2
                pm = tl.load(positions + poff + mid, mask=act & aligned_l, other=0)
                rv = _raw_index(buf, iabs, mid, lim, act & ~aligned_l, wide)
                below = tl.where(aligned_l, pm, rv) < x0
                lo = tl.where(act & below, mid + 1, lo)
                hi = tl.where(act & ~below, mid, hi)
        j = lo + tl.arange(0, BLOCK_).to(tl.int64)
        jm = tl.where(live & is_list, j < k, False)
        pl = tl.where(aligned_l, tl.load(positions + poff + j, mask=tl.where(aligned_l, jm, False), other=0),
                      _raw_index(buf, iabs, j, lim, tl.where(aligned_l, False, jm), wide))
        sel_l = jm & (pl < x0 + BLOCK_)
        # dense codings: implicit (all positions) and bitmap (prefix count + in-block rank)
        mbit = tl.where(live & (coding == 1), xm, False)
        bits = _bits(buf, iabs, x, lim, mbit)
        pre = tl.load(cum + c * NB + b) - tl.load(cnt + c * NB + b) \
            - (tl.load(cum + c * NB + fb) - tl.load(cnt + c * NB + fb))
        rank = pre + tl.cumsum(bits, 0) - bits
        sel_d = tl.where(live & (coding == 0) & ~aligned_l, xm, tl.where(live & (coding == 1), mbit & (bits != 0), False))
        pos = tl.where(is_list, pl, x)
        vidx = tl.where(is_list, j, tl.where(coding == 1, rank, x))
        sel = tl.where(is_list, sel_l, sel_d)
        v = _value(buf, vabs, vidx, vd, lim, sel)
        if HAS_W:
            v = v * tl.load(weights + c)
        tl.debug_barrier()
        o = tl.load(out + ostart + pos, mask=sel, other=0.0)
        tl.store(out + ostart + pos, o + v, mask=sel)
        tl.debug_barrier()


@functools.lru_cache(maxsize=32)
def _layout(numels: Tuple[int, ...], aligned_ks: Optional[Tuple[int, ...]]) -> Tuple[list, list, int]:
    lay, blk, ostart, poff = [], [], 0, 0
    for l, n in enumerate(numels):
        nblk = -(-n // BLOCK)
        ak = aligned_ks[l] if aligned_ks is not None else 0
        lay += [n, ostart, len(blk) // 2, nblk, ak, poff]
        blk += [x for s in range(0, n, BLOCK) for x in (l, s)]
        ostart += n
        poff += ak
    return lay, blk, len(blk) // 2


_TABLES: dict = {}


def _tables(numels, aligned_ks, device) -> Tuple[Tensor, Tensor, int]:
    key = (tuple(numels), None if aligned_ks is None else tuple(aligned_ks), str(device))
    t = _TABLES.get(key)
    if t is None:
        lay, blk, nb = _layout(key[0], key[1])
        both = torch.tensor(lay + blk, dtype=torch.int64).to(device)
        t = (both[: len(lay)], both[len(lay):], nb)
        if len(_TABLES) > 32:
            _TABLES.clear()
        _TABLES[key] = t
    return t


class Validation:
    """What :func:`validate_device` leaves on the device for the passes after it."""

    def __init__(self, status, rec, cnt, cum, lay, blk, nb):
        self.status, self.rec, self.cnt, self.cum = status, rec, cnt, cum
        self.lay, self.blk, self.nb = lay, blk, nb


@serialized
def validate_device(buf: Tensor, starts: Tensor, lens: Tensor, max_len: int, numels: Sequence[int],
                    aligned_ks: Optional[Sequence[int]], allow_nonfinite: bool,
                    all_or_nothing: bool, accept_aligned: bool = False) -> Validation:
    """Launches 1-6 of the module docstring. ``buf`` uint8, ``starts``/``lens`` int64 ``[C]``
    on its device (every ``[start, start + len)`` inside ``buf``, ``len <= max_len``).
    Aligned payloads are accepted when ``aligned_ks`` is given (and their ``k`` must match
    it) or, with ``accept_aligned`` (``decode``), without a check of ``k``."""
    device = buf.device
    C, L = int(starts.numel()), len(numels)
    lay, blk, nb = _tables(numels, aligned_ks, device)
    body = torch.clamp(lens - 4, min=0)
    crcs = crc32_ranges(buf, starts, body, max(int(max_len) - 4, 1))
    rec = torch.zeros(max(C * L * REC, 1), dtype=torch.int64, device=device)
    status = torch.zeros(C + 1, dtype=torch.int32, device=device)
    LP = triton.next_power_of_2(max(L, 1))
    if C:
        _parse_kernel[(C,)](buf, starts, lens, crcs, lay, rec, status, L,
                            has_aligned=aligned_ks is not None or accept_aligned,
                            check_ak=aligned_ks is not None, TILE=min(LP, 128))
    cnt = torch.zeros(max(C * nb, 1), dtype=torch.int64, device=device)
    bad = torch.zeros(max(C, 1), dtype=torch.int32, device=device)
    if C and nb:
        _check_kernel[(C * nb,)](buf, starts, lens, lay, blk, rec, status, cnt, bad, L, nb,
                                 CHECK_VALUES=not allow_nonfinite, BLOCK_=BLOCK)
    cum = torch.cumsum(cnt.view(C, nb), 1).reshape(-1) if C and nb else cnt
    _finalize_kernel[(1,)](lay, rec, status, cnt, cum, bad, C, L, max(nb, 1), int(all_or_nothing), LP=LP)
    return Validation(status, rec, cnt, cum, lay, blk, nb)


@serialized
def accumulate_device(buf: Tensor, starts: Tensor, lens: Tensor, max_len: int, numels: Sequence[int],
                      out: Tensor, weights: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                      aligned_ks: Optional[Sequence[int]] = None, allow_nonfinite: bool = False,
                      all_or_nothing: bool = False) -> Tensor:
    """Validate every client and add the accepted ones into ``out`` (flat float32, the
    layers of ``numels`` back to back). ``weights``: float32 ``[C]`` or None; ``positions``:
    the aligned layers' broadcast positions (int64, concatenated, ``aligned_ks[l]`` per
    layer) or None. Returns the int32 ``[C + 1]`` status vector (module docstring); no host
    sync. ``out`` is untouched when ``status[C] & 4`` (the call was aborted)."""
    v = validate_device(buf, starts, lens, max_len, numels, aligned_ks, allow_nonfinite, all_or_nothing)
    C, L = int(starts.numel()), len(numels)
    if C and v.nb:
        w = weights if weights is not None else out
        p = positions if positions is not None and positions.numel() else v.lay
        _accumulate_kernel[(v.nb,)](buf, starts, lens, v.lay, v.blk, v.rec, v.status, v.cnt, v.cum,
                                    w, p, out, C, L, v.nb, max(numels).bit_length() + 1, HAS_W=weights is not None, BLOCK_=BLOCK,
                                    enable_fp_fusion=False)
    return v.status


@triton.jit
def _extract_kernel(buf, starts, lens, lay, blk, rec, cnt, cum, koff, idx_out, L, NB,
                    BLOCK_: tl.constexpr):
    """Indices of client 0 (``decode``): bitmap positions and raw entries as int64."""
    b = tl.program_id(0).to(tl.int64)
    layer = tl.load(blk + 2 * b)
    x0 = tl.load(blk + 2 * b + 1)
    numel = tl.load(lay + 6 * layer)
    fb = tl.load(lay + 6 * layer + 2)
    lim = tl.load(starts) + tl.load(lens)
    r = layer * 5
    coding = tl.load(rec + r)
    k = tl.load(rec + r + 1)
    iabs = tl.load(rec + r + 2)
    base = tl.load(koff + layer)
    x = x0 + tl.arange(0, BLOCK_).to(tl.int64)
    mb = tl.where(coding == 1, x < numel, False)
    bits = _bits(buf, iabs, x, lim, mb)
    pre = tl.load(cum + b) - tl.load(cnt + b) - (tl.load(cum + fb) - tl.load(cnt + fb))
    rank = pre + tl.cumsum(bits, 0) - bits
    tl.store(idx_out + base + rank, x, mask=mb & (bits != 0))
    mr = tl.where((coding == 4) | (coding == 5), x < k, False)
    tl.store(idx_out + base + x, _raw_index(buf, iabs, x, lim, mr, coding == 5), mask=mr)


@serialized
def extract_indices(buf: Tensor, starts: Tensor, lens: Tensor, v: Validation, numels: Sequence[int],
                    ks: Sequence[int], codings: Sequence[int]) -> List[Optional[Tensor]]:
    """int64 indices per layer of a validated single payload (``None`` for implicit)."""
    device = buf.device
    offs, tot = [], 0
    for k, c in zip(ks, codings):
        offs.append(tot)
        tot += k if c != 0 else 0
    idx = torch.empty(tot, dtype=torch.int64, device=device)
    if tot and v.nb:
        koff = torch.tensor(offs, dtype=torch.int64).to(device)
        _extract_kernel[(v.nb,)](buf, starts, lens, v.lay, v.blk, v.rec, v.cnt, v.cum, koff, idx,
                                 len(numels), v.nb, BLOCK_=BLOCK)
    return [None if c == 0 else idx[o: o + k] for o, k, c in zip(offs, ks, codings)]
