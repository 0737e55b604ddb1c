"""breaching adapter on dicts shaped like breaching's ``shared_data`` (breaching itself
needs torchvision, which does not import here)."""

import pytest
import torch

from dgp_kernels import ops
from dgp_kernels.compressor import ADGPCompressor, Broadcaster, DGPCompressor
from dgp_kernels.integrations.breaching import compress_gradient_list, compress_shared_data


def _grads(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(12, 3, 3, 3, generator=g).to(dtype),
        torch.randn(12, generator=g).to(dtype),
        torch.randn(10, 768, generator=g).to(dtype),
        torch.randn(10, generator=g).to(dtype),
    )


def _shared(grads):
    labels = torch.tensor([3])
    return {
        "gradients": grads,
        "buffers": None,
        "metadata": {"num_data_points": 1, "labels": labels, "local_hyperparams": None},
    }


def test_dgp_band_per_parameter_through_the_wire():
    grads = _grads()
    sd = _shared(grads)
    out, info = compress_shared_data(sd, "dgp", {"top": 0.05, "keep": 0.2}, return_info=True)
    assert set(out) == set(sd) and out["metadata"] is sd["metadata"] and out["buffers"] is None
    assert isinstance(out["gradients"], tuple) and len(out["gradients"]) == len(grads)
    for g, d, m in zip(grads, out["gradients"], info.sent_masks[0]):
        assert d.shape == g.shape and d.dtype == g.dtype
        idx, vals = ops.select(g, 0.05, 0.2)  # the DGP band of this parameter alone
        want = torch.zeros(g.numel())
        want[idx] = vals
        assert torch.equal(d.reshape(-1), want)
        assert torch.equal(m.reshape(-1), want != 0)
    assert sd["gradients"] is grads and all(torch.equal(a, b) for a, b in zip(grads, _grads()))  # untouched
    assert info.dense_bytes == (4 * sum(g.numel() for g in grads),)
    assert 0.2 * info.dense_bytes[0] < info.payload_bytes[0] < 0.3 * info.dense_bytes[0]


def test_multi_query_layout_and_compressor_object_carry_error_feedback():
    q1, q2 = list(_grads(1)), list(_grads(2))
    sd = {"gradients": [q1, q2], "buffers": [[torch.ones(3)]], "num_data_points": 1, "labels": None}
    comp = DGPCompressor(top=0.05, keep=0.2)
    out = compress_shared_data(sd, comp, through_wire=False)
    assert isinstance(out["gradients"], list) and all(isinstance(q, list) for q in out["gradients"])
    assert out["buffers"] is sd["buffers"] and out["num_data_points"] == 1
    ref = DGPCompressor(top=0.05, keep=0.2)
    for q, got in zip((q1, q2), out["gradients"]):  # query 2 is round 2 of the same compressor
        want = ref.decompress(ref.compress(q), q)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert comp.rounds == 2


@pytest.mark.parametrize("name,params", [("topk", {"keep": 0.1}), ("randk", {"keep": 0.1, "seed": 0}),
                                         ("none", {}), ("dp", {"clip": 1.0, "noise_multiplier": 0.01, "seed": 0}),
                                         ("qsgd", {"levels": 4, "seed": 0})])
def test_every_sparse_compressor_by_name(name, params):
    grads = _grads(3, torch.float64)
    out = compress_shared_data(_shared(list(grads)), name, params)
    for g, d in zip(grads, out["gradients"]):
        assert d.shape == g.shape and d.dtype == torch.float64 and bool(torch.isfinite(d).all())
    if name in ("topk", "randk"):
        nz = sum(int((d != 0).sum()) for d in out["gradients"])
        assert nz == sum(int(0.1 * g.numel() + 1e-6) for g in grads)


def test_aligned_compressor_object_uses_its_positions():
    grads = list(_grads(4))
    pos = Broadcaster(0.05, 0.2).choose(list(_grads(5)))
    comp = ADGPCompressor()
    comp.set_positions(pos)
    out, info = compress_shared_data(_shared(grads), comp, return_info=True)
    for g, d, m, idx in zip(grads, out["gradients"], info.sent_masks[0], pos.indices):
        assert torch.equal(torch.nonzero(m.reshape(-1)).view(-1), idx)
        assert torch.equal(d.reshape(-1)[idx], g.reshape(-1)[idx])
        assert int((d != 0).sum()) <= idx.numel()


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="shared_data must be a dict"):
        compress_shared_data([torch.zeros(3)])
    with pytest.raises(ValueError, match="no 'gradients'"):
        compress_shared_data({"buffers": None})
    with pytest.raises(TypeError, match=r"shared_data\['gradients'\]"):
        compress_shared_data({"gradients": torch.zeros(3)})
    with pytest.raises(TypeError, match=r"shared_data\['gradients'\]"):
        compress_shared_data({"gradients": []})
    with pytest.raises(ValueError, match="unknown compressor"):
        compress_shared_data(_shared(_grads()), "nope")
    with pytest.raises(TypeError, match="has no parameter 'bogus'"):
        compress_shared_data(_shared(_grads()), "dgp", {"bogus": 1})
    with pytest.raises(ValueError, match="only for a compressor given by name"):
        compress_shared_data(_shared(_grads()), DGPCompressor(), {"top": 0.1})
    with pytest.raises(ValueError, match="adgp"):
        compress_shared_data(_shared(_grads()), "adgp")
    with pytest.raises(TypeError, match="compressor must be"):
        compress_shared_data(_shared(_grads()), 3)
    bad = list(_grads())
    bad[1] = bad[1].clone()
    bad[1][0] = float("nan")
    with pytest.raises(ValueError, match=r"\[1\] contains NaN"):
        compress_shared_data(_shared(bad))


def test_compress_gradient_list_returns_bytes_and_masks():
    grads = list(_grads(6))
    out, n, masks = compress_gradient_list(grads, DGPCompressor())
    assert n > 0 and len(out) == len(masks) == len(grads)
    for d, m in zip(out, masks):
        assert torch.equal(d != 0, m)
