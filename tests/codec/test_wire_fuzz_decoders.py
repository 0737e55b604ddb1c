"""Three decoders, one verdict: mutants of valid payloads, each *with its checksum recomputed*
after the mutation (so the parser, not the CRC, has to catch it), fed to the C++ decoder,
the pure-Python decoder and the device decoder (Triton; the interpreter on CPU tensors).
For every mutant they must agree on accept/reject, and on the content of what they accept
(decoded indices and value bits, and the float32 sums of the accumulator).

A few hundred mutants go through C++ and Python; a subset (batched as the clients of one
device call per base payload, since the interpreter is slow) through the device decoder.
Mutants whose layer table names varint or Rice streams are left out of the device batch
(the device sends those to the host path, which the other tests cover).
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from typing import List

import pytest
import torch

from dgp_kernels.codec import LayerPayload, PayloadError, SparsePayload, decode, decode_accumulate, encode
from dgp_kernels.codec import wire

from ._helpers import ENTRY, get_field, random_layer, recrc, stream_offsets, table_offset

BACKENDS = ["python", "cpp"] if wire.cpp_available() else ["python"]
DEVICE_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
_BOUNDARY = [0, 1, 2, 3, 4, 5, 7, 8, 63, 64, 255, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
_FIELDS = [(0, "<Q"), (8, "<Q"), (16, "<Q"), (24, "<B"), (25, "<B"), (26, "<B"), (27, "<B")]


class Base:
    def __init__(self, name, payload, force=None, value_dtype=None, positions=None):
        self.name = name
        self.data = encode(payload, value_dtype, force_coding=force, backend="python")
        self.numels = [l.numel for l in payload.layers]
        self.positions = positions


def _bases() -> List[Base]:
    r = random_layer
    pos = [torch.tensor([2, 3, 9]), torch.arange(5)]
    return [
        Base("bitmap+implicit", SparsePayload((r(64, 64, 0), r(29, 11, 1), r(70, 20, 2)), meta=(("a", 1),)),
             force=[None, "bitmap", "bitmap"]),
        Base("raw32-bf16", SparsePayload((r(50, 6, 7), r(0, 0, 8), r(9, 2, 9))), force="raw32", value_dtype="bfloat16"),
        Base("raw64-f16", SparsePayload((r(33, 5, 9), r(12, 12, 3))), force="raw64", value_dtype="float16"),
        Base("aligned", SparsePayload((LayerPayload(10, None, torch.randn(3)), LayerPayload(5, None, torch.randn(5))),
                                      aligned=True), positions=pos),
        Base("rice+varint", SparsePayload((r(300, 30, 4), r(40, 3, 5))), force=["rice", "varint"]),
    ]


BASES = _bases()


def _mutants(base: Base, count: int, seed: int) -> List[bytes]:
    """``count`` distinct mutants of ``base.data``, every one re-checksummed."""
    rng = random.Random(seed)
    d = base.data
    L = struct.unpack_from("<I", d, 8)[0]
    t = table_offset(d)
    values = [(voff + j * (4 if get_field(d, i, "dtype") == 1 else 2))
              for i, (_, voff) in enumerate(stream_offsets(d)) for j in range(get_field(d, i, "k"))]
    out, seen = [], {d}
    while len(out) < count:
        kind = rng.randrange(6)
        b = bytearray(d[:-4])
        if kind == 5 and values:  # the lowest mantissa bit of one value: stays valid
            b[rng.choice(values)] ^= 1
        elif kind == 0:  # bit flips
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(b) * 8)
                b[i // 8] ^= 1 << (i % 8)
        elif kind == 1:  # one byte set to an interesting value
            b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif kind == 2 and L:  # a layer-table field set to a boundary value
            off, fmt = rng.choice(_FIELDS)
            width = struct.calcsize(fmt)
            v = rng.choice([x for x in _BOUNDARY if x < (1 << (8 * width))])
            struct.pack_into(fmt, b, t + ENTRY * rng.randrange(L) + off, v)
        elif kind == 3:  # truncated or extended
            b = b[: rng.randrange(len(b))] if rng.random() < 0.5 else b + bytes(rng.randrange(1, 9))
        else:  # inserted / deleted byte
            i = rng.randrange(len(b))
            if rng.random() < 0.5:
                del b[i]
            else:
                b.insert(i, rng.randrange(256))
        m = recrc(bytes(b) + b"\0\0\0\0")
        if m not in seen:
            seen.add(m)
            out.append(m)
    return out


def _decoded(data, numels, be):
    try:
        p = decode(data, numels, backend=be)
    except PayloadError as exc:
        assert str(exc)
        return None
    return (p.aligned, p.meta, [(l.numel, None if l.indices is None else l.indices.cpu().tolist(),
                                 l.values.dtype, l.values.cpu().view(torch.uint8).tolist()) for l in p.layers])


def _sums(pays, base, be):
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(n, generator=g) for n in base.numels]
    init = [o.clone() for o in out]
    rep = decode_accumulate(pays, out, indices=base.positions, backend=be)
    return rep.accepted, [o.view(torch.int32) for o in out], [i.view(torch.int32) for i in init]


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
def test_cpp_and_python_agree_on_every_recrc_mutant(base):
    muts = _mutants(base, 120, zlib.crc32(base.name.encode()))
    accepted = 0
    for m in muts:
        got = {be: _decoded(m, base.numels, be) for be in BACKENDS}
        assert len({g is None for g in got.values()}) == 1, f"accept/reject differs: {base.name} {m.hex()}"
        vals = list(got.values())
        assert all(v == vals[0] for v in vals[1:]), f"content differs: {base.name} {m.hex()}"
        accepted += vals[0] is not None
    res = [_sums(muts, base, be) for be in BACKENDS]
    for acc, out, _ in res[1:]:
        assert acc == res[0][0] and all(torch.equal(a, b) for a, b in zip(out, res[0][1]))
    # the mutants reach the structural checks: most are rejected by them, some stay valid
    assert accepted < len(muts)


def _device_codings_only(m: bytes) -> bool:
    head = wire._host_table(m, len(m))
    return head is None or all(row[3] not in (2, 3) for row in head[2])


@pytest.mark.skipif(not DEVICE_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("base", [b for b in BASES if b.name != "rice+varint"], ids=lambda b: b.name)
def test_device_decoder_agrees_with_cpp_and_python_on_recrc_mutants(base):
    muts = [m for m in _mutants(base, 60, zlib.crc32(base.name.encode())) if _device_codings_only(m)][:20]
    assert len(muts) >= 16
    # accumulate: all mutants as the clients of one device call, in order
    dev_acc, dev_out, init = _sums(muts, base, "triton")
    for be in BACKENDS:
        acc, out, _ = _sums(muts, base, be)
        assert dev_acc == acc, f"{be}: accepted {acc}, device {dev_acc}"
        assert all(torch.equal(a, b) for a, b in zip(dev_out, out))
    verdicts = [_decoded(m, base.numels, "python") for m in muts]
    want = tuple(i for i, v in enumerate(verdicts) if v is not None)
    if base.positions is None:  # aligned: k must also match the positions, decode does not know them
        assert dev_acc == want
    assert 0 < len(want) < len(muts) or base.name == "aligned"
    # decode: a few mutants one by one (accept/reject, and content when accepted)
    for m, v in list(zip(muts, verdicts))[:3]:
        assert _decoded(torch.frombuffer(bytearray(m), dtype=torch.uint8), base.numels, "triton") == v
