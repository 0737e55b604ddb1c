"""Shared pieces of the device wire codec (``codec_encode.py``, ``codec_decode.py``):
bounds-checked little-endian byte loads, CRC-32 of many byte ranges in two launches,
and the small host tables they need.

CRC-32 (the zlib one: reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF) is
a serial recurrence; it is made parallel by its linearity over GF(2). Write ``raw(M)`` for
the register after feeding ``M`` from a zero register, and ``shift(x, m)`` for the register
``x`` after ``m`` zero bytes (multiplication by ``x^(8m)`` modulo the polynomial). Then

* ``raw(A || B) = shift(raw(A), len(B)) xor raw(B)`` (the chunks are independent),
* leading zero bytes do not change ``raw`` (so every range is padded at the *front* to a
  whole number of chunks, and chunk ``i`` of ``nch`` is shifted by ``(nch - 1 - i)`` chunks
  whatever the range's length),
* the init value 0xFFFFFFFF is the same as complementing the first four bytes, so for
  ``len(M) >= 4``: ``crc(M) = raw(M with bytes 0..3 complemented) xor 0xFFFFFFFF``.

Launch 1 (``_crc_chunk_kernel``, one program per range and chunk of ``CRC_LANES x
CRC_LANE_BYTES`` = 4096 bytes): each lane runs the table recurrence over its 16 bytes, the
lanes are shifted into place and xor-reduced. Launch 2 (``_crc_combine_kernel``, one
program per range): chunk ``i`` is multiplied by ``x^(8 * 4096 * (nch - 1 - i))`` (a host
table per ``nch``, cached: ``nch`` depends only on the longest range) and the chunks are
xor-reduced. Both only
ever read bytes inside their range (masked loads), so a range given by untrusted lengths
cannot read out of bounds as long as ``start + len`` lies inside the buffer, which the
callers guarantee.
"""

from __future__ import annotations

import functools
import threading
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

POLY = 0xEDB88320
CRC_LANES = 256
CRC_LANE_BYTES = 16
CRC_CHUNK = CRC_LANES * CRC_LANE_BYTES  # bytes per program of the chunk pass
COMBINE_TILE = 256


_LAUNCH_LOCK = threading.RLock()


def serialized(fn):
    """Run ``fn`` (a launch sequence) under one process-wide lock. Triton's interpreter keeps
    global state per launch, so two threads launching at once (the DDP hook encodes in the
    backward thread while a collective's callback decodes) corrupt each other there; on a
    GPU the lock only orders the host-side enqueueing (microseconds), never device work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LAUNCH_LOCK:
            return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------
# Host arithmetic in GF(2)[x] / P (reflected: bit 31 is x^0), as zlib's crc32_combine.
# ------------------------------------------------------------------------------------------
def multmodp(a: int, b: int) -> int:
    p = 0
    for i in range(32):
        if (a >> (31 - i)) & 1:
            p ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


def x8n(nbytes: int) -> int:
    """``x^(8 * nbytes)`` mod P (the operator that shifts a register past ``nbytes`` zeros)."""
    p, sq = 1 << 31, 1 << 23  # x^0 and x^8
    while nbytes:
        if nbytes & 1:
            p = multmodp(sq, p)
        sq = multmodp(sq, sq)
        nbytes >>= 1
    return p


@functools.lru_cache(maxsize=None)
def _host_tables() -> Tuple[list, list, list, list]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    lanepow = [x8n(CRC_LANE_BYTES * (CRC_LANES - 1 - j)) for j in range(CRC_LANES)]
    return table, lanepow


@functools.lru_cache(maxsize=64)
def _chunk_powers(nch: int) -> Tuple[int, ...]:
    step, p, out = x8n(CRC_CHUNK), 1 << 31, []
    for _ in range(nch):
        out.append(p)
        p = multmodp(step, p)
    return tuple(reversed(out))  # chunk i: x^(8 * CRC_CHUNK * (nch - 1 - i))


_DEVICE_TABLES: dict = {}


def crc_tables(device: torch.device, nch: int) -> Tensor:
    """int64 ``[256 + CRC_LANES + nch]`` on ``device``: the byte table, the lane shifts and
    the chunk shifts for ``nch`` chunks (cached per device and ``nch``)."""
    key = (str(device), nch)
    t = _DEVICE_TABLES.get(key)
    if t is None:
        table, lanepow = _host_tables()
        t = torch.tensor(table + lanepow + list(_chunk_powers(nch)), dtype=torch.int64).to(device)
        if len(_DEVICE_TABLES) > 64:
            _DEVICE_TABLES.clear()
        _DEVICE_TABLES[key] = t
    return t


# ------------------------------------------------------------------------------------------
# Device helpers shared by the codec kernels.
# ------------------------------------------------------------------------------------------
@triton.jit
def load_u8(base, off, lim):
    """Byte ``base[off]`` as int64, or 0 when ``off`` is outside ``[0, lim)`` (never read)."""
    return tl.load(base + off, mask=(off >= 0) & (off < lim), other=0).to(tl.int64)


@triton.jit
def load_le(base, off, lim, NBYTES: tl.constexpr):
    """Little-endian unsigned ``NBYTES``-byte integer at ``base[off]`` as int64 (a u64 above
    2^63 - 1 comes out negative: callers treat negative as "too large"). Bytes outside
    ``[0, lim)`` read as 0."""
    v = load_u8(base, off, lim)
    for i in tl.static_range(1, NBYTES):
        v = v | (load_u8(base, off + i, lim) << (8 * i))
    return v


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def xor_reduce(x):
    return tl.reduce(x, 0, _xor)


@triton.jit
def _mulmod(a, b):
    """``a * b`` mod P, elementwise (int64 holding 32-bit reflected polynomials)."""
    p = tl.zeros_like(a)
    for i in tl.static_range(32):
        p = p ^ tl.where(((a >> (31 - i)) & 1) != 0, b, 0)
        b = tl.where((b & 1) != 0, (b >> 1) ^ 0xEDB88320, b >> 1)
    return p


@triton.jit
def _crc_chunk_kernel(buf, seg_start, seg_len, nch, tabs, chunk_raw,
                      LANES: tl.constexpr, LANE_BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s = pid // nch
    ci = pid - s * nch
    start = tl.load(seg_start + s)
    n = tl.load(seg_len + s)
    pad = nch * (LANES * LANE_BYTES) - n
    lane = tl.arange(0, LANES).to(tl.int64)
    c = tl.zeros((LANES,), tl.int64)
    for t in range(LANE_BYTES):
        r = ci * (LANES * LANE_BYTES) + lane * LANE_BYTES + t - pad
        b = tl.load(buf + start + r, mask=(r >= 0) & (r < n), other=0).to(tl.int64)
        b = tl.where((r >= 0) & (r < 4), b ^ 255, b)  # the init value: bytes 0..3 complemented
        c = tl.load(tabs + ((c ^ b) & 255)) ^ (c >> 8)
    c = _mulmod(tl.load(tabs + 256 + lane), c)
    tl.store(chunk_raw + pid, xor_reduce(c))


@triton.jit
def _crc_combine_kernel(chunk_raw, nch, tabs, out, TILE: tl.constexpr, LANES: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((TILE,), tl.int64)
    for t0 in range(0, nch, TILE):
        ci = t0 + tl.arange(0, TILE).to(tl.int64)
        m = ci < nch
        raw = tl.load(chunk_raw + s * nch + ci, mask=m, other=0)
        pw = tl.load(tabs + 256 + LANES + ci, mask=m, other=0)
        acc = acc ^ _mulmod(pw, raw)
    tl.store(out + s, xor_reduce(acc) ^ 0xFFFFFFFF)


def crc32_ranges(buf: Tensor, starts: Tensor, lens: Tensor, max_len: int) -> Tensor:
    """CRC-32 of ``buf[starts[s] : starts[s] + lens[s]]`` for every range ``s``.

    ``buf`` uint8 (any device Triton runs on); ``starts``, ``lens`` int64 ``[S]`` on the
    same device (data, no host copy: the grid depends only on ``S`` and the host bound
    ``max_len >= max(lens)``; every ``lens[s]`` must be in ``[4, max_len]`` (a shorter
    range gives an unspecified value; the decoder rejects such payloads on their length) and
    the range inside ``buf``). Returns int64 ``[S]`` (values < 2^32). Two launches, no host
    sync.
    """
    S = int(starts.numel())
    out = torch.empty(S, dtype=torch.int64, device=buf.device)
    if S == 0:
        return out
    nch = max(1, -(-int(max_len) // CRC_CHUNK))
    tabs = crc_tables(buf.device, nch)
    raw = torch.empty(S * nch, dtype=torch.int64, device=buf.device)
    _crc_chunk_kernel[(S * nch,)](buf, starts, lens, nch, tabs, raw,
                                  LANES=CRC_LANES, LANE_BYTES=CRC_LANE_BYTES)
    _crc_combine_kernel[(S,)](raw, nch, tabs, out, TILE=COMBINE_TILE, LANES=CRC_LANES)
    return out
