"""Pure-Python (numpy + torch) implementation of the wire format v1: the fallback.

Used when the C++ extension ``dgp_kernels._C`` is not built, and by the tests, which force
both paths and demand identical bytes and identical accept/reject decisions. Every function
mirrors its C++ counterpart in ``csrc/cpu/codec_core.h`` (same names where possible); the
loops over elements are vectorised with numpy, the loops over layers are plain Python.

The byte layout is documented in ``dgp_kernels/codec/README.md``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .payload import PayloadError

MAGIC = b"DGPW"
VERSION = 1
FLAG_ALIGNED = 1
HEADER_BYTES = 16
LAYER_BYTES = 28
CRC_BYTES = 4
MAX_NUMEL = (1 << 63) - 1
MAX_PAYLOAD = 1 << 56
RAW32_MAX_NUMEL = 1 << 32
U64_MAX = (1 << 64) - 1

IMPLICIT, BITMAP, VARINT, RICE, RAW32, RAW64 = range(6)
NUM_CODINGS = 6
CODING_NAMES = ("implicit", "bitmap", "varint", "rice", "raw32", "raw64")

F32, BF16, F16 = 1, 2, 3
DTYPE_IDS = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}
ID_DTYPES = {v: k for k, v in DTYPE_IDS.items()}
VALUE_SIZE = {F32: 4, BF16: 2, F16: 2}

_HEADER = struct.Struct("<4sHHII")
_ENTRY = struct.Struct("<QQQBBBB")
_U64 = np.uint64


def _fail(*parts) -> "PayloadError":
    raise PayloadError("".join(str(p) for p in parts))


def crc32(data) -> int:
    """CRC-32 as zlib computes it (IEEE, reflected 0xEDB88320, init/xorout 0xFFFFFFFF)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def _ceil8(bits: int) -> int:
    return (bits + 7) // 8


def _rice_nbytes(k: int, r: int, sum_q: int) -> int:
    return _ceil8(k * r) + _ceil8(sum_q + k)


def _rice_r0(k: int, sum_d: int) -> int:
    if k == 0:
        return 0
    m = sum_d // k
    return 0 if m == 0 else m.bit_length() - 1


# ------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------
def parse_meta(meta: bytes, base_off: int, expect: int = -1) -> Tuple[int, List[Tuple[str, int]]]:
    """Entries of (u8 key_len 1..255, printable-ASCII key, i64 value). Returns (count, pairs)."""
    pos, out, n = 0, [], len(meta)
    while (pos < n) if expect < 0 else (len(out) < expect):
        i = len(out)
        if pos >= n:
            _fail("meta entry ", i, " at byte offset ", base_off + pos, ": truncated")
        kl = meta[pos]
        if kl == 0:
            _fail("meta entry ", i, " at byte offset ", base_off + pos, ": empty key")
        if n - pos - 1 < kl + 8:
            _fail("meta entry ", i, " at byte offset ", base_off + pos, ": truncated (needs ",
                  kl + 9, " bytes, ", n - pos, " left)")
        key = bytes(meta[pos + 1: pos + 1 + kl])
        for j, c in enumerate(key):
            if c < 0x21 or c > 0x7E:
                _fail("meta entry ", i, " at byte offset ", base_off + pos + 1 + j, ": key byte ",
                      c, " is not printable ASCII")
        (val,) = struct.unpack_from("<q", meta, pos + 1 + kl)
        out.append((key.decode("ascii"), val))
        pos += 1 + kl + 8
    return len(out), out


@dataclass
class _Plan:
    coding: int = IMPLICIT
    param: int = 0
    nbytes: int = 0
    gaps: Optional[np.ndarray] = None  # uint64 gap-minus-one, when indices are present


def plan_layer(numel: int, k: int, idx: Optional[np.ndarray], vdtype: int, forced: int,
               aligned: bool, layer: int) -> _Plan:
    """Mirror of ``plan_layer`` in codec_core.h: validate indices, pick the coding."""
    where = f"layer {layer}: "
    if numel > MAX_NUMEL:
        _fail(where, "numel ", numel, " does not fit int64")
    if k > numel:
        _fail(where, "k = ", k, " values for numel = ", numel)
    if vdtype not in VALUE_SIZE:
        _fail(where, "unknown value dtype id ", vdtype)
    if forced < -1 or forced >= NUM_CODINGS:
        raise ValueError(f"force_coding: {where}unknown coding id {forced}")
    if idx is None or aligned:
        if aligned and idx is not None:
            _fail(where, "an aligned payload carries no indices")
        if not aligned and k != numel:
            _fail(where, "indices missing but k = ", k, " != numel = ", numel,
                  " (only dense layers or aligned payloads have implicit positions)")
        if forced not in (-1, IMPLICIT):
            raise ValueError(f"force_coding: {where}implicit positions cannot be coded as coding {forced}")
        return _Plan()
    if k:
        diffs = np.diff(idx)
        bad = np.flatnonzero(diffs <= 0)
        if idx[0] < 0:
            _fail(where, "indices not strictly increasing at position 0 (-1 then ", int(idx[0]), ")")
        if bad.size:
            j = int(bad[0]) + 1
            _fail(where, "indices not strictly increasing at position ", j, " (", int(idx[j - 1]),
                  " then ", int(idx[j]), ")")
        if int(idx[-1]) >= numel:
            j = int(np.argmax(idx >= numel))
            _fail(where, "index ", int(idx[j]), " at position ", j, " >= numel ", numel)
        gaps = np.empty(k, dtype=_U64)
        gaps[0] = idx[0]
        gaps[1:] = (diffs - 1).astype(_U64)
        sum_d = int(idx[-1]) - (k - 1)
    else:
        gaps = np.empty(0, dtype=_U64)
        sum_d = 0
    plan = _Plan(gaps=gaps)
    if k == numel:
        if forced in (-1, IMPLICIT):
            return _Plan()
    elif forced == IMPLICIT:
        raise ValueError(f"force_coding: {where}implicit coding needs k == numel (k = {k}, numel = {numel})")
    r0 = _rice_r0(k, sum_d)
    rc = (max(r0 - 1, 0), r0, min(r0 + 1, 63))
    costs = [0] * NUM_CODINGS
    ok = [False, True, True, True, numel <= RAW32_MAX_NUMEL, True]
    costs[BITMAP] = _ceil8(numel)
    vbytes = k
    for j in range(1, 10):
        vbytes += int(np.count_nonzero(gaps >= _U64(1 << (7 * j))))
    costs[VARINT] = vbytes
    best_c, best_r = None, 0
    for r in rc:
        sq = int(np.sum(gaps >> _U64(r), dtype=_U64)) if k else 0
        c = _rice_nbytes(k, r, sq)
        if best_c is None or c < best_c:
            best_c, best_r = c, r
    costs[RICE] = best_c
    costs[RAW32] = 4 * k
    costs[RAW64] = 8 * k
    pick = forced
    if pick == -1:
        pick = BITMAP
        for c in range(BITMAP + 1, NUM_CODINGS):
            if ok[c] and costs[c] < costs[pick]:
                pick = c
    elif not ok[pick]:
        raise ValueError(f"force_coding: {where}raw32 coding needs numel <= 2^32, got {numel}")
    plan.coding, plan.nbytes = pick, costs[pick]
    plan.param = best_r if pick == RICE else 0
    return plan


def _pack_bits(bit_positions: np.ndarray, nbytes: int) -> bytes:
    bits = np.zeros(nbytes * 8, dtype=np.uint8)
    bits[bit_positions] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def write_indices(numel: int, idx: np.ndarray, plan: _Plan) -> bytes:
    k = idx.size if idx is not None else 0
    c = plan.coding
    if c == IMPLICIT:
        return b""
    if c == BITMAP:
        return _pack_bits(idx, plan.nbytes)
    gaps = plan.gaps
    if c == VARINT:
        nb = np.ones(k, dtype=np.int64)
        for j in range(1, 10):
            nb += gaps >= _U64(1 << (7 * j))
        starts = np.cumsum(nb) - nb
        out = np.zeros(plan.nbytes, dtype=np.uint8)
        for j in range(10):
            m = nb > j
            if not m.any():
                break
            byte = ((gaps[m] >> _U64(7 * j)) & _U64(0x7F)).astype(np.uint8)
            byte |= np.where(nb[m] > j + 1, 0x80, 0).astype(np.uint8)
            out[starts[m] + j] = byte
        return out.tobytes()
    if c == RICE:
        r = plan.param
        rem_bytes = _ceil8(k * r)
        if r:
            rem = gaps & _U64((1 << r) - 1)
            bits = ((rem[:, None] >> np.arange(r, dtype=_U64)[None, :]) & _U64(1)).astype(np.uint8)
            rem_stream = np.packbits(np.concatenate([bits.reshape(-1),
                                                     np.zeros(rem_bytes * 8 - k * r, np.uint8)]),
                                     bitorder="little").tobytes()
        else:
            rem_stream = b""
        q = (gaps >> _U64(r)).astype(np.int64)
        ones = np.cumsum(q + 1) - 1
        return rem_stream + _pack_bits(ones, plan.nbytes - rem_bytes)
    if c == RAW32:
        return idx.astype("<u4").tobytes()
    return idx.astype("<i8").tobytes()


def encode(indices: Sequence[Optional[np.ndarray]], values: Sequence[bytes], vdtypes: Sequence[int],
           ks: Sequence[int], numels: Sequence[int], codings: Sequence[int], aligned: bool,
           meta: bytes) -> bytes:
    """Whole payload; ``values[i]`` is layer i's value stream (already in the wire dtype)."""
    num_meta, _ = parse_meta(meta, HEADER_BYTES)
    plans = [plan_layer(numels[i], ks[i], indices[i], vdtypes[i], codings[i], aligned, i)
             for i in range(len(numels))]
    parts = [_HEADER.pack(MAGIC, VERSION, FLAG_ALIGNED if aligned else 0, len(numels), num_meta), meta]
    for i, p in enumerate(plans):
        parts.append(_ENTRY.pack(numels[i], ks[i], p.nbytes, p.coding, vdtypes[i], p.param, 0))
    for i, p in enumerate(plans):
        s = write_indices(numels[i], indices[i], p)
        assert len(s) == p.nbytes, (i, len(s), p.nbytes)  # internal invariant, not user input
        parts.append(s)
    parts.extend(values)
    body = b"".join(parts)
    return body + struct.pack("<I", crc32(body))


# ------------------------------------------------------------------------------------------
# Decoder
# ------------------------------------------------------------------------------------------
@dataclass
class Entry:
    numel: int
    k: int
    nbytes: int
    coding: int
    vdtype: int
    param: int
    index_off: int = 0
    value_off: int = 0


@dataclass
class Parsed:
    flags: int
    num_meta: int
    meta_off: int
    meta_len: int
    layers: List[Entry]

    @property
    def aligned(self) -> bool:
        return bool(self.flags & FLAG_ALIGNED)


def parse(d, expected: Optional[Sequence[int]]) -> Parsed:
    """Mirror of ``parse`` in codec_core.h (everything but index streams and values)."""
    n = len(d)
    if n < HEADER_BYTES + CRC_BYTES:
        _fail("truncated: ", n, " bytes, the header and checksum alone need ", HEADER_BYTES + CRC_BYTES)
    if n > MAX_PAYLOAD:
        _fail("payload of ", n, " bytes is too large")
    magic, version, flags, L, num_meta = _HEADER.unpack_from(d, 0)
    if magic != MAGIC:
        _fail("bad magic at byte offset 0 (not a dgp wire payload)")
    if version != VERSION:
        _fail("unsupported version ", version, " at byte offset 4 (this decoder reads version ", VERSION, ")")
    (stored,) = struct.unpack_from("<I", d, n - CRC_BYTES)
    actual = crc32(d[: n - CRC_BYTES])
    if stored != actual:
        _fail("bad checksum at byte offset ", n - CRC_BYTES, ": stored ", stored, ", computed ", actual,
              " (corrupted or truncated payload)")
    if flags & ~FLAG_ALIGNED:
        _fail("unknown flag bits ", flags, " at byte offset 6")
    aligned = bool(flags & FLAG_ALIGNED)
    body = n - CRC_BYTES
    pos = HEADER_BYTES
    if num_meta > (body - pos) // 10:
        _fail("meta count ", num_meta, " at byte offset 12 exceeds the payload length")
    q = pos
    for i in range(num_meta):
        if q >= body:
            _fail("meta entry ", i, " at byte offset ", q, ": truncated")
        kl = d[q]
        if kl + 9 > body - q:
            _fail("meta entry ", i, " at byte offset ", q, ": truncated")
        q += kl + 9
    parse_meta(d[pos:q], pos, num_meta)
    meta_off, meta_len, pos = pos, q - pos, q
    if L > (body - pos) // LAYER_BYTES:
        _fail("layer count ", L, " at byte offset 8 needs a ", L * LAYER_BYTES,
              "-byte layer table but only ", body - pos, " bytes follow the header")
    if expected is not None and L != len(expected):
        _fail("payload has ", L, " layers but the model expects ", len(expected))
    table_off = pos
    table_end = table_off + L * LAYER_BYTES
    room = body - table_end
    index_total = value_total = 0
    layers = []
    for i in range(L):
        off = table_off + i * LAYER_BYTES
        numel, k, nbytes, coding, vdtype, param, reserved = _ENTRY.unpack_from(d, off)
        at = f"layer {i} (table entry at byte offset {off}): "
        if numel > MAX_NUMEL:
            _fail(at, "numel ", numel, " does not fit int64")
        if k > numel:
            _fail(at, "k = ", k, " exceeds numel = ", numel)
        if coding >= NUM_CODINGS:
            _fail(at, "unknown index coding id ", coding)
        if vdtype not in VALUE_SIZE:
            _fail(at, "unknown value dtype id ", vdtype)
        if reserved != 0:
            _fail(at, "reserved byte is ", reserved, ", must be 0")
        if coding == RICE:
            if param > 63:
                _fail(at, "Rice parameter ", param, " > 63")
        elif param != 0:
            _fail(at, "parameter byte is ", param, " but only the Rice coding has one")
        if expected is not None and numel != expected[i]:
            _fail(at, "numel ", numel, " but the model's layer ", i, " has ", expected[i], " entries")
        if aligned and coding != IMPLICIT:
            _fail(at, "aligned payload but index coding ", coding, " (aligned layers carry no indices)")
        vs = VALUE_SIZE[vdtype]
        if k > room // vs:
            _fail(at, "k = ", k, " values need more bytes than the payload has")
        vbytes = k * vs
        if coding == IMPLICIT:
            if not aligned and k != numel:
                _fail(at, "implicit positions need k == numel (k = ", k, ", numel = ", numel, ")")
            if nbytes != 0:
                _fail(at, "implicit coding with a ", nbytes, "-byte index stream")
        elif coding == BITMAP:
            if nbytes != _ceil8(numel):
                _fail(at, "bitmap stream is ", nbytes, " bytes, numel ", numel, " needs ", _ceil8(numel))
        elif coding == VARINT:
            if nbytes < k:
                _fail(at, "varint stream of ", nbytes, " bytes cannot hold k = ", k)
        elif coding == RICE:
            if nbytes < _ceil8(k) or nbytes - _ceil8(k) < _ceil8(k * param):
                _fail(at, "Rice stream of ", nbytes, " bytes cannot hold k = ", k)
        elif coding == RAW32:
            if nbytes != 4 * k:
                _fail(at, "raw32 stream is ", nbytes, " bytes, k = ", k, " needs ", 4 * k)
        else:
            if k > room // 8 or nbytes != 8 * k:
                _fail(at, "raw64 stream is ", nbytes, " bytes, k = ", k, " needs 8k")
        if nbytes > room - index_total:
            _fail(at, "index streams need more bytes than the payload has")
        index_total += nbytes
        if vbytes > room - index_total - value_total:
            _fail(at, "value streams need more bytes than the payload has")
        value_total += vbytes
        layers.append(Entry(numel, k, nbytes, coding, vdtype, param))
    if index_total + value_total != room:
        _fail("payload is ", n, " bytes but its layer table accounts for ",
              n - (room - index_total - value_total), " (trailing garbage)")
    ipos, vpos = table_end, table_end + index_total
    for e in layers:
        e.index_off, e.value_off = ipos, vpos
        ipos += e.nbytes
        vpos += e.k * VALUE_SIZE[e.vdtype]
    return Parsed(flags, num_meta, meta_off, meta_len, layers)


def _prefix_indices(gaps: np.ndarray, numel: int, where) -> np.ndarray:
    """indices from gap-minus-one values; rejects anything reaching numel (overflow-safe)."""
    if gaps.size == 0:
        return np.empty(0, dtype=np.int64)
    if int(gaps.max()) >= numel:
        j = int(np.argmax(gaps >= _U64(numel)))
        _fail(where(0), "index out of range: gap ", int(gaps[j]), " at position ", j, " passes numel ", numel)
    s = np.cumsum(gaps + _U64(1), dtype=_U64)  # each term <= numel < 2^63: a wrap shows as a decrease
    if s.size > 1 and not bool(np.all(s[1:] > s[:-1])) or int(s[-1]) > numel:
        _fail(where(0), "index out of range: indices pass numel ", numel)
    return (s - _U64(1)).astype(np.int64)


def walk_indices(d, e: Entry, layer: int) -> Optional[np.ndarray]:
    """Validated int64 indices of one layer (None for implicit). Mirror of walk_indices<true>."""
    k, n, nb = e.k, e.numel, e.nbytes

    def where(off: int) -> str:
        return f"layer {layer} (byte offset {e.index_off + off}): "

    c = e.coding
    if c == IMPLICIT:
        return None
    s = np.frombuffer(d, dtype=np.uint8, count=nb, offset=e.index_off)
    if c == BITMAP:
        if n & 7 and int(s[-1]) >> (n & 7):
            _fail(where(nb - 1), "bitmap padding bits beyond numel ", n, " are set")
        idx = np.flatnonzero(np.unpackbits(s, bitorder="little", count=n)) if n else np.empty(0, np.int64)
        if idx.size != k:
            _fail(where(0), "bitmap has ", idx.size, " bits set but the layer table says k = ", k)
        return idx.astype(np.int64)
    if c == VARINT:
        ends = np.flatnonzero(s < 0x80)
        if ends.size < k:
            _fail(where(0), "truncated varint stream: ", ends.size, " complete varints, k = ", k)
        if ends.size > k or (k and ends[-1] != nb - 1) or (k == 0 and nb):
            last = int(ends[k - 1]) + 1 if k else 0
            _fail(where(last), nb - last, " bytes left in the varint stream after k = ", k, " indices")
        if k == 0:
            return np.empty(0, dtype=np.int64)
        lengths = np.diff(ends, prepend=-1)
        if int(lengths.max()) > 10:
            _fail(where(0), "varint overflows 64 bits")
        tenth = ends[lengths == 10]
        if tenth.size and int(s[tenth].max()) > 1:
            _fail(where(0), "varint overflows 64 bits")
        if bool(np.any((s[ends] == 0) & (lengths > 1))):
            _fail(where(0), "non-canonical (overlong) varint")
        starts = ends - lengths + 1
        pos_in = np.arange(nb, dtype=np.int64) - np.repeat(starts, lengths)
        contrib = (s & 0x7F).astype(_U64) << (pos_in * 7).astype(_U64)
        gaps = np.bitwise_or.reduceat(contrib, starts)
        return _prefix_indices(gaps, n, where)
    if c == RICE:
        r = e.param
        rem_bytes = _ceil8(k * r)
        if (k * r) & 7 and int(s[rem_bytes - 1]) >> ((k * r) & 7):
            _fail(where(rem_bytes - 1), "Rice remainder padding bits are set")
        ones = np.flatnonzero(np.unpackbits(s[rem_bytes:], bitorder="little"))
        if ones.size < k:
            _fail(where(rem_bytes), "truncated Rice stream: ", ones.size, " codes, k = ", k)
        if ones.size > k:
            _fail(where(rem_bytes), "Rice stream has extra bits after k = ", k, " codes")
        used = _ceil8(int(ones[-1]) + 1) if k else 0
        if used != nb - rem_bytes:
            _fail(where(rem_bytes + used), "Rice stream has ", nb - rem_bytes - used,
                  " extra bytes after k = ", k, " codes")
        if k == 0:
            return np.empty(0, dtype=np.int64)
        q = (np.diff(ones, prepend=-1) - 1).astype(_U64)
        if int(q.max()) > (U64_MAX >> r):
            _fail(where(rem_bytes), "Rice quotient overflows 64 bits")
        gaps = q << _U64(r)
        if r:
            bits = np.unpackbits(s[:rem_bytes], bitorder="little", count=k * r).reshape(k, r)
            gaps |= (bits.astype(_U64) << np.arange(r, dtype=_U64)[None, :]).sum(axis=1, dtype=_U64)
        return _prefix_indices(gaps, n, where)
    x = np.frombuffer(d, dtype="<u4" if c == RAW32 else "<u8", count=k, offset=e.index_off).astype(_U64)
    w = 4 if c == RAW32 else 8
    if k:
        big = np.flatnonzero(x >= _U64(n))
        dec = np.flatnonzero(x[1:] <= x[:-1]) + 1
        first_big = int(big[0]) if big.size else k
        first_dec = int(dec[0]) if dec.size else k
        if first_big < k and first_big <= first_dec:
            _fail(where(w * first_big), "index ", int(x[first_big]), " >= numel ", n)
        if first_dec < k:
            j = first_dec
            _fail(where(w * j), "indices not strictly increasing at position ", j, " (", int(x[j - 1]),
                  " then ", int(x[j]), ")")
    return x.astype(np.int64)


def check_values(d, e: Entry, layer: int) -> None:
    if e.vdtype == F32:
        v = np.frombuffer(d, dtype="<u4", count=e.k, offset=e.value_off)
        bad = np.flatnonzero((v & 0x7F800000) == 0x7F800000)
    else:
        m = 0x7F80 if e.vdtype == BF16 else 0x7C00
        v = np.frombuffer(d, dtype="<u2", count=e.k, offset=e.value_off)
        bad = np.flatnonzero((v & m) == m)
    if bad.size:
        j = int(bad[0])
        _fail("layer ", layer, " (byte offset ", e.value_off + j * VALUE_SIZE[e.vdtype], "): value ", j,
              " is not finite (NaN or inf)")


def values_tensor(d, e: Entry) -> torch.Tensor:
    """Layer values as a fresh tensor of the wire dtype."""
    nbytes = e.k * VALUE_SIZE[e.vdtype]
    raw = bytearray(d[e.value_off: e.value_off + nbytes])
    t = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return t.view(ID_DTYPES[e.vdtype])


def decode(d, expected: Optional[Sequence[int]], allow_nonfinite: bool):
    """(Parsed, [indices or None per layer]) after full validation."""
    P = parse(d, expected)
    idx = []
    for i, e in enumerate(P.layers):
        idx.append(walk_indices(d, e, i))
        if not allow_nonfinite:
            check_values(d, e, i)
    return P, idx


def validate(d, expected, aligned_ks: Optional[Sequence[int]], allow_nonfinite: bool):
    """Mirror of ``validate`` in codec.cpp. Returns (Parsed, indices per layer)."""
    P = parse(d, expected)
    out = []
    for i, e in enumerate(P.layers):
        if P.aligned:
            if aligned_ks is None:
                _fail("aligned payload, but the server passed no aligned positions (indices=) to place its values")
            if e.k != aligned_ks[i]:
                _fail("layer ", i, ": aligned payload has k = ", e.k,
                      " values but the broadcast positions number ", aligned_ks[i])
        out.append(walk_indices(d, e, i))
        if not allow_nonfinite:
            check_values(d, e, i)
    return P, out


def accumulate(payloads: Sequence, weights: Optional[Sequence[float]], out: Sequence[torch.Tensor],
               aligned_indices: Sequence[torch.Tensor], allow_nonfinite: bool,
               all_or_nothing: bool) -> List[int]:
    """Mirror of ``wire_accumulate``: validate every client, then add the accepted ones.

    ``out[l][x] = out[l][x] + v`` (or ``+ float32(w) * v``), one float32 rounding per add,
    clients in the order given: exactly the C++ kernel's arithmetic.
    """
    numels = [int(o.numel()) for o in out]
    aks = [int(a.numel()) for a in aligned_indices] if aligned_indices else None
    status, decoded = [], []
    for p in payloads:
        try:
            decoded.append(validate(p, numels, aks, allow_nonfinite))
            status.append(0)
        except PayloadError:
            decoded.append(None)
            status.append(1)
    if all_or_nothing and any(status):
        return status
    flat = [o.view(-1) for o in out]
    for c, (st, dec) in enumerate(zip(status, decoded)):
        if st:
            continue
        P, idxs = dec
        w32 = None if weights is None else torch.tensor(weights[c], dtype=torch.float32)
        for l, e in enumerate(P.layers):
            if e.k == 0:
                continue
            v = values_tensor(payloads[c], e).float()
            if w32 is not None:
                v = v * w32
            if idxs[l] is not None:
                flat[l].index_add_(0, torch.from_numpy(idxs[l]), v)
            elif P.aligned:
                flat[l].index_add_(0, aligned_indices[l], v)
            else:
                flat[l].add_(v)
    return status
