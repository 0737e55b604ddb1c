"""Shared helpers of the compressor tests."""

from __future__ import annotations

from typing import List, Sequence

import torch

from dgp_kernels.codec.payload import SparsePayload

# Small, odd layer sizes (a ResNet-like mix in miniature): a conv weight, a bias, a single
# entry, an empty tensor, and a size where the count rule's 1e-6 matters (0.2 * 5 = 1).
SHAPES = [(16, 3, 3, 3), (16,), (1,), (0,), (5,), (10, 33)]


def make_grads(seed: int, shapes=SHAPES, dtype=torch.float32, scale: float = 1.0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j, s in enumerate(shapes):
        # Per-layer scales spread over 4 decades, plus a few exact ties and zeros.
        t = torch.randn(s, generator=gen, dtype=torch.float64) * (10.0 ** ((j % 4) - 2)) * scale
        flat = t.view(-1)
        if flat.numel() > 4:
            flat[:2] = 0.0
            flat[2] = flat[3]
        out.append(t.to(dtype))
    return out


def assert_payloads_equal(a: SparsePayload, b: SparsePayload) -> None:
    assert a.aligned == b.aligned
    assert a.meta == b.meta
    assert len(a.layers) == len(b.layers)
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        assert x.numel == y.numel, i
        assert (x.indices is None) == (y.indices is None), i
        if x.indices is not None:
            assert x.indices.dtype == torch.int64
            assert torch.equal(x.indices, y.indices), i
        assert x.values.dtype == y.values.dtype, i
        # Bitwise: compare the raw bits (so -0.0 vs 0.0 or NaN payloads would show).
        assert torch.equal(_bits(x.values), _bits(y.values)), i


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16)
    return t.contiguous().view(view)


def clone_all(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t.clone() for t in ts]
