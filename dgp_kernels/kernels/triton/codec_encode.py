"""Device encoder of the wire format v1 (byte layout: ``dgp_kernels/codec/README.md``).

The codings a GPU writes without a serial pass over the indices: implicit, bitmap, raw32
and raw64. Their stream sizes depend only on ``(numel, k)``, so the whole layout (header,
meta, layer table, every stream offset and the total length) is known on the host from the
shapes: the output is allocated without reading anything back, and a call is a fixed
sequence of launches with **no host sync**:

| # | what | launch |
|---|---|---|
| 1 | header + meta + layer table (host bytes, cached per layout) into the output | H2D copy |
| 2 | the per-layer / per-block tables (cached per layout) | H2D copy |
| 3 | all layers' indices into one flat int64 buffer | ``torch.cat`` |
| 4 | all value streams (already in their wire dtype) into the output | ``torch.cat(out=)`` |
| 5 | zero the bitmap scratch (one 32-bit-aligned word region per bitmap layer) | memset |
| 6 | ``_index_kernel``: per block of indices, check order and range (a per-layer error flag), set bitmap bits (``atomic_or``: bits of one word are distinct, so the order of the ors does not matter), write raw32 / raw64 bytes | Triton |
| 7 | ``_bitmap_copy_kernel``: the scratch words into the output, byte by byte (bitmap streams start at any byte offset) | Triton |
| 8-9 | CRC-32 of everything before the checksum, written into the last 4 bytes | Triton x2 (``codec_common.crc32_ranges``) |

Launches 5-7 are skipped when no layer needs them. The per-layer error flags come back as
a device tensor: the caller decides when to read them (``dgp_kernels.codec.encode`` reads
them once; the DDP hook folds them into its one flag read per step).
"""

from __future__ import annotations

import functools
import struct
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .codec_common import crc32_ranges, serialized

IMPLICIT, BITMAP, VARINT, RICE, RAW32, RAW64 = range(6)
DEVICE_CODINGS = (IMPLICIT, BITMAP, RAW32, RAW64)
RAW32_MAX_NUMEL = 1 << 32
INDEX_BLOCK = 1024  # indices per program of the index pass
COPY_BLOCK = 1024   # bitmap bytes per program of the copy pass
_HEADER = struct.Struct("<4sHHII")
_ENTRY = struct.Struct("<QQQBBBB")


def stream_nbytes(coding: int, numel: int, k: int) -> int:
    """Index stream length of a device coding (shape arithmetic only)."""
    if coding == IMPLICIT:
        return 0
    if coding == BITMAP:
        return (numel + 7) // 8
    if coding == RAW32:
        return 4 * k
    if coding == RAW64:
        return 8 * k
    raise ValueError(f"coding {coding} is not written on the device")


def choose_coding(numel: int, k: int, has_indices: bool, aligned: bool) -> int:
    """The smallest exact device coding (ties to the lowest id), as the CPU encoder's rule
    restricted to implicit, bitmap, raw32 and raw64: implicit when positions are implicit
    or ``k == numel``; else the smaller of bitmap ``ceil(numel/8)`` and raw32 ``4k``
    (raw32 only for ``numel <= 2^32``, raw64 ``8k`` otherwise)."""
    if not has_indices or aligned or k == numel:
        return IMPLICIT
    best, cost = BITMAP, (numel + 7) // 8
    for c in (RAW32, RAW64):
        if c == RAW32 and numel > RAW32_MAX_NUMEL:
            continue
        if stream_nbytes(c, numel, k) < cost:
            best, cost = c, stream_nbytes(c, numel, k)
    return best


@triton.jit
def _index_kernel(idx, lay, blk, err, scratch, out, BLOCK: tl.constexpr):
    # (the per-layer table loads every codec kernel starts with; the duplicate report pairs
    # their shape with codec_decode's)
    pid = tl.program_id(0)
    layer = tl.load(blk + 2 * pid)
    j0 = tl.load(blk + 2 * pid + 1)
    foff = tl.load(lay + 6 * layer)
    k = tl.load(lay + 6 * layer + 1)
    numel = tl.load(lay + 6 * layer + 2)
    coding = tl.load(lay + 6 * layer + 3)
    soff = tl.load(lay + 6 * layer + 4)
    wbase = tl.load(lay + 6 * layer + 5)
    j = j0 + tl.arange(0, BLOCK).to(tl.int64)
    m = j < k
    x = tl.load(idx + foff + j, mask=m, other=0)
    prev = tl.load(idx + foff + j - 1, mask=m & (j > 0), other=-1)
    bad = m & ((x <= prev) | (x >= numel))
    tl.atomic_or(err + layer, tl.max(bad.to(tl.int32), 0), sem="relaxed")
    ok = m & (bad == 0)
    bit = (tl.full((BLOCK,), 1, tl.int64) << (x & 31)).to(tl.int32)
    # (scalar conditions enter vector masks through tl.where: Triton 3.9's interpreter
    # rejects a vector mask and-ed with a scalar one)
    tl.atomic_or(scratch + wbase + (x >> 5), bit, mask=tl.where(coding == 1, ok, False), sem="relaxed")
    w = tl.where(coding == 5, 8, 4)
    for t in tl.static_range(8):
        byte = ((x >> (8 * t)) & 255).to(tl.uint8)
        if t < 4:
            raw = (coding == 4) | (coding == 5)
        else:
            raw = coding == 5
        tl.store(out + soff + w * j + t, byte, mask=tl.where(raw, m, False))


@triton.jit
def _bitmap_copy_kernel(scratch, lay, blk, out, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk + 2 * pid)
    i0 = tl.load(blk + 2 * pid + 1)
    nb = (tl.load(lay + 6 * layer + 2) + 7) // 8
    soff = tl.load(lay + 6 * layer + 4)
    wbase = tl.load(lay + 6 * layer + 5)
    i = i0 + tl.arange(0, BLOCK).to(tl.int64)
    m = i < nb
    word = tl.load(scratch + wbase + (i >> 2), mask=m, other=0).to(tl.int64)
    tl.store(out + soff + i, ((word >> (8 * (i & 3))) & 255).to(tl.uint8), mask=m)


class Layout:
    """Everything about one encoded payload that the shapes decide (cached)."""

    def __init__(self, numels: Tuple[int, ...], ks: Tuple[int, ...], vdtypes: Tuple[int, ...],
                 codings: Tuple[int, ...], aligned: bool, meta: bytes, num_meta: int):
        L = len(numels)
        vsize = [4 if d == 1 else 2 for d in vdtypes]
        nbytes = [stream_nbytes(c, n, k) for c, n, k in zip(codings, numels, ks)]
        parts = [_HEADER.pack(b"DGPW", 1, 1 if aligned else 0, L, num_meta), meta]
        for i in range(L):
            parts.append(_ENTRY.pack(numels[i], ks[i], nbytes[i], codings[i], vdtypes[i], 0, 0))
        self.prefix = b"".join(parts)
        pos = len(self.prefix)
        self.index_start = pos
        soff = []
        for nb in nbytes:
            soff.append(pos)
            pos += nb
        self.value_start = pos
        pos += sum(k * s for k, s in zip(ks, vsize))
        self.total = pos + 4
        rows, iblk, cblk, foff, words = [], [], [], 0, 0
        for i in range(L):
            c = codings[i]
            wb = words
            if c == BITMAP:
                words += (numels[i] + 31) // 32
                cblk += [x for s in range(0, nbytes[i], COPY_BLOCK) for x in (i, s)]
            if c in (BITMAP, RAW32, RAW64):
                iblk += [x for s in range(0, ks[i], INDEX_BLOCK) for x in (i, s)]
            rows += [foff, ks[i], numels[i], c, soff[i], wb]
            foff += ks[i] if c != IMPLICIT else 0
        self.index_layers = [i for i in range(L) if codings[i] != IMPLICIT]
        self.num_index_blocks = len(iblk) // 2
        self.num_copy_blocks = len(cblk) // 2
        self.words = words
        self.n_rows = len(rows)
        self.n_iblk = len(iblk)
        self.tables_host = torch.tensor(rows + iblk + cblk + [0, self.total - 4], dtype=torch.int64)
        self._dev = {}

    def device_tensors(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        key = str(device)
        t = self._dev.get(key)
        if t is None:
            prefix = torch.frombuffer(bytearray(self.prefix), dtype=torch.uint8).to(device)
            t = (prefix, self.tables_host.to(device))
            self._dev[key] = t
        return t


@functools.lru_cache(maxsize=32)
def layout(numels: Tuple[int, ...], ks: Tuple[int, ...], vdtypes: Tuple[int, ...],
           codings: Tuple[int, ...], aligned: bool, meta: bytes, num_meta: int) -> Layout:
    return Layout(numels, ks, vdtypes, codings, aligned, meta, num_meta)


@serialized
def encode_device(indices: Sequence[Optional[Tensor]], values: Sequence[Tensor], numels: Sequence[int],
                  vdtypes: Sequence[int], codings: Sequence[int], aligned: bool, meta: bytes,
                  num_meta: int) -> Tuple[Tensor, Tensor]:
    """Wire-format v1 bytes of one payload, on the values' device, with no host sync.

    ``indices[i]``: int64 ``[k_i]`` on the device (``None`` for implicit layers);
    ``values[i]``: ``[k_i]`` already in the wire dtype ``vdtypes[i]`` (1 float32,
    2 bfloat16, 3 float16); ``codings[i]`` one of :data:`DEVICE_CODINGS`, valid for the
    layer (the caller checked it). Returns ``(bytes uint8 [total], bad int32 [L])`` where
    ``bad[i] != 0`` means layer ``i``'s indices are not strictly increasing in
    ``[0, numel)`` (the bytes are then not a valid payload).
    """
    device = values[0].device if values else torch.device("cpu")
    L = len(numels)
    ks = tuple(int(v.numel()) for v in values)
    lay = layout(tuple(int(n) for n in numels), ks, tuple(int(d) for d in vdtypes),
                 tuple(int(c) for c in codings), bool(aligned), bytes(meta), int(num_meta))
    prefix, tables = lay.device_tensors(device)
    out = torch.empty(lay.total, dtype=torch.uint8, device=device)
    out[: len(lay.prefix)].copy_(prefix)
    err = torch.zeros(L, dtype=torch.int32, device=device)
    if lay.value_start < lay.total - 4:
        torch.cat([v.reshape(-1).view(torch.uint8) for v in values if v.numel()],
                  out=out[lay.value_start: lay.total - 4])
    rows = tables[: lay.n_rows]
    if lay.num_copy_blocks or lay.num_index_blocks:
        scratch = torch.zeros(max(lay.words, 1), dtype=torch.int32, device=device)
    if lay.num_index_blocks:
        flat = torch.cat([indices[i].reshape(-1) for i in lay.index_layers])
        iblk = tables[lay.n_rows: lay.n_rows + lay.n_iblk]
        _index_kernel[(lay.num_index_blocks,)](flat, rows, iblk, err, scratch, out, BLOCK=INDEX_BLOCK)
    if lay.num_copy_blocks:
        cblk = tables[lay.n_rows + lay.n_iblk: -2]
        _bitmap_copy_kernel[(lay.num_copy_blocks,)](scratch, rows, cblk, out, BLOCK=COPY_BLOCK)
    body = lay.total - 4
    crc = crc32_ranges(out, tables[-2:-1], tables[-1:], body)
    out[body:].copy_(crc.view(torch.uint8)[:4])  # int64 little-endian: the low 4 bytes are the u32
    return out, err
