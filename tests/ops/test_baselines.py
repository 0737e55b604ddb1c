"""The authors' operator (a benchmark baseline) agrees with our reference on tie-free inputs."""

import pytest
import torch

from dgp_kernels.ops import band_counts, reference
from dgp_kernels.ops.baselines import authors_dgp, clone_all, single_topk

# Random shapes; randn floats have no ties (with overwhelming probability; checked below).
SHAPES = [(1,), (7,), (100,), (33, 17), (4, 3, 5, 5), (1000,), (64, 3, 3, 3)]
FRACTIONS = [(0.05, 0.20), (0.0, 0.3), (0.1, 0.0), (0.3, 0.7), (0.0, 1.0)]


def _grads(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    gs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    for g in gs:
        assert g.abs().unique().numel() == g.numel(), "input has ties; pick another seed"
    return gs


@pytest.mark.parametrize("top,keep", FRACTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_authors_equals_reference_no_ef(top, keep, dtype):
    gs = _grads(1, dtype)
    before = [g.clone() for g in gs]
    outs = authors_dgp(gs, None, top, keep)
    for g, g0, out in zip(gs, before, outs):
        assert torch.equal(g, g0)  # input not modified
        assert out.shape == g.shape and out.dtype == g.dtype
        ref = reference.prune(g, top, keep)
        assert torch.equal(out, ref)  # values equal (authors write -0.0 where ref has +0.0)
        idx, val = reference.select(g, top, keep)
        assert torch.equal(out.flatten().nonzero().flatten(), idx)
        assert torch.equal(out.flatten()[idx], val)


@pytest.mark.parametrize("top,keep", FRACTIONS)
def test_authors_equals_reference_with_ef(top, keep):
    gs = _grads(2)
    gen = torch.Generator().manual_seed(3)
    res0 = [torch.randn(g.shape, generator=gen) * 0.5 for g in gs]
    res_a = [e.clone() for e in res0]
    res_r = [e.clone() for e in res0]
    for step in range(3):  # several rounds: the residual carries over
        outs = authors_dgp(gs, res_a, top, keep)
        for i, (g, out) in enumerate(zip(gs, outs)):
            v = g + res_r[i]
            assert v.abs().unique().numel() == v.numel()
            idx, val = reference.select_ef(g, res_r[i], top, keep)
            dense = torch.zeros(g.numel(), dtype=g.dtype)
            dense[idx] = val
            assert torch.equal(out.flatten(), dense), (step, i)
            assert torch.equal(res_a[i], res_r[i]), (step, i)


def test_authors_counts_are_the_authors():
    g = torch.randn(1000)
    out = authors_dgp([g])[0]
    k_top, k_keep = band_counts(1000, 0.05, 0.20)
    assert (k_top, k_keep) == (1000 // 20, 1000 // 5)
    assert int((out != 0).sum()) == k_keep
    # None of the k_top largest magnitudes is kept.
    top_idx = torch.topk(g.abs(), k_top).indices
    assert torch.all(out[top_idx] == 0)


def test_authors_residual_length_mismatch():
    with pytest.raises(ValueError, match="residuals has 1 tensors but gs has 2"):
        authors_dgp([torch.randn(3), torch.randn(4)], [torch.zeros(3)])


def test_single_topk_keeps_the_largest():
    gs = _grads(4)
    for g, (idx, val) in zip(gs, single_topk(gs, keep=0.2)):
        _, k = band_counts(g.numel(), 0.0, 0.2)
        assert idx.numel() == k
        assert torch.equal(val, g.flatten()[idx])
        # Same set as the reference band with top=0.
        ref_idx, _ = reference.select(g, 0.0, 0.2)
        assert torch.equal(torch.sort(idx).values, ref_idx)


def test_clone_all_copies():
    gs = _grads(5)
    cs = clone_all(gs)
    for g, c in zip(gs, cs):
        assert torch.equal(g, c) and c.data_ptr() != g.data_ptr()
