"""Wire format v1: round trips for every coding and value dtype on adversarial layers, both
backends byte-identical, automatic coding = smallest, CRC = zlib, decode-and-accumulate
semantics (order, weights, aligned positions, strict mode, flat buffers), sizes on ResNet-18."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

import dgp_kernels
from dgp_kernels.codec import (
    CODING_NAMES,
    LayerPayload,
    PayloadError,
    SparsePayload,
    decode,
    decode_accumulate,
    encode,
    payload_nbytes,
)
from dgp_kernels.codec import wire

from ._helpers import (
    BACKENDS,
    DTYPES,
    adversarial_layers,
    dense_of,
    dgp_payload,
    get_field,
    random_grads,
    random_layer,
    resnet18_cifar_shapes,
    valid_codings,
)

needs_cpp = pytest.mark.skipif(not wire.cpp_available(), reason="dgp_kernels._C (C++ codec kernels) not built")
LAYERS = adversarial_layers()


def _assert_layer_equal(got: LayerPayload, want: LayerPayload, dtype) -> None:
    assert got.numel == want.numel
    want_v = want.values.to(dtype)
    assert got.values.dtype == dtype
    assert torch.equal(got.values.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want_v.view(torch.int16 if dtype != torch.float32 else torch.int32))
    if got.indices is None:  # implicit: dense
        assert want.indices is None or torch.equal(want.indices, torch.arange(want.numel))
        assert want.k == want.numel
    else:
        assert got.indices.dtype == torch.int64
        assert torch.equal(got.indices, want.indices)


def _encode_both(payload, **kw) -> bytes:
    outs = {be: encode(payload, backend=be, **kw) for be in ("python", "cpp") if be == "python" or wire.cpp_available()}
    if len(outs) == 2:
        assert outs["python"] == outs["cpp"], "C++ and Python encoders disagree"
    return outs["python"]


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coding", CODING_NAMES)
def test_round_trip_forced_coding_every_layer(coding, dtype):
    """Every adversarial layer that ``coding`` can represent, forced, in one payload."""
    layers = [l for l in LAYERS if coding in valid_codings(l)]
    p = SparsePayload(layers=tuple(layers))
    data = _encode_both(p, value_dtype=dtype, force_coding=coding)
    for i in range(len(layers)):
        assert CODING_NAMES[get_field(data, i, "coding")] == coding
    for be in ("python", "cpp") if wire.cpp_available() else ("python",):
        q = decode(data, [l.numel for l in layers], backend=be)
        assert len(q.layers) == len(layers) and not q.aligned
        for got, want in zip(q.layers, layers):
            _assert_layer_equal(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_automatic_and_smallest(dtype):
    p = SparsePayload(layers=tuple(LAYERS), meta=(("levels", 7), ("neg", -(1 << 63))))
    data = _encode_both(p, value_dtype=dtype)
    for be in ("python", "cpp") if wire.cpp_available() else ("python",):
        q = decode(data, [l.numel for l in LAYERS], backend=be)
        assert q.meta == p.meta
        for got, want in zip(q.layers, LAYERS):
            _assert_layer_equal(got, want, dtype)
    # the automatic choice is the smallest exact coding of each layer (ties: lowest id)
    for i, layer in enumerate(LAYERS):
        sizes = {c: get_field(_encode_both(SparsePayload((layer,)), force_coding=c), 0, "nbytes")
                 for c in valid_codings(layer)}
        got = CODING_NAMES[get_field(data, i, "coding")]
        assert sizes[got] == min(sizes.values()), (i, got, sizes)
        assert got == min((s, CODING_NAMES.index(c)) for c, s in sizes.items())[1] or \
            sizes[got] == min(sizes.values())


def test_per_layer_force_and_choices():
    dense = random_layer(4096, 4096, seed=5)         # all kept -> implicit
    half = random_layer(4096, 2048, seed=6)          # 50 % -> bitmap
    sparse = random_layer(1 << 20, 300, seed=7)      # 0.03 % -> varint or rice
    p = SparsePayload((dense, half, sparse))
    data = _encode_both(p)
    assert [CODING_NAMES[get_field(data, i, "coding")] for i in range(3)][:2] == ["implicit", "bitmap"]
    assert CODING_NAMES[get_field(data, 2, "coding")] in ("varint", "rice")
    data = _encode_both(p, force_coding=[None, "raw64", "varint"])
    assert [CODING_NAMES[get_field(data, i, "coding")] for i in range(3)] == ["implicit", "raw64", "varint"]


def test_float64_values_become_float32_and_lossy_dtypes_round_to_nearest_even():
    v = torch.tensor([1.0 + 2 ** -9, 1.0 + 3 * 2 ** -9, 70000.0, -1e-30], dtype=torch.float64)
    layer = LayerPayload(4, None, v)
    q = decode(_encode_both(SparsePayload((layer,))))
    assert q.layers[0].values.dtype == torch.float32
    assert torch.equal(q.layers[0].values, v.float())
    qb = decode(_encode_both(SparsePayload((layer,)), value_dtype="bfloat16"))
    assert torch.equal(qb.layers[0].values, v.float().to(torch.bfloat16))  # RNE: ties to even
    assert qb.layers[0].values[0].item() == 1.0 and qb.layers[0].values[1].item() == 1.0 + 2 ** -7
    with pytest.raises(PayloadError, match="not finite"):  # float16 overflows to inf: rejected
        decode(_encode_both(SparsePayload((layer,)), value_dtype="float16"))
    qh = decode(_encode_both(SparsePayload((layer,)), value_dtype="float16"), allow_nonfinite=True)
    assert torch.isinf(qh.layers[0].values[2])


def test_crc_matches_zlib_for_every_alignment():
    for n in range(0, 12):  # meta keys of different lengths shift the body length mod 8
        p = SparsePayload((random_layer(50 + n, 9, seed=n),), meta=(("k" * (n + 1), n),))
        data = _encode_both(p)
        assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_aligned_payload_round_trip_and_accumulate():
    pos = [torch.tensor([1, 5, 6]), torch.tensor([], dtype=torch.int64), torch.arange(4)]
    numels = [10, 3, 4]
    clients = []
    for c in range(3):
        layers = tuple(LayerPayload(n, None, torch.randn(len(p))) for n, p in zip(numels, pos))
        clients.append(SparsePayload(layers, aligned=True))
    datas = [_encode_both(c) for c in clients]
    for get in ([get_field(d, i, "coding") for i in range(3)] for d in datas):
        assert get == [0, 0, 0]
    q = decode(datas[0], numels)
    assert q.aligned and all(l.indices is None for l in q.layers)
    for be in ("python", "cpp") if wire.cpp_available() else ("python",):
        out = [torch.zeros(n) for n in numels]
        rep = decode_accumulate(datas, out, indices=pos, backend=be)
        assert rep.accepted == (0, 1, 2)
        want = [torch.zeros(n) for n in numels]
        for c in clients:
            for w, l, p in zip(want, c.layers, pos):
                w[p] += l.values
        for o, w in zip(out, want):
            assert torch.equal(o, w)
        out2 = [torch.zeros(n) for n in numels]
        rep = decode_accumulate(datas, out2, backend=be)  # no positions: rejected, not guessed
        assert rep.accepted == () and "aligned" in rep.rejected[0].reason
        assert all(torch.equal(o, torch.zeros_like(o)) for o in out2)
        rep = decode_accumulate(datas, [torch.zeros(n) for n in numels],
                                indices=[pos[0][:2], pos[1], pos[2]], backend=be)
        assert rep.accepted == () and "broadcast positions" in rep.rejected[0].reason


def test_encode_rejects_invalid_content():
    bad = {
        "not strictly increasing": LayerPayload(10, torch.tensor([3, 2]), torch.randn(2)),
        "repeated": LayerPayload(10, torch.tensor([3, 3]), torch.randn(2)),
        "out of range": LayerPayload(10, torch.tensor([3, 10]), torch.randn(2)),
        "negative": LayerPayload(10, torch.tensor([-1, 3]), torch.randn(2)),
        "k > numel": LayerPayload(1, None, torch.randn(2)),
        "missing": LayerPayload(10, None, torch.randn(3)),
        "count": LayerPayload(10, torch.tensor([1, 2, 3]), torch.randn(2)),
    }
    for be in ("python", "cpp") if wire.cpp_available() else ("python",):
        for name, layer in bad.items():
            with pytest.raises(PayloadError):
                encode(SparsePayload((layer,)), backend=be)
        with pytest.raises(PayloadError, match="meta"):
            encode(SparsePayload((), meta=(("has space", 1),)), backend=be)
        with pytest.raises(PayloadError, match="meta"):
            encode(SparsePayload((), meta=(("big", 1 << 63),)), backend=be)
        with pytest.raises(ValueError, match="force_coding"):
            encode(SparsePayload((random_layer(10, 3, 0),)), force_coding="implicit", backend=be)
        with pytest.raises(ValueError, match="force_coding"):
            encode(SparsePayload((random_layer(10, 3, 0),)), force_coding="zstd", backend=be)
        with pytest.raises(TypeError, match="dtype"):
            encode(SparsePayload((LayerPayload(2, None, torch.ones(2, dtype=torch.int32)),)), backend=be)
        with pytest.raises(ValueError, match="value_dtype"):
            encode(SparsePayload(()), value_dtype="int8", backend=be)


def test_expected_numels_mismatch():
    data = _encode_both(SparsePayload((random_layer(10, 3, 0), random_layer(20, 3, 1))))
    for be in ("python", "cpp") if wire.cpp_available() else ("python",):
        assert len(decode(data, [10, 20], backend=be).layers) == 2
        with pytest.raises(PayloadError, match="2 layers but the model expects 3"):
            decode(data, [10, 20, 5], backend=be)
        with pytest.raises(PayloadError, match="layer 1 .*numel 20 but the model's layer 1 has 21"):
            decode(data, [10, 21], backend=be)


# ------------------------------------------------------------------- accumulation
def _clients(numels, n_clients, seed, dtype=torch.float32):
    out = []
    for c in range(n_clients):
        layers = []
        for i, n in enumerate(numels):
            k = [0, n // 5, n, 1][(c + i) % 4] if n else 0
            lay = random_layer(n, k, seed=seed + 100 * c + i, dtype=dtype)
            if k == n and c % 2:
                lay = LayerPayload(n, None, lay.values)
            layers.append(lay)
        out.append(SparsePayload(tuple(layers)))
    return out


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_matches_sequential_float32_sum(dtype, weighted):
    numels = [0, 13, 1000, 4099, 30000]
    clients = _clients(numels, 5, seed=11, dtype=dtype)
    datas = [_encode_both(c) for c in clients]
    weights = [0.5, 3.0, 1.0 / 3.0, 2.0 ** -20, 7.25] if weighted else None
    init = [torch.randn(n) for n in numels]
    want = [t.clone() for t in init]
    for c, cl in enumerate(clients):  # the contract: client order, one float32 rounding per op
        for w, l in zip(want, cl.layers):
            v = l.values.float()
            if weighted:
                v = v * torch.tensor(weights[c], dtype=torch.float32)
            w += dense_of(LayerPayload(l.numel, l.indices, v))  # adding +0.0 elsewhere is exact
    results = {}
    for be in ("python", "cpp") if wire.cpp_available() else ("python",):
        out = [t.clone() for t in init]
        rep = decode_accumulate(datas, out, weights, backend=be)
        assert rep.accepted == tuple(range(5)) and rep.all_accepted
        assert rep.weight_sum == (sum(weights) if weighted else 5.0)
        for o, w in zip(out, want):
            assert torch.equal(o.view(torch.int32), w.view(torch.int32))
        results[be] = out


@needs_cpp
def test_accumulate_bitwise_identical_across_threads_and_backends():
    numels = [s for s in (1 << 18, 70000, 3, 1 << 17)]
    datas = [_encode_both(c) for c in _clients(numels, 6, seed=3)]
    ref = None
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for be in ("cpp", "python"):
                out = [torch.zeros(n) for n in numels]
                decode_accumulate(datas, out, [1.5] * 6, backend=be)
                flat = torch.cat(out).view(torch.int32)
                if ref is None:
                    ref = flat
                assert torch.equal(flat, ref), (threads, be)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_rejects_and_reports_and_strict(backend):
    numels = [100, 7]
    good = [_encode_both(c) for c in _clients(numels, 3, seed=21)]
    other_model = _encode_both(_clients([100, 8], 1, seed=1)[0])
    corrupt = bytearray(good[1])
    corrupt[40] ^= 0x10
    payloads = [good[0], bytes(corrupt), other_model, good[2], b""]
    init = [torch.randn(n) for n in numels]
    out = [t.clone() for t in init]
    rep = decode_accumulate(payloads, out, backend=backend)
    assert rep.accepted == (0, 3)
    assert [r.client for r in rep.rejected] == [1, 2, 4]
    assert "checksum" in rep.rejected[0].reason
    assert "layer 1" in rep.rejected[1].reason and "numel 8" in rep.rejected[1].reason
    assert "truncated" in rep.rejected[2].reason
    want = [t.clone() for t in init]
    decode_accumulate([good[0], good[2]], want, backend=backend)
    assert all(torch.equal(o, w) for o, w in zip(out, want))
    # strict: raises naming the client, and nothing was added
    out = [t.clone() for t in init]
    with pytest.raises(PayloadError, match=r"client 1: bad checksum.*\(and 1 more rejected\)"):
        decode_accumulate(payloads[:4], out, backend=backend, strict=True)
    assert all(torch.equal(o, t) for o, t in zip(out, init))
    # flat buffer + numels gives the same sums as the list
    flat = torch.cat(init)
    rep = decode_accumulate(payloads, flat, numels=numels, backend=backend)
    assert rep.accepted == (0, 3) and torch.equal(flat, torch.cat(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_argument_errors(backend):
    data = _encode_both(_clients([10], 1, seed=0)[0])
    with pytest.raises(TypeError, match="float32"):
        decode_accumulate([data], [torch.zeros(10, dtype=torch.float64)], backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        decode_accumulate([data], [torch.zeros(20)[::2]], backend=backend)
    with pytest.raises(ValueError, match="weights"):
        decode_accumulate([data], [torch.zeros(10)], [1.0, 2.0], backend=backend)
    with pytest.raises(ValueError, match="finite"):
        decode_accumulate([data], [torch.zeros(10)], [float("nan")], backend=backend)
    with pytest.raises(ValueError, match="numels"):
        decode_accumulate([data], torch.zeros(10), backend=backend)
    with pytest.raises(TypeError, match="sequence"):
        decode_accumulate(data, [torch.zeros(10)], backend=backend)
    with pytest.raises(ValueError, match="strictly increasing"):
        decode_accumulate([data], [torch.zeros(10)], indices=[torch.tensor([3, 3])], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_values_rejected_unless_allowed(backend):
    p = SparsePayload((LayerPayload(4, torch.tensor([0, 2]), torch.tensor([1.0, float("nan")])),))
    data = encode(p, backend=backend)
    with pytest.raises(PayloadError, match=r"layer 0 \(byte offset \d+\): value 1 is not finite"):
        decode(data, backend=backend)
    out = [torch.zeros(4)]
    assert decode_accumulate([data], out, backend=backend).rejected[0].client == 0
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.isnan(decode(data, allow_nonfinite=True, backend=backend).layers[0].values[1])
    rep = decode_accumulate([data], out, allow_nonfinite=True, backend=backend)
    assert rep.all_accepted and torch.isnan(out[0][2])


# --------------------------------------------------------------------------- sizes
def test_resnet18_shapes_match_the_simulator_model():
    models = pytest.importorskip("dgp_kernels.cases.models")
    shapes = [tuple(p.shape) for p in models.resnet18_cifar().parameters()]
    assert shapes == resnet18_cifar_shapes()


def test_resnet18_dgp_payload_size_bars():
    shapes = resnet18_cifar_shapes()
    assert len(shapes) == 62 and sum(torch.Size(s).numel() for s in shapes) == 11_173_962
    grads = random_grads(shapes, seed=0)
    p = dgp_payload(grads)  # defaults: top 5 %, keep 20 %
    dense = 4 * sum(g.numel() for g in grads)
    f32 = payload_nbytes(p) / dense
    bf16 = payload_nbytes(p, "bfloat16") / dense
    assert f32 <= 0.235, f32
    assert bf16 <= 0.135, bf16
    # and exact: the float32 payload decodes to the selected band
    q = decode(encode(p), [g.numel() for g in grads])
    for got, want in zip(q.layers, p.layers):
        _assert_layer_equal(got, want, torch.float32)


def test_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        encode(SparsePayload(()), backend="gpu")
    assert wire.cpp_available() == (dgp_kernels.backend_info().cpu == "cpp")
