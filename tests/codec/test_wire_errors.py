"""The strict decoder: each kind of malformed payload raises PayloadError saying what and
where, on both backends, and the accumulator stays bitwise untouched."""

from __future__ import annotations

import struct

import pytest
import torch

from dgp_kernels.codec import LayerPayload, PayloadError, SparsePayload, decode, decode_accumulate, encode

from ._helpers import (
    BACKENDS,
    ENTRY,
    HEADER,
    get_field,
    random_layer,
    recrc,
    set_field,
    stream_offsets,
    table_offset,
)

NUMELS = [64, 1000, 20, 13]


def _base(coding: str) -> bytes:
    """Four layers; layer 1 uses ``coding``; layer 3 has numel % 8 != 0."""
    layers = (random_layer(64, 64, 0), random_layer(1000, 37, 1), random_layer(20, 3, 2),
              random_layer(13, 5, 3))
    return encode(SparsePayload(layers, meta=(("q", 4),)), force_coding=[None, coding, "raw32", "bitmap"],
                  backend="python")


def _poke(data: bytes, off: int, fmt: str, value: int, fix_crc: bool = True) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return recrc(bytes(b)) if fix_crc else bytes(b)


def _with_k(data: bytes, layer: int, k: int) -> bytes:
    """Edit a layer's k *and* its value stream to match, so only the index stream disagrees."""
    vo = stream_offsets(data)[layer][1]
    vs = 4 if get_field(data, layer, "dtype") == 1 else 2
    old = get_field(data, layer, "k")
    vals = data[vo: vo + old * vs]
    vals = vals[: k * vs] if k <= old else vals + b"\0" * ((k - old) * vs)
    return set_field(data[:vo] + vals + data[vo + old * vs:], layer, "k", k)


def _cases():
    base = {c: _base(c) for c in ("bitmap", "varint", "rice", "raw32", "raw64")}
    d = base["raw32"]
    t = table_offset(d)
    so = stream_offsets(d)
    cases = {
        "empty": (b"", r"truncated: 0 bytes"),
        "truncated header": (d[:19], r"truncated: 19 bytes"),
        "truncated": (d[:-1], r"bad checksum"),
        "bad magic": (b"XGPW" + d[4:], r"bad magic at byte offset 0"),
        "version": (_poke(d, 4, "<H", 2), r"unsupported version 2 at byte offset 4"),
        "bad checksum": (_poke(d, len(d) - 4, "<I", 0, fix_crc=False) if d[-4:] != b"\0" * 4 else d[:-4] + b"\1\0\0\0",
                         r"bad checksum at byte offset %d" % (len(d) - 4)),
        "flipped value bit": (_poke(d, len(d) - 8, "<B", d[len(d) - 8] ^ 1, fix_crc=False), r"bad checksum"),
        "flags": (_poke(d, 6, "<H", 2), r"unknown flag bits 2 at byte offset 6"),
        "meta count": (_poke(d, 12, "<I", 1000), r"meta count 1000 at byte offset 12"),
        "meta key": (_poke(d, HEADER + 1, "<B", 0x20), r"meta entry 0 at byte offset 17: key byte 32"),
        "layer count big": (_poke(d, 8, "<I", 5000), r"layer count 5000 at byte offset 8"),
        "layer count small": (_poke(d, 8, "<I", 3), r"payload has 3 layers but the model expects 4"),
        "coding id": (set_field(d, 1, "coding", 9), r"layer 1 \(table entry at byte offset %d\): unknown index coding id 9" % (t + ENTRY)),
        "dtype id": (set_field(d, 2, "dtype", 0), r"layer 2 .*unknown value dtype id 0"),
        "dtype id 4": (set_field(d, 2, "dtype", 4), r"layer 2 .*unknown value dtype id 4"),
        "k > numel": (set_field(d, 2, "k", 21), r"layer 2 .*k = 21 exceeds numel = 20"),
        "numel huge": (set_field(d, 2, "numel", 1 << 63), r"layer 2 .*does not fit int64"),
        "numel mismatch": (set_field(d, 2, "numel", 21), r"layer 2 .*numel 21 but the model's layer 2 has 20"),
        "reserved": (set_field(d, 0, "reserved", 1), r"layer 0 .*reserved byte is 1"),
        "param on raw": (set_field(d, 2, "param", 3), r"layer 2 .*only the Rice coding"),
        "count vs stream": (set_field(d, 2, "k", 2), r"layer 2 .*raw32 stream is 12 bytes, k = 2 needs 8"),
        "nbytes vs table": (set_field(d, 2, "nbytes", 16), r"layer 2 .*raw32 stream is 16 bytes, k = 3 needs 12"),
        "nbytes vs length": (set_field(d, 1, "nbytes", get_field(d, 1, "nbytes") + 8), r"layer 1 .*raw32 stream is \d+ bytes, k = 37 needs 148"),
        "trailing garbage": (recrc(d[:-4] + b"\0" + d[-4:]), r"accounts for %d \(trailing garbage\)" % len(d)),
        "huge k": (set_field(d, 2, "k", (1 << 63) - 1), r"layer 2 .*exceeds numel|more bytes"),
        "implicit but sparse": (set_field(set_field(d, 2, "coding", 0), 2, "nbytes", 0), r"layer 2 .*implicit positions need k == numel"),
        "aligned flag with indices": (_poke(d, 6, "<H", 1), r"aligned payload but index coding"),
        # index content (raw32 layer 2: 3 indices at so[2][0])
        "index out of range": (_poke(d, so[2][0] + 8, "<I", 20), r"layer 2 \(byte offset %d\): index 20 >= numel 20" % (so[2][0] + 8)),
        "not increasing": (_poke(_poke(d, so[2][0], "<I", 15), so[2][0] + 4, "<I", 14),
                           r"layer 2 \(byte offset %d\): indices not strictly increasing at position 1" % (so[2][0] + 4)),
        "repeated": (_poke(d, so[2][0] + 4, "<I", struct.unpack_from("<I", d, so[2][0])[0]),
                     r"layer 2 .*not strictly increasing at position 1"),
        # bitmap (layer 3: numel 13 -> 2 bytes, 3 padding bits)
        "bitmap padding": (_poke(d, so[3][0] + 1, "<B", d[so[3][0] + 1] | 0x80), r"layer 3 .*bitmap padding bits beyond numel 13"),
        "bitmap popcount": (_with_k(d, 3, 4), r"layer 3 .*bitmap has 5 bits set but the layer table says k = 4|more than k"),
    }
    # non-finite values
    cases["nan value"] = (_poke(d, so[2][1], "<I", 0x7FC00000), r"layer 2 \(byte offset %d\): value 0 is not finite" % so[2][1])
    # varint layer 1
    v = base["varint"]
    vo = stream_offsets(v)[1][0]
    k1 = get_field(v, 1, "k")
    nb1 = get_field(v, 1, "nbytes")
    cases["varint leftover"] = (_with_k(v, 1, k1 - 1), r"layer 1 .*bytes left in the varint stream")
    cases["varint truncated"] = (_with_k(v, 1, k1 + 1), r"layer 1 .*truncated varint|cannot hold|more bytes")
    # a 2-byte varint rewritten as an overlong 0x80|x, 0x00 keeps nbytes if we steal a byte: build directly
    vb = bytearray(v)
    first = vb[vo]
    if first < 0x80 and vb[vo + 1] < 0x80:  # two 1-byte varints -> one overlong varint + shorter k
        vb[vo] = first | 0x80
        vb[vo + 1] = 0
        cases["varint overlong"] = (_with_k(recrc(bytes(vb)), 1, k1 - 1), r"layer 1 .*non-canonical \(overlong\) varint")
    cases["varint out of range"] = (_poke(v, vo + nb1 - 1, "<B", 0x7F), r"layer 1 .*index out of range")
    # rice layer 1
    r = base["rice"]
    ro = stream_offsets(r)[1][0]
    rk = get_field(r, 1, "k")
    cases["rice extra"] = (_with_k(r, 1, rk - 1), r"layer 1 .*(extra|padding|Rice stream|remainder|out of range)")
    cases["rice param"] = (set_field(r, 1, "param", 64), r"layer 1 .*Rice parameter 64 > 63")
    cases["rice truncated"] = (_with_k(r, 1, rk + 1), r"layer 1 .*(truncated|cannot hold|padding|Rice)")
    # raw64
    r64 = base["raw64"]
    o64 = stream_offsets(r64)[1][0]
    cases["raw64 huge index"] = (_poke(r64, o64, "<Q", (1 << 64) - 1), r"layer 1 .*index 18446744073709551615 >= numel 1000")
    return cases


CASES = _cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_malformed_payload_raises_payload_error(name, backend):
    data, pattern = CASES[name]
    with pytest.raises(PayloadError, match=pattern):
        decode(data, NUMELS, backend=backend)
    init = [torch.randn(n) for n in NUMELS]
    out = [t.clone() for t in init]
    good = _base("bitmap")
    rep = decode_accumulate([good, data, good], out, backend=backend)
    assert rep.accepted == (0, 2) and rep.rejected[0].client == 1
    want = [t.clone() for t in init]
    decode_accumulate([good, good], want, backend=backend)
    assert all(torch.equal(o.view(torch.int32), w.view(torch.int32)) for o, w in zip(out, want))
    out = [t.clone() for t in init]
    with pytest.raises(PayloadError, match="client 1"):
        decode_accumulate([good, data], out, backend=backend, strict=True)
    assert all(torch.equal(o.view(torch.int32), t.view(torch.int32)) for o, t in zip(out, init))


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_bases_decode(backend):
    for c in ("bitmap", "varint", "rice", "raw32", "raw64"):
        q = decode(_base(c), NUMELS, backend=backend)
        assert q.meta == (("q", 4),) and [l.numel for l in q.layers] == NUMELS


@pytest.mark.parametrize("backend", BACKENDS)
def test_payload_error_is_a_value_error(backend):
    with pytest.raises(ValueError):
        decode(b"DGPW", backend=backend)
    with pytest.raises(TypeError):
        decode("not bytes", backend=backend)
