"""Shared builders for the codec tests and benchmarks (bench/bench_codec.py imports these)."""

from __future__ import annotations

import struct
import zlib
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

import dgp_kernels
from dgp_kernels.codec import LayerPayload, SparsePayload
from dgp_kernels.codec import wire

BACKENDS = [
    "python",
    pytest.param("cpp", marks=pytest.mark.skipif(not wire.cpp_available(),
                                                 reason="dgp_kernels._C (C++ codec kernels) not built")),
]
CODINGS = wire.CODING_NAMES  # implicit bitmap varint rice raw32 raw64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADER, ENTRY, CRC = 16, 28, 4


def resnet18_cifar_shapes() -> List[Tuple[int, ...]]:
    """The 62 parameter shapes of the CIFAR ResNet-18 (11,173,962 entries), in model order.

    Hardcoded (not imported from dgp_kernels.sim) so the codec tests stand alone;
    test_wire.py checks it against ``dgp_kernels.cases.models.resnet18_cifar`` when present.
    """
    shapes: List[Tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(planes, cin, 3, 3), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,)]
            if s != 1 or cin != planes:
                shapes += [(planes, cin, 1, 1), (planes,), (planes,)]
            cin = planes
    shapes += [(10, 512), (10,)]
    return shapes


def random_grads(shapes: Sequence[Tuple[int, ...]], seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def dgp_payload(grads: Sequence[torch.Tensor], top: float = 0.05, keep: float = 0.20) -> SparsePayload:
    """The DGP band of every tensor (dgp_kernels.select_multi) as a payload."""
    idx, val, off = dgp_kernels.select_multi(list(grads), top, keep)
    o = off.tolist()
    return SparsePayload(layers=tuple(
        LayerPayload(int(g.numel()), idx[a:b], val[a:b]) for g, a, b in zip(grads, o[:-1], o[1:])))


def random_layer(numel: int, k: int, seed: int, dtype=torch.float32) -> LayerPayload:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(numel, generator=g)[:k].sort().values if k < numel else torch.arange(numel)
    return LayerPayload(numel, idx, torch.randn(k, generator=g).to(dtype))


def adversarial_layers() -> List[LayerPayload]:
    """Edge cases: empty, k=0, all kept, one kept (first/last), numel % 8 != 0, large."""
    L = []
    L.append(LayerPayload(0, torch.empty(0, dtype=torch.int64), torch.empty(0)))             # empty
    L.append(LayerPayload(13, torch.empty(0, dtype=torch.int64), torch.empty(0)))            # k = 0
    L.append(LayerPayload(13, torch.arange(13), torch.randn(13)))                              # all kept
    L.append(LayerPayload(13, torch.tensor([0]), torch.randn(1)))                              # first only
    L.append(LayerPayload(13, torch.tensor([12]), torch.randn(1)))                             # last only
    L.append(LayerPayload(1, torch.tensor([0]), torch.randn(1)))                               # numel 1
    L.append(LayerPayload(1003, torch.tensor([0, 1002]), torch.randn(2)))                      # first + last
    L.append(random_layer(8 * 37 + 5, 90, seed=1))                                             # 30 %, n%8=5
    L.append(LayerPayload(77, torch.arange(10, 60), torch.randn(50)))                         # one run
    L.append(random_layer(1_000_003, 200_000, seed=2))                                         # ~1e6, 20 %
    L.append(random_layer(1_000_000, 700, seed=3))                                             # sparse
    L.append(LayerPayload(1_000_000, torch.tensor([0, 999_999]), torch.randn(2)))             # huge gap
    L.append(LayerPayload(300, None, torch.randn(300)))                                        # dense, implicit
    return L


def valid_codings(layer: LayerPayload) -> List[str]:
    """The codings that can represent ``layer`` exactly."""
    if layer.indices is None:
        return ["implicit"]
    out = ["bitmap", "varint", "rice", "raw32", "raw64"]
    if layer.k == layer.numel:
        out.insert(0, "implicit")
    return out


def dense_of(layer: LayerPayload, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 dense tensor of one layer (positions: an aligned layer's broadcast indices)."""
    out = torch.zeros(layer.numel)
    idx = layer.indices if layer.indices is not None else positions
    if idx is None:
        idx = torch.arange(layer.numel)
    out[idx] = layer.values.float()
    return out


def recrc(data: bytes) -> bytes:
    """Recompute the checksum so a mutated payload reaches the structural checks."""
    body = bytes(data[:-CRC]) if len(data) >= CRC else b""
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def table_offset(data: bytes) -> int:
    """Byte offset of the layer table (after the header and the meta entries)."""
    num_meta = struct.unpack_from("<I", data, 12)[0]
    pos = HEADER
    for _ in range(num_meta):
        pos += 1 + data[pos] + 8
    return pos


_FIELDS = {"numel": (0, "<Q"), "k": (8, "<Q"), "nbytes": (16, "<Q"), "coding": (24, "<B"),
           "dtype": (25, "<B"), "param": (26, "<B"), "reserved": (27, "<B")}


def get_field(data: bytes, layer: int, name: str) -> int:
    off, fmt = _FIELDS[name]
    return struct.unpack_from(fmt, data, table_offset(data) + ENTRY * layer + off)[0]


def set_field(data: bytes, layer: int, name: str, value: int, fix_crc: bool = True) -> bytes:
    off, fmt = _FIELDS[name]
    b = bytearray(data)
    struct.pack_into(fmt, b, table_offset(data) + ENTRY * layer + off, value)
    return recrc(bytes(b)) if fix_crc else bytes(b)


def stream_offsets(data: bytes) -> List[Tuple[int, int]]:
    """(index stream offset, value stream offset) of every layer."""
    L = struct.unpack_from("<I", data, 8)[0]
    t = table_offset(data)
    pos = t + ENTRY * L
    idx_off = []
    for i in range(L):
        idx_off.append(pos)
        pos += get_field(data, i, "nbytes")
    out = []
    for i in range(L):
        out.append((idx_off[i], pos))
        pos += get_field(data, i, "k") * (4 if get_field(data, i, "dtype") == 1 else 2)
    return out
