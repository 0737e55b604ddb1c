"""The device wire codec (kernels/triton/codec_*.py) against the C++ codec, byte for byte
(encode) and bit for bit (decode, accumulate, accept/reject).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py) through the forced ``backend="triton"``; the inputs stay small
(a call costs about a second there). On a GPU the same tests also run on CUDA tensors.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from dgp_kernels.codec import (  # noqa: E402
    LayerPayload,
    PayloadError,
    SparsePayload,
    decode,
    decode_accumulate,
    encode,
)
from dgp_kernels.codec import wire  # noqa: E402
from dgp_kernels.kernels.triton.codec_common import crc32_ranges  # noqa: E402
from dgp_kernels.kernels.triton.codec_encode import choose_coding  # noqa: E402

from ..codec._helpers import adversarial_layers, random_layer, recrc  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1",
)
CPU_BACKEND = "cpp" if wire.cpp_available() else "python"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_CODINGS = ["implicit", "bitmap", "raw32", "raw64"]


def _to(p: SparsePayload, device) -> SparsePayload:
    return SparsePayload(tuple(LayerPayload(l.numel, None if l.indices is None else l.indices.to(device),
                                            l.values.to(device)) for l in p.layers), p.aligned, p.meta)


def _device_names(p: SparsePayload):
    return [wire.CODING_NAMES[choose_coding(l.numel, l.k, l.indices is not None, p.aligned)] for l in p.layers]


def _small_layers():
    return [l for l in adversarial_layers() if l.numel < 5000]


def _bytes(t) -> bytes:
    return t.cpu().numpy().tobytes()


def _bits(ts):
    return [t.cpu().view(torch.int32).clone() for t in ts]


# ---- CRC -----------------------------------------------------------------------------
def test_crc32_of_many_ranges_matches_zlib():
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 256, (9000,), dtype=torch.uint8, generator=g)
    ranges = [(0, 4), (1, 5), (3, 20), (7, 4095), (0, 4096), (11, 4097), (100, 8900)]
    got = crc32_ranges(buf, torch.tensor([a for a, _ in ranges]), torch.tensor([b for _, b in ranges]), 8900)
    assert got.tolist() == [zlib.crc32(buf[a:a + b].numpy().tobytes()) for a, b in ranges]


# ---- encode --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_encode_bytes_equal_the_cpu_encoder_for_every_device_coding(device):
    other = random_layer(100, 30, 1)
    n = 0
    for layer in _small_layers():
        codings = [None] + [c for c in DEVICE_CODINGS
                            if layer.indices is not None and (c != "implicit" or layer.k == layer.numel)]
        for c in codings:
            n += 1
            for vd in ((None, "bfloat16", "float16")[n % 3],):
                p = SparsePayload((layer, other), meta=(("a", 3), ("bb", -1)))
                force = [c, None] if c else None
                got = encode(_to(p, device), vd, force_coding=force, backend="triton")
                assert isinstance(got, torch.Tensor) and got.device.type == device and got.dtype == torch.uint8
                want_codings = ([c] if c else _device_names(SparsePayload((layer,)))) + _device_names(SparsePayload((other,)))
                want = encode(p, vd, force_coding=want_codings, backend=CPU_BACKEND)
                assert _bytes(got) == want, (layer.numel, layer.k, c, vd)
    assert n > 20


def test_encode_aligned_empty_and_many_layers():
    al = SparsePayload((LayerPayload(20, None, torch.randn(4)), LayerPayload(0, None, torch.empty(0)),
                        LayerPayload(7, None, torch.randn(7))), aligned=True)
    assert _bytes(encode(al, backend="triton")) == encode(al, backend=CPU_BACKEND)
    empty = SparsePayload(())
    assert _bytes(encode(empty, backend="triton")) == encode(empty, backend=CPU_BACKEND)
    layers = tuple(random_layer(40 + i, (7 * i) % 40, i) for i in range(20))
    p = SparsePayload(layers)
    assert _bytes(encode(p, backend="triton")) == encode(p, force_coding=_device_names(p), backend=CPU_BACKEND)


def test_unforced_choice_is_the_smallest_device_coding():
    # bitmap costs ceil(n/8), raw32 4k: raw32 wins below k = n/32, ties go to bitmap (lower id)
    assert choose_coding(3200, 99, True, False) == wire.CODING_NAMES.index("raw32")
    assert choose_coding(3200, 100, True, False) == wire.CODING_NAMES.index("bitmap")
    assert choose_coding(3200, 3200, True, False) == wire.CODING_NAMES.index("implicit")
    assert choose_coding(3200, 5, False, True) == wire.CODING_NAMES.index("implicit")
    assert choose_coding((1 << 32) + 8, 10, True, False) == wire.CODING_NAMES.index("raw64")
    assert choose_coding((1 << 32) + 8, 1 << 28, True, False) == wire.CODING_NAMES.index("bitmap")
    # the chosen stream is never larger than the CPU encoder's bitmap/raw alternatives
    for layer in _small_layers():
        if layer.indices is None:
            continue
        dev = encode(SparsePayload((layer,)), backend="triton")
        for c in ("bitmap", "raw32", "raw64"):
            assert dev.numel() <= len(encode(SparsePayload((layer,)), force_coding=c, backend=CPU_BACKEND))


@pytest.mark.parametrize("bad_indices, match", [
    (torch.tensor([3, 2, 7]), "not strictly increasing at position 1"),
    (torch.tensor([1, 1, 7]), "not strictly increasing at position 1"),
    (torch.tensor([-1, 2, 7]), "not strictly increasing at position 0"),
    (torch.tensor([1, 2, 50]), "index 50 at position 2 >= numel 50"),
])
@pytest.mark.parametrize("coding", ["bitmap", "raw32", "raw64"])
def test_encode_rejects_bad_indices_with_the_cpu_message(bad_indices, match, coding):
    p = SparsePayload((random_layer(30, 4, 0), LayerPayload(50, bad_indices, torch.randn(3))))
    msgs = []
    for be in ("triton", CPU_BACKEND):
        with pytest.raises(PayloadError, match=match) as exc:
            encode(p, force_coding=coding, backend=be)
        msgs.append(str(exc.value))
    assert msgs[0] == msgs[1]


def test_encode_shape_errors_match_the_cpu_encoder():
    bad_k = SparsePayload((LayerPayload(3, torch.tensor([0, 1, 2, 2]), torch.randn(4)),))
    cases = [
        (bad_k, None, PayloadError),
        (SparsePayload((random_layer(50, 5, 0),)), "implicit", ValueError),
        (SparsePayload((LayerPayload(4, None, torch.randn(3)),)), None, PayloadError),
        (SparsePayload((LayerPayload((1 << 32) + 1, torch.tensor([5]), torch.randn(1)),)), "raw32", ValueError),
    ]
    for p, force, exc_type in cases:
        msgs = []
        for be in ("triton", CPU_BACKEND):
            with pytest.raises(exc_type) as exc:
                encode(p, force_coding=force, backend=be)
            msgs.append(str(exc.value))
        assert msgs[0] == msgs[1]
    with pytest.raises(ValueError, match="triton codec writes implicit, bitmap, raw32 or raw64"):
        encode(SparsePayload((random_layer(50, 5, 0),)), force_coding="rice", backend="triton")


# ---- decode and accumulate -------------------------------------------------------------
NUMELS = [100, 37, 64, 5, 0, 1500]


def _client(seed, codings, vd=None):
    ks = [30, 37, 3, 2, 0, 400]
    layers = tuple(random_layer(n, k, seed + i) for i, (n, k) in enumerate(zip(NUMELS, ks)))
    return encode(SparsePayload(layers), vd, force_coding=codings, backend=CPU_BACKEND)


def _clients():
    good = [
        _client(1, ["bitmap", "implicit", "raw32", "raw64", "bitmap", "bitmap"]),
        _client(2, ["raw32", "bitmap", "bitmap", "bitmap", "raw32", "raw64"], "bfloat16"),
        _client(3, ["bitmap", None, "raw64", "raw32", "raw64", "raw32"], "float16"),
    ]
    crc = bytearray(good[0])
    crc[-9] ^= 1
    nan = bytearray(good[0])
    nan[-8:-4] = b"\x00\x00\xc0\x7f"  # last value -> NaN, checksum recomputed
    return good[:2] + [bytes(crc), recrc(bytes(nan))] + good[2:]


@pytest.mark.parametrize("weighted", [False, True])
def test_accumulate_is_bit_identical_to_the_cpp_kernel_and_skips_rejected_clients(weighted):
    pays = _clients()
    w = [1.5, 0.25, 3.0, 1.0, -0.7] if weighted else None
    g = torch.Generator().manual_seed(5)
    init = [torch.randn(n, generator=g) for n in NUMELS]
    a, b = [t.clone() for t in init], [t.clone() for t in init]
    ra = decode_accumulate(pays, a, w, backend="triton")
    rb = decode_accumulate(pays, b, w, backend=CPU_BACKEND)
    assert ra == rb and ra.accepted == (0, 1, 4) and [r.client for r in ra.rejected] == [2, 3]
    assert all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b)))


def test_accumulate_flat_buffer_strict_and_all_or_nothing():
    pays = _clients()
    init = torch.randn(sum(NUMELS), generator=torch.Generator().manual_seed(6))
    a = init.clone()
    with pytest.raises(PayloadError, match="client 2: bad checksum") as e1:
        decode_accumulate(pays, a, numels=NUMELS, strict=True, backend="triton")
    with pytest.raises(PayloadError) as e2:
        decode_accumulate(pays, init.clone(), numels=NUMELS, strict=True, backend=CPU_BACKEND)
    assert str(e1.value) == str(e2.value)
    assert torch.equal(a.view(torch.int32), init.view(torch.int32))  # untouched
    good = [pays[0], pays[1], pays[4]]
    a, b = init.clone(), init.clone()
    decode_accumulate(good, a, numels=NUMELS, strict=True, backend="triton")
    decode_accumulate(good, b, numels=NUMELS, strict=True, backend=CPU_BACKEND)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_accumulate_non_contiguous_layer_buffers_are_copied_back():
    pays = [_clients()[0]]
    outs = [torch.zeros(n + 3)[:n] for n in NUMELS]  # separate storages
    want = [torch.zeros(n) for n in NUMELS]
    decode_accumulate(pays, outs, backend="triton")
    decode_accumulate(pays, want, backend=CPU_BACKEND)
    assert all(torch.equal(x, y) for x, y in zip(outs, want))


def test_accumulate_aligned_payloads_at_the_broadcast_positions():
    pos = [torch.tensor([2, 3, 9, 40]), torch.arange(5), torch.tensor([], dtype=torch.int64)]
    numels = [50, 5, 8]
    pays = [encode(SparsePayload((LayerPayload(50, None, torch.randn(4)), LayerPayload(5, None, torch.randn(5)),
                                  LayerPayload(8, None, torch.empty(0))), aligned=True), vd, backend=CPU_BACKEND)
            for vd in (None, "bfloat16")]
    wrong_k = encode(SparsePayload((LayerPayload(50, None, torch.randn(3)), LayerPayload(5, None, torch.randn(5)),
                                    LayerPayload(8, None, torch.empty(0))), aligned=True), backend=CPU_BACKEND)
    pays.append(wrong_k)
    a, b = [torch.ones(n) for n in numels], [torch.ones(n) for n in numels]
    ra = decode_accumulate(pays, a, [2.0, 0.5, 1.0], indices=pos, backend="triton")
    rb = decode_accumulate(pays, b, [2.0, 0.5, 1.0], indices=pos, backend=CPU_BACKEND)
    assert ra == rb and ra.accepted == (0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ra = decode_accumulate(pays[:1], [torch.ones(n) for n in numels], backend="triton")
    assert ra.accepted == () and "no aligned positions" in ra.rejected[0].reason
    with pytest.raises(ValueError, match="strictly increasing"):
        decode_accumulate(pays, a, indices=[torch.tensor([3, 2, 9, 40])] + pos[1:], backend="triton")


def test_accumulate_varint_and_rice_clients_go_to_the_host_path():
    layers = tuple(random_layer(n, min(n, 9), i) for i, n in enumerate(NUMELS))
    pays = [_clients()[0], encode(SparsePayload(layers), force_coding="rice", backend=CPU_BACKEND),
            encode(SparsePayload(layers), force_coding="varint", backend=CPU_BACKEND)]
    a, b = [torch.zeros(n) for n in NUMELS], [torch.zeros(n) for n in NUMELS]
    buf, starts, lens, max_len, _ = wire._pack_payloads(pays, torch.device("cpu"))
    flat = torch.zeros(sum(NUMELS))
    st = wire.accumulate_on_device(buf, starts, lens, max_len, flat, NUMELS).tolist()
    assert st == [0, 2, 2, 2 | 4] and not flat.any()  # nothing added: the host path takes over
    ra = decode_accumulate(pays, a, backend="triton")
    rb = decode_accumulate(pays, b, backend=CPU_BACKEND)
    assert ra == rb and ra.accepted == (0, 1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_decode_of_a_device_payload():
    for codings, vd in ((["bitmap", "implicit", "raw32", "raw64", "bitmap", "raw32"], "bfloat16"),
                        (["raw64", None, "bitmap", "bitmap", "raw64", "bitmap"], None)):
        d = _client(7, codings, vd)
        got = decode(torch.frombuffer(bytearray(d), dtype=torch.uint8), backend="triton")
        want = decode(d, backend=CPU_BACKEND)
        assert got.meta == want.meta and got.aligned == want.aligned
        for x, y in zip(got.layers, want.layers):
            assert x.numel == y.numel and x.values.dtype == y.values.dtype
            assert (x.indices is None) == (y.indices is None)
            if x.indices is not None:
                assert torch.equal(x.indices, y.indices)
            assert torch.equal(x.values.view(torch.uint8), y.values.view(torch.uint8))
    bad = bytearray(_client(7, "bitmap"))
    bad[-9] ^= 2
    msgs = []
    for be in ("triton", CPU_BACKEND):
        with pytest.raises(PayloadError) as exc:
            decode(torch.frombuffer(bytearray(bad), dtype=torch.uint8), NUMELS, backend=be)
        msgs.append(str(exc.value))
    assert msgs[0] == msgs[1] and "bad checksum" in msgs[0]


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        encode(SparsePayload((random_layer(10, 3, 0),)), backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        encode(SparsePayload(()), backend="cuda")


@pytest.mark.slow
def test_every_codec_kernel_compiles_for_sm90():
    """Triton's real compiler (no GPU needed): what the interpreter accepts must compile."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-m", "dgp_kernels.kernels.triton.codec_compile", "--arch", "90"],
                       env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in r.stdout + r.stderr and "not found" in r.stdout + r.stderr:
        pytest.skip("no ptxas in this triton install")
    assert r.returncode == 0 and "0 failures" in r.stdout, r.stdout + r.stderr


def test_resnet18_device_payload_size_from_the_shapes():
    """DGP defaults, float32 values: bitmap everywhere a layer is sparse, at most 0.232x the
    dense float32 bytes (the layout is shape arithmetic: no kernel runs)."""
    import math

    from dgp_kernels.kernels.triton.codec_encode import layout
    from dgp_kernels.ops.checks import band_counts

    from ..codec._helpers import resnet18_cifar_shapes

    numels = tuple(math.prod(s) for s in resnet18_cifar_shapes())
    ks = tuple(band_counts(n, 0.05, 0.2)[1] for n in numels)
    codings = tuple(choose_coding(n, k, True, False) for n, k in zip(numels, ks))
    assert set(codings) == {wire.CODING_NAMES.index("bitmap")}
    total = layout(numels, ks, (1,) * len(numels), codings, False, b"", 0).total
    assert total / (4 * sum(numels)) <= 0.232


@pytest.mark.cuda  # (not collected without a GPU)
def test_cuda_tensors_take_the_device_codec_by_default():
    pays = _clients()
    dev = [torch.frombuffer(bytearray(p), dtype=torch.uint8).cuda() for p in pays]
    init = [torch.randn(n, generator=torch.Generator().manual_seed(9)) for n in NUMELS]
    a = [t.cuda() for t in init]
    b = [t.clone() for t in init]
    ra = decode_accumulate(dev, a, [1.5, 0.25, 3.0, 1.0, -0.7])  # backend None: triton
    rb = decode_accumulate(pays, b, [1.5, 0.25, 3.0, 1.0, -0.7], backend=CPU_BACKEND)
    assert ra == rb
    assert all(torch.equal(x.cpu().view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))
    p = SparsePayload(tuple(random_layer(n, n // 5, i) for i, n in enumerate(NUMELS)))
    data = encode(_to(p, "cuda"))  # backend None: triton, bytes on the GPU
    assert data.is_cuda and _bytes(data) == encode(p, force_coding=_device_names(p), backend=CPU_BACKEND)
    q = decode(data, NUMELS)
    assert all(l.values.is_cuda for l in q.layers)


def test_accumulate_with_more_layers_than_one_parse_tile():
    """140 layers: the parser walks the table in tiles of 128 entries with running sums
    (empty layers keep the interpreter's grid small; the filled ones sit in both tiles)."""
    numels = [0] * 140
    for i, n in ((3, 40), (129, 17), (131, 9), (139, 33)):
        numels[i] = n
    layers = tuple(random_layer(n, n // 3, i) for i, n in enumerate(numels))
    good = encode(SparsePayload(layers), force_coding=["raw32" if i % 2 else "bitmap" for i in range(140)],
                  backend=CPU_BACKEND)
    from ..codec._helpers import get_field, set_field

    bad = set_field(good, 135, "nbytes", 1)  # a stream for an empty layer; checksum recomputed
    worse = set_field(good, 131, "k", get_field(good, 131, "k") + 1)
    a, b = [torch.ones(n) for n in numels], [torch.ones(n) for n in numels]
    ra = decode_accumulate([good, bad, worse, good], a, backend="triton")
    rb = decode_accumulate([good, bad, worse, good], b, backend=CPU_BACKEND)
    assert ra == rb and ra.accepted == (0, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
