"""Baselines: none, randk, dp, qsgd (topk is tested with dgp)."""

from __future__ import annotations

import math

import pytest
import torch

from dgp_kernels.compressor import QSGD_LEVELS_META, get_compressor
from dgp_kernels.ops import band_counts

from ._helpers import clone_all, make_grads

ALL_SHAPES_WITH_EMPTY = [(0,), (3, 0), (7,)]


def test_none_is_dense_and_exact():
    g = make_grads(0)
    c = get_compressor("none")
    p = c.compress(g)
    for x, layer in zip(g, p.layers):
        assert layer.indices is None and layer.k == layer.numel == x.numel()
        assert torch.equal(layer.values, x.reshape(-1))
    for x, y in zip(g, c.decompress(p, g)):
        assert torch.equal(x, y)
    p.layers[0].values.zero_()  # the payload never aliases the caller's gradient
    assert g[0].any()
    pb = get_compressor("none", value_dtype="bfloat16").compress(g)
    assert all(l.values.dtype == torch.bfloat16 for l in pb.layers)


def test_none_rejects_nan():
    with pytest.raises(ValueError, match=r"grads\[0\] contains NaN"):
        get_compressor("none").compress([torch.tensor([float("nan")])])


def test_randk_counts_positions_and_values():
    g = make_grads(1)
    c = get_compressor("randk", keep=0.25, seed=0)
    p1, p2 = c.compress(g), c.compress(g)
    for x, layer in zip(g, p1.layers):
        k = band_counts(x.numel(), 0.0, 0.25)[1]
        assert layer.k == k and layer.indices.numel() == k
        if k > 1:
            assert bool((layer.indices[1:] > layer.indices[:-1]).all())  # sorted, unique
        assert torch.equal(layer.values, x.reshape(-1)[layer.indices])
    big = [i for i, x in enumerate(g) if x.numel() > 100][0]
    assert not torch.equal(p1.layers[big].indices, p2.layers[big].indices)  # new draw per round
    q = get_compressor("randk", keep=0.25, seed=0).compress(g)
    assert torch.equal(q.layers[big].indices, p1.layers[big].indices)  # same seed, same draw
    assert not c.memory.initialized  # error feedback off by default


def test_randk_error_feedback_conserves():
    c = get_compressor("randk", seed=1, error_feedback=True, value_dtype="float16")
    for r in range(5):
        g = make_grads(r)
        old = clone_all(c.memory.peek()) if c.memory.initialized else [torch.zeros_like(x) for x in g]
        p = c.compress(g)
        for s, e, x, eo in zip(c.decompress(p, g), c.memory.peek(), g, old):
            assert torch.equal(s + e, x + eo)


def _norm(ts):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def test_dp_clipping_norm_respected():
    g = [t * 50 for t in make_grads(2)]
    assert _norm(g) > 10
    c = get_compressor("dp", clip=1.5, noise_multiplier=0.0, seed=0)
    out = c.decompress(c.compress(g), g)
    # float32 scaling of each entry: the norm is clip up to a few ulp.
    assert _norm(out) == pytest.approx(1.5, rel=1e-6)
    scale = 1.5 / _norm(g)
    for x, y in zip(g, out):
        torch.testing.assert_close(y, x * scale, rtol=1e-6, atol=0)
    small = [t * (0.5 / _norm(g)) for t in g]  # norm 0.5 < clip: passed through unchanged
    for x, y in zip(small, c.decompress(c.compress(small), small)):
        assert torch.equal(x, y)


def test_dp_noise_has_the_promised_std():
    n = 40_000
    c = get_compressor("dp", clip=2.0, noise_multiplier=0.5, seed=1)
    g = [torch.zeros(n)]
    y = c.decompress(c.compress(g), g)[0].double()
    # std 1.0: the sample std's own std is ~1/sqrt(2n) = 0.0035, so 3% is ~8 sigma.
    assert float(y.std()) == pytest.approx(1.0, rel=0.03)
    assert abs(float(y.mean())) < 5 / math.sqrt(n)


def test_dp_edge_cases():
    c = get_compressor("dp", seed=0)
    assert c.compress([]).layers == ()
    p = c.compress([torch.zeros(0), torch.zeros(3, 0), torch.ones(4)])
    assert [l.k for l in p.layers] == [0, 0, 4]
    with pytest.raises(ValueError, match=r"grads\[0\] contains NaN or inf"):
        c.compress([torch.tensor([float("inf")])])


def test_qsgd_values_on_the_grid_and_meta():
    s = 5
    g = make_grads(3)
    c = get_compressor("qsgd", levels=s, seed=0)
    p = c.compress(g)
    assert p.meta == ((QSGD_LEVELS_META, s),)
    for x, layer in zip(g, p.layers):
        assert layer.indices is None and layer.k == x.numel()
        assert layer.values.dtype == torch.float32
        if x.numel() == 0:
            continue
        norm = torch.linalg.vector_norm(x.float())
        level = layer.values / (norm / s)
        assert torch.allclose(level, level.round(), atol=1e-4)
        assert float(level.abs().max()) <= s + 1e-4
        nz = layer.values != 0
        assert torch.equal(torch.sign(layer.values[nz]), torch.sign(x.reshape(-1)[nz]))


def test_qsgd_unbiased():
    """Mean over N seeds approaches the input.

    Each value is ``(norm/s) * (floor(r) + Bernoulli(r - floor(r)))``, so its variance is at
    most ``(norm/s)^2 / 4`` and the mean of N independent draws has std at most
    ``norm / (2 s sqrt(N))``. A tolerance of 5 such stds per entry fails a correct
    implementation with probability < 64 * 6e-7 (and the test is seeded, so it is
    deterministic); a biased rounding (e.g. always down) is off by up to ``norm/s`` = 63
    such stds.
    """
    n, s, N = 64, 4, 1000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(n, dtype=torch.float64)
    for seed in range(N):
        acc += get_compressor("qsgd", levels=s, seed=seed).compress([x]).layers[0].values.double()
    mean = acc / N
    norm = float(torch.linalg.vector_norm(x))
    tol = 5 * norm / (2 * s * math.sqrt(N))
    assert float((mean - x.double()).abs().max()) < tol
    # Deterministic rounding (always down) would be caught:
    down = (x.abs() / norm * s).floor() * norm / s * torch.sign(x)
    assert float((down.double() - x.double()).abs().max()) > tol


def test_qsgd_zero_and_empty_layers():
    c = get_compressor("qsgd", seed=0)
    p = c.compress([torch.zeros(5), torch.zeros(0), torch.zeros(2, 0)])
    assert p.layers[0].values.tolist() == [0.0] * 5
    assert [l.k for l in p.layers] == [5, 0, 0]
    assert c.compress([]).layers == ()


@pytest.mark.parametrize("name", ["none", "randk", "dp", "qsgd", "topk", "dgp"])
def test_empty_list_and_zero_numel_layers(name):
    c = get_compressor(name)
    assert c.compress([]).layers == ()
    g = [torch.randn(s) for s in ALL_SHAPES_WITH_EMPTY]
    p = c.compress(g)
    assert [l.numel for l in p.layers] == [0, 0, 7]
    out = c.decompress(p, g)
    assert [tuple(t.shape) for t in out] == [(0,), (3, 0), (7,)]
