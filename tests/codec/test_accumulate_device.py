"""decode_accumulate into buffers on a GPU: payloads validated and decoded on the CPU, each
accepted client added on the device in order. The staged path is the same code for any
device, so it is checked bit for bit against the CPU kernels here on CPU buffers; the CUDA
test runs it through the public call when a GPU is present."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.codec import LayerPayload, SparsePayload, wire
from dgp_kernels.codec.wire import decode_accumulate, encode

from ._helpers import BACKENDS, random_layer

NUMELS = [1000, 37, 0, 64, 5000]


def _clients(seed: int, n: int = 5):
    """Sparse float32 / bfloat16 / float16 layers, a dense layer, an empty layer; one client
    corrupted (a flipped byte: CRC reject) and one with a NaN (rejected by default)."""
    g = torch.Generator().manual_seed(seed)
    datas = []
    for c in range(n):
        dt = [torch.float32, torch.bfloat16, torch.float16][c % 3]
        layers = (
            random_layer(NUMELS[0], 200, seed + c, dt),
            LayerPayload(NUMELS[1], None, torch.randn(NUMELS[1], generator=g).to(dt)),  # dense
            LayerPayload(0, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dt)),
            random_layer(NUMELS[3], 13, seed + 10 + c, dt),
            random_layer(NUMELS[4], 900, seed + 20 + c, dt),
        )
        datas.append(encode(SparsePayload(layers)))
    bad = bytearray(datas[1])
    bad[len(bad) // 2] ^= 0x40
    datas[1] = bytes(bad)
    v = torch.randn(10, generator=g)
    v[3] = float("nan")
    datas.append(encode(SparsePayload((
        LayerPayload(NUMELS[0], torch.arange(10), v),
        LayerPayload(NUMELS[1], None, torch.zeros(NUMELS[1])),
        LayerPayload(0, torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
        LayerPayload(NUMELS[3], torch.arange(3), torch.ones(3)),
        LayerPayload(NUMELS[4], torch.arange(2), torch.ones(2)),
    ))))
    return datas


def _bits(ts):
    return [t.view(torch.int32).clone() for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_staged_path_matches_the_cpu_kernels(backend, weighted):
    datas = _clients(3)
    w = [0.5, 3.0, 1.25, 7.0, 0.1, 2.0] if weighted else None
    start = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in NUMELS]
    want = [t.clone() for t in start]
    rep = decode_accumulate(datas, want, w, backend=backend)
    assert rep.accepted == (0, 2, 3, 4) and [r.client for r in rep.rejected] == [1, 5]
    got = [t.clone() for t in start]
    status = wire._accumulate_staged(datas, w, got, [], False, False, wire._resolve_backend(backend))
    assert status == [0, 1, 0, 0, 0, 1]
    assert all(torch.equal(a, b) for a, b in zip(_bits(got), _bits(want)))


def test_staged_path_aligned_and_strict():
    pos = [torch.tensor([1, 5, 6]), torch.tensor([], dtype=torch.int64), torch.arange(4)]
    numels = [10, 3, 4]
    g = torch.Generator().manual_seed(7)
    datas = [encode(SparsePayload(tuple(LayerPayload(n, None, torch.randn(len(p), generator=g))
                                        for n, p in zip(numels, pos)), aligned=True))
             for _ in range(3)]
    want = [torch.zeros(n) for n in numels]
    decode_accumulate(datas, want, [1.0, 2.0, 0.5], indices=pos)
    got = [torch.zeros(n) for n in numels]
    assert wire._accumulate_staged(datas, [1.0, 2.0, 0.5], got, pos, False, False, "python") == [0, 0, 0]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # no positions: every aligned payload rejected, nothing added
    got = [torch.zeros(n) for n in numels]
    assert wire._accumulate_staged(datas, None, got, [], False, False, "python") == [1, 1, 1]
    assert all(not t.any() for t in got)
    # strict: one bad client -> nothing added
    bad = bytearray(datas[2])
    bad[-1] ^= 1
    got = [torch.ones(n) for n in numels]
    status = wire._accumulate_staged(datas[:2] + [bytes(bad)], None, got, pos, False, True, "python")
    assert status == [0, 0, 1] and all(torch.equal(t, torch.ones_like(t)) for t in got)


def test_out_buffers_on_two_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        decode_accumulate([], [torch.zeros(3), torch.zeros(3, device="meta")])


@pytest.mark.cuda
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_buffers_match_cpu(weighted):
    datas = _clients(11)
    w = [0.5, 3.0, 1.25, 7.0, 0.1, 2.0] if weighted else None
    start = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in NUMELS]
    want = [t.clone() for t in start]
    rep_cpu = decode_accumulate(datas, want, w)
    got = [t.cuda() for t in start]
    rep = decode_accumulate(datas, got, w)
    assert rep.accepted == rep_cpu.accepted and rep.rejected == rep_cpu.rejected
    assert all(torch.equal(a.cpu().view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want))
    flat = torch.cat(start).cuda()  # one flat buffer + numels=
    decode_accumulate(datas, flat, w, numels=NUMELS)
    assert torch.equal(flat.cpu().view(torch.int32), torch.cat(want).view(torch.int32))
