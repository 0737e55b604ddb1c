"""Attack-side defenses: spec parsing, what the attacker receives, sent masks, real upload bytes."""

import pytest
import torch

from dgp_kernels.attacks.defenses import (
    DefenseSpec,
    apply_defense,
    check_gradients,
    parse_defense,
    sent_mask_from_payload,
)
from dgp_kernels.codec import encode
from dgp_kernels.ops import band_counts
from dgp_kernels.cases.models import lenet_sigmoid


@pytest.fixture(scope="module")
def model_and_grads():
    torch.manual_seed(0)
    model = lenet_sigmoid(image_size=8)
    x = torch.rand(1, 3, 8, 8)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([3]))
    grads = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    return model, grads


@pytest.mark.parametrize(
    "spec, label",
    [
        ("none", "none"),
        ("dgp", "dgp:top=0.05,keep=0.2"),
        (" DGP : keep=0.1 , top=0.02 ", "dgp:top=0.02,keep=0.1"),
        ("topk", "topk:keep=0.2"),
        ("topk:keep=0.3", "topk:keep=0.3"),
        ("randk:keep=0.5", "randk:keep=0.5"),
        ("dp:sigma=0.01", "dp:sigma=0.01"),
        ("dp:noise_multiplier=0.5,clip=2", "dp:noise_multiplier=0.5,clip=2"),
        ("qsgd:levels=8", "qsgd:levels=8"),
        ("none:value_dtype=bfloat16", "none:value_dtype=bfloat16"),
    ],
)
def test_parse_canonical_labels_round_trip(spec, label):
    s = parse_defense(spec)
    assert s.label == label
    assert parse_defense(s.label) == s
    assert parse_defense(s) is s


def test_spec_band_density_and_compressor_params():
    dgp = parse_defense("dgp:top=0.1,keep=0.3")
    assert dgp.band == (0.1, 0.3) and dgp.density == 0.3
    assert parse_defense("topk:keep=0.2").band == (0.0, 0.2)
    assert parse_defense("randk").band is None and parse_defense("none").density == 1.0
    # sigma without clip: a huge clip norm that never binds, noise std = sigma
    p = parse_defense("dp:sigma=0.01").compressor_params()
    assert p["clip"] >= 1e20 and p["clip"] * p["noise_multiplier"] == pytest.approx(0.01)
    p = parse_defense("dp:sigma=0.5,clip=2").compressor_params()
    assert p == {"clip": 2.0, "noise_multiplier": 0.25}


@pytest.mark.parametrize(
    "spec, exc, match",
    [
        ("foo", ValueError, "unknown defense 'foo'.*known defenses: none, dgp"),
        ("adgp:top_feedback=full", ValueError, "adgp has no parameter .top_feedback."),
        ("dgp:top=2", ValueError, "top must be in"),
        ("dgp:top=0.9,keep=0.2", ValueError, "top \\+ keep must be <= 1"),
        ("dgp:keep", ValueError, "param=value"),
        ("dgp:", ValueError, "nothing after"),
        ("dgp:keep=0.2,keep=0.3", ValueError, "given twice"),
        ("topk:top=0.1", ValueError, "topk has no parameter 'top'; its parameters are: keep"),
        ("dp", ValueError, "dp needs sigma"),
        ("dp:sigma=0.1,noise_multiplier=1", ValueError, "not both"),
        ("dp:sigma=-1", ValueError, "sigma must be >= 0"),
        ("dp:sigma=abc", ValueError, "sigma='abc' is not a number"),
        ("qsgd:levels=0", ValueError, "levels must be"),
        ("qsgd:levels=2.5", ValueError, "not an int"),
        ("none:value_dtype=int8", ValueError, "value_dtype"),
        ("dgp:keep=nan", ValueError, "finite"),
        (3, TypeError, "must be a str"),
    ],
)
def test_parse_errors_are_clear(spec, exc, match):
    with pytest.raises(exc, match=match):
        parse_defense(spec)


def test_none_is_exact_and_counts_real_bytes(model_and_grads):
    model, grads = model_and_grads
    d = apply_defense("none", grads, model=model)
    assert all(torch.equal(s, g) for s, g in zip(d.shared_grads, grads))
    assert all(bool(m.all()) for m in d.sent_mask)
    assert d.sent_fraction == 1.0 and d.band is None
    assert d.dense_bytes == 4 * sum(g.numel() for g in grads)
    assert d.upload_bytes == len(encode(d.payload))
    assert d.dense_bytes < d.upload_bytes < d.dense_bytes + 1024  # header, table, checksum


@pytest.mark.parametrize("spec", ["dgp", "dgp:top=0.1,keep=0.1", "topk:keep=0.2", "randk:keep=0.3"])
def test_sparse_defense_mask_matches_payload(model_and_grads, spec):
    model, grads = model_and_grads
    s = parse_defense(spec)
    d = apply_defense(s, grads, model=model, seed=1)
    top = s.band[0] if s.band else 0.0
    for i, (g, shared, mask, layer) in enumerate(zip(grads, d.shared_grads, d.sent_mask, d.payload.layers)):
        k_top, k_keep = band_counts(g.numel(), top, s.density)
        assert mask.dtype == torch.bool and mask.shape == g.shape
        assert int(mask.sum()) == k_keep == layer.k, i
        assert torch.equal(mask.flatten().nonzero().flatten(), layer.indices), i
        # sent values unchanged (float32 exact), the rest zero
        assert torch.equal(shared[mask], g[mask]) and not bool(shared[~mask].any()), i
        if s.band is not None and k_keep:
            # the k_top largest magnitudes are exactly the unsent ones above the band
            above = (g.abs() > g[mask].abs().max()) & ~mask
            assert int(above.sum()) == k_top, i
            below = g.abs()[~mask & ~above]
            assert below.numel() == 0 or float(below.max()) <= float(g[mask].abs().min()), i
    assert d.band == s.band
    assert d.upload_bytes == len(encode(d.payload)) < 0.4 * d.dense_bytes
    assert d.sent_fraction == pytest.approx(s.density, abs=0.02)


def test_dgp_has_no_error_feedback_and_leaves_grads_alone(model_and_grads):
    model, grads = model_and_grads
    before = [g.clone() for g in grads]
    a = apply_defense("dgp", grads, model=model)
    b = apply_defense("dgp", grads, model=model)  # a single-round operator: same output again
    assert all(torch.equal(x, y) for x, y in zip(a.shared_grads, b.shared_grads))
    assert all(torch.equal(x, y) for x, y in zip(grads, before))


def test_dp_noise_level_and_seed():
    g = [torch.zeros(20000), torch.zeros(100, 50)]
    d = apply_defense("dp:sigma=0.05", g, seed=3)
    noise = torch.cat([t.flatten() for t in d.shared_grads])
    assert float(noise.std()) == pytest.approx(0.05, rel=0.03)
    assert abs(float(noise.mean())) < 0.002
    assert all(bool(m.all()) for m in d.sent_mask)
    same = apply_defense("dp:sigma=0.05", g, seed=3)
    other = apply_defense("dp:sigma=0.05", g, seed=4)
    assert torch.equal(same.shared_grads[0], d.shared_grads[0])
    assert not torch.equal(other.shared_grads[0], d.shared_grads[0])
    # with a clip norm the update is clipped first: zero noise leaves a norm <= clip
    big = [torch.full((1000,), 1.0)]
    clipped = apply_defense("dp:sigma=0,clip=2", big)
    assert float(clipped.shared_grads[0].norm()) == pytest.approx(2.0, rel=1e-5)


def test_qsgd_is_dense_and_quantised(model_and_grads):
    model, grads = model_and_grads
    d = apply_defense("qsgd:levels=4", grads, model=model, seed=0)
    assert d.sent_fraction == 1.0
    for g, s in zip(grads, d.shared_grads):
        levels = (s.abs() / g.norm() * 4).flatten()
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # multiples of ||g|| / s


def test_mismatched_model_and_gradients(model_and_grads):
    model, grads = model_and_grads
    with pytest.raises(ValueError, match="has 9 tensors but the model has 8 trainable"):
        apply_defense("dgp", list(grads) + [torch.zeros(3)], model=model)
    bad = list(grads)
    bad[0] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(5, 5\) but model parameter 'body.0.weight'"):
        apply_defense("none", bad, model=model)
    with pytest.raises(TypeError, match="list of tensors"):
        check_gradients(torch.zeros(3))
    with pytest.raises(TypeError, match=r"grads\[1\] must be a torch.Tensor"):
        check_gradients([torch.zeros(1), "x"])
    with pytest.raises(ValueError, match="3 layers for 2 tensors"):
        sent_mask_from_payload(apply_defense("none", [torch.zeros(2)] * 3).payload, [torch.zeros(2)] * 2)


def test_defense_spec_is_hashable_and_printable():
    s = parse_defense("dgp")
    assert {s: 1}[DefenseSpec("dgp", s.params)] == 1
    assert str(s) == "dgp:top=0.05,keep=0.2"


def test_dgp_top_feedback_spec_single_round_unchanged_multi_round_differs():
    """top_feedback parses into the dgp spec (default label unchanged), changes nothing in
    one round (no error feedback), and with error feedback over rounds 'drop' sends top-band
    entries that 'full' never sends."""
    from dgp_kernels.attacks.multiround import multi_round_uploads

    assert parse_defense("dgp").label == "dgp:top=0.05,keep=0.2"
    spec = parse_defense("dgp:top_feedback=drop")
    assert spec.label == "dgp:top=0.05,keep=0.2,top_feedback=drop"
    with pytest.raises(ValueError, match="top_feedback"):
        parse_defense("dgp:top_feedback=bogus")
    torch.manual_seed(0)
    grads = [torch.randn(40, 30), torch.randn(30)]
    one = [apply_defense(s, grads).shared_grads for s in ("dgp", "dgp:top_feedback=drop")]
    for a, b in zip(*one):
        assert torch.equal(a, b)
    full = multi_round_uploads(grads, "dgp", 4)
    drop = multi_round_uploads(grads, "dgp:top_feedback=drop", 4)
    k_top = band_counts(1200, 0.05, 0.2)[0]
    top = grads[0].abs().flatten().topk(k_top).indices
    sent_top = lambda ups: int(torch.stack([u.sent_mask[0].flatten()[top] for u in ups]).any(0).sum())
    assert sent_top(full) == 0 and sent_top(drop) > 0
