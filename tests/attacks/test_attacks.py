"""Attacks: registry and argument checks, the iDLG label rule, each attack recovering an
image from an undefended gradient on a tiny model, adaptive attackers ignoring unsent
coordinates, the DGP band penalty, and exact Robbing-the-Fed recovery."""

from __future__ import annotations

import math

import pytest
import torch

import dgp_kernels
from dgp_kernels.attacks import (
    ThreatModel,
    available_attacks,
    compute_gradients,
    get_attack,
    infer_labels_idlg,
)
from dgp_kernels.attacks import metrics as M
from dgp_kernels.attacks.matching import GradientObjective
from dgp_kernels.attacks.rtf import ImprintBlock
from dgp_kernels.cases.models import convnet_small, lenet_sigmoid

from .conftest import smooth_images

SHAPE = (3, 8, 8)


def _case(model, label: int = 2, seed: int = 1):
    x = smooth_images(1, seed)
    y = torch.tensor([label])
    return x, y, compute_gradients(model, x, y)


def _leak(rec_images, x) -> float:
    """PSNR above the flat mean-colour floor, in dB."""
    return float(M.psnr(rec_images, x)[0] - M.floor_psnr(x)[0])


# --------------------------------------------------------------------------------------
# Registry, records, argument checks
# --------------------------------------------------------------------------------------
def test_registry_lists_every_attack():
    assert set(available_attacks()) >= {"dlg", "idlg", "ig", "dlg-adaptive", "ig-adaptive", "ig-dgp-aware", "rtf"}
    for name in available_attacks():
        assert get_attack(name).name == name


def test_unknown_attack_lists_names():
    with pytest.raises(ValueError, match="unknown attack 'nope'.*dlg"):
        get_attack("nope")


@pytest.mark.parametrize(
    "name, kw, exc",
    [
        ("dlg", {"iterations": 0}, ValueError),
        ("dlg", {"iterations": 1.5}, TypeError),
        ("dlg", {"lr": -1.0}, ValueError),
        ("dlg", {"labels": "guess"}, ValueError),
        ("dlg", {"line_search": "armijo"}, ValueError),
        ("idlg", {"labels": "optimise"}, ValueError),
        ("ig", {"tv_weight": float("nan")}, ValueError),
        ("ig", {"band_weight": 1.0}, ValueError),  # band penalty without the adaptive mask
        ("ig", {"signed": 1}, TypeError),
        ("ig", {"no_such_param": 1}, TypeError),
        ("rtf", {"num_bins": 1}, ValueError),
        ("rtf", {"calibration": torch.rand(3, 8)}, ValueError),
    ],
)
def test_bad_parameters(name, kw, exc):
    with pytest.raises(exc):
        get_attack(name, **kw)


def test_threat_model_checks(tiny_lenet):
    with pytest.raises(ValueError, match="image_shape"):
        ThreatModel(tiny_lenet, (8, 8), 4)
    with pytest.raises(ValueError, match="labels"):
        ThreatModel(tiny_lenet, SHAPE, 4, batch_size=2, labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="labels must lie"):
        ThreatModel(tiny_lenet, SHAPE, 4, labels=torch.tensor([7]))
    with pytest.raises(ValueError, match="sent_mask"):
        ThreatModel(tiny_lenet, SHAPE, 4, sent_mask=[torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="band"):
        ThreatModel(tiny_lenet, SHAPE, 4, band=(0.9, 0.2))
    with pytest.raises(TypeError, match="batch_size"):
        ThreatModel(tiny_lenet, SHAPE, 4, batch_size=1.0)


@pytest.mark.parametrize("name", ["dlg", "ig", "rtf"])
def test_mismatched_gradients_are_rejected(tiny_lenet, name):
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    attack = get_attack(name)
    with pytest.raises(ValueError, match="has 9 tensors but threat.model has 8 parameters|shared_grads has"):
        attack(grads + [torch.zeros(1)], threat)
    bad = list(grads)
    bad[0] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"shared_grads\[0\] has shape"):
        attack(bad, threat)
    bad[0] = torch.full_like(grads[0], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        attack(bad, threat)
    with pytest.raises(TypeError, match="list of tensors"):
        attack(grads[0], threat)


def test_image_shape_that_does_not_fit_the_model(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, (3, 16, 16), 4, labels=y)
    with pytest.raises(ValueError, match="image_shape"):
        get_attack("ig", iterations=1)(grads, threat)
    threat = ThreatModel(tiny_lenet, SHAPE, 5, labels=y)  # model has 4 outputs
    with pytest.raises(ValueError, match="num_classes"):
        get_attack("ig", iterations=1)(grads, threat)


# --------------------------------------------------------------------------------------
# iDLG label rule
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", [0, 1, 2, 3])
def test_idlg_rule_single_image(tiny_lenet, label):
    x, y, grads = _case(tiny_lenet, label=label, seed=label)
    threat = ThreatModel(tiny_lenet, SHAPE, 4)
    assert infer_labels_idlg(grads, threat).tolist() == [label]


def test_idlg_rule_batch_of_distinct_labels():
    torch.manual_seed(0)
    model = lenet_sigmoid(num_classes=10, channels=3, image_size=8)
    x = smooth_images(4, 5)
    y = torch.tensor([7, 0, 4, 2])
    grads = compute_gradients(model, x, y)
    labels = infer_labels_idlg(grads, ThreatModel(model, SHAPE, 10, batch_size=4))
    assert labels.dtype == torch.int64
    assert labels.tolist() == sorted(y.tolist())


def test_idlg_rule_batch_larger_than_classes_returns_batch_size_labels(tiny_lenet):
    x = smooth_images(6, 3)
    y = torch.tensor([0, 0, 0, 1, 1, 3])
    grads = compute_gradients(tiny_lenet, x, y)
    labels = infer_labels_idlg(grads, ThreatModel(tiny_lenet, SHAPE, 4, batch_size=6))
    assert labels.shape == (6,) and labels.dtype == torch.int64
    # with non-negative features a negative row sum proves the class is present, so the
    # rule never names an absent class (it may miss present ones when labels repeat)
    assert set(labels.tolist()) <= set(y.tolist())


# --------------------------------------------------------------------------------------
# Recovery from undefended gradients
# --------------------------------------------------------------------------------------
def test_dlg_known_label_recovers(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    rec = get_attack("dlg", iterations=30, tolerance=1e-10)(grads, ThreatModel(tiny_lenet, SHAPE, 4, labels=y))
    assert rec.images.shape == (1, *SHAPE) and rec.images.dtype == torch.float32
    assert rec.label_source == "known" and rec.labels.tolist() == [2]
    assert 0 <= float(rec.images.min()) and float(rec.images.max()) <= 1
    assert _leak(rec.images, x) > 25
    assert rec.losses[-1] < rec.losses[0] and rec.seconds > 0


def test_dlg_optimised_label_recovers(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    attack = get_attack("dlg", iterations=30, line_search="strong_wolfe", tolerance=1e-10)
    rec = attack(grads, ThreatModel(tiny_lenet, SHAPE, 4))
    assert rec.label_source == "optimised"
    assert rec.labels.tolist() == [2]
    assert _leak(rec.images, x) > 25


def test_idlg_infers_label_then_recovers(tiny_lenet):
    x, y, grads = _case(tiny_lenet, label=1)
    # iDLG ignores known labels: give it a wrong one to show it infers its own
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=torch.tensor([3]))
    rec = get_attack("idlg", iterations=30, tolerance=1e-10)(grads, threat)
    assert rec.label_source == "inferred" and rec.labels.tolist() == [1]
    assert _leak(rec.images, x) > 25


def test_inverting_gradients_recovers(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    rec = get_attack("ig", iterations=200, tv_weight=1e-4)(grads, ThreatModel(tiny_lenet, SHAPE, 4, labels=y))
    assert rec.label_source == "known"
    assert _leak(rec.images, x) > 10
    # unknown label: IG falls back to the iDLG rule; restarts run and return one batch
    rec2 = get_attack("ig", iterations=20, tv_weight=1e-4, restarts=2)(grads, ThreatModel(tiny_lenet, SHAPE, 4))
    assert rec2.label_source == "inferred" and rec2.labels.tolist() == [2]
    assert rec2.images.shape == (1, *SHAPE)


def test_attacks_are_deterministic_per_seed(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    attack = get_attack("ig", iterations=5)
    a, b, c = attack(grads, threat, seed=3), attack(grads, threat, seed=3), attack(grads, threat, seed=4)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_model_parameters_are_not_touched(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    before = [p.detach().clone() for p in tiny_lenet.parameters()]
    get_attack("dlg", iterations=2)(grads, ThreatModel(tiny_lenet, SHAPE, 4))
    assert all(torch.equal(p, q) for p, q in zip(before, tiny_lenet.parameters()))
    assert all(p.grad is None for p in tiny_lenet.parameters())


# --------------------------------------------------------------------------------------
# Adaptive attackers
# --------------------------------------------------------------------------------------
def _random_mask(grads, density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(t.shape, generator=g) < density for t in grads]


@pytest.mark.parametrize("name, kw", [("dlg-adaptive", {"iterations": 3}), ("ig-adaptive", {"iterations": 10})])
def test_adaptive_attacks_ignore_unsent_coordinates(tiny_lenet, name, kw):
    x, y, grads = _case(tiny_lenet)
    mask = _random_mask(grads, 0.5, 0)
    zeros = [torch.where(m, g, torch.zeros_like(g)) for g, m in zip(grads, mask)]
    junk = [torch.where(m, g, 100 * torch.randn_like(g)) for g, m in zip(grads, mask)]
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y, sent_mask=mask)
    a = get_attack(name, **kw)(zeros, threat)
    b = get_attack(name, **kw)(junk, threat)
    assert torch.equal(a.images, b.images)
    # without a sent_mask the adaptive attacker takes the non-zero coordinates as sent
    c = get_attack(name, **kw)(zeros, ThreatModel(tiny_lenet, SHAPE, 4, labels=y))
    assert torch.equal(a.images, c.images)


def test_adaptive_attacks_beat_zeros_that_mislead(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    mask = _random_mask(grads, 0.5, 1)
    sent = [torch.where(m, g, torch.zeros_like(g)) for g, m in zip(grads, mask)]
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y, sent_mask=mask)
    kw = dict(iterations=30, tolerance=1e-10, line_search="strong_wolfe")
    plain = get_attack("dlg", **kw)(sent, threat)
    adaptive = get_attack("dlg-adaptive", **kw)(sent, threat)
    assert _leak(adaptive.images, x) > 20
    assert _leak(adaptive.images, x) > _leak(plain.images, x) + 10
    plain = get_attack("ig", iterations=200, tv_weight=1e-4)(sent, threat)
    adaptive = get_attack("ig-adaptive", iterations=200, tv_weight=1e-4)(sent, threat)
    assert _leak(adaptive.images, x) > 10
    assert _leak(adaptive.images, x) > _leak(plain.images, x) + 10


def test_band_penalty_is_zero_on_the_true_gradient_only():
    torch.manual_seed(0)
    g = torch.randn(400)
    top, keep = 0.05, 0.2
    pruned = dgp_kernels.prune(g, top, keep)
    mask = pruned != 0
    obj = GradientObjective([pruned], "cosine", [mask], band_weight=1.0, band=(top, keep))
    assert float(obj.band_penalty([g])) == 0.0
    assert float(obj([g])) == pytest.approx(0.0, abs=1e-6)
    # move unsent coordinates into the band: the penalty sees it, the plain cosine does not
    mags = pruned[mask].abs()
    inside = torch.where(mask, g, 0.5 * (mags.min() + mags.max()) * torch.ones_like(g))
    assert float(obj.band_penalty([inside])) > 0
    assert float(obj.distance([inside])) == pytest.approx(float(obj.distance([g])), abs=1e-6)
    # without the band rule: the nearer-edge hinge, also zero on the truth
    obj2 = GradientObjective([pruned], "cosine", [mask], band_weight=1.0)
    assert float(obj2.band_penalty([g])) == 0.0 and float(obj2.band_penalty([inside])) > 0


def test_dgp_aware_attack_runs_on_dgp_pruned_gradient(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    band = (0.05, 0.5)
    sent = [dgp_kernels.prune(g, *band) for g in grads]
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y, sent_mask=[s != 0 for s in sent], band=band)
    rec = get_attack("ig-dgp-aware", iterations=200, tv_weight=1e-4)(sent, threat)
    assert bool(torch.isfinite(rec.images).all())
    assert _leak(rec.images, x) > 3


# --------------------------------------------------------------------------------------
# Robbing the Fed
# --------------------------------------------------------------------------------------
def test_rtf_recovers_a_batch_exactly():
    torch.manual_seed(0)
    batch = 6
    x = smooth_images(batch, 7) * torch.linspace(0.1, 0.7, batch).view(-1, 1, 1, 1)
    attack = get_attack("rtf", num_bins=64, mean=0.25, std=0.2)
    model = attack.prepare_model(convnet_small(num_classes=4, width=8), SHAPE, 4)
    assert isinstance(model.imprint, ImprintBlock)
    thresholds = attack.thresholds(SHAPE)
    bins = torch.searchsorted(thresholds, x.double().flatten(1).mean(1)) - 1
    assert bins.unique().numel() == batch  # precondition: one image per bin
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    grads = compute_gradients(model, x, y)
    rec = attack(grads, ThreatModel(model, SHAPE, 4, batch_size=batch, labels=y))
    perm = M.match_order(rec.images, x)
    assert float(M.psnr(rec.images[perm], x).min()) > 80  # exact up to float32 rounding
    assert rec.label_source == "known" and rec.losses == []


def test_rtf_needs_the_prepared_model(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    with pytest.raises(ValueError, match="prepare_model"):
        get_attack("rtf")(grads, ThreatModel(tiny_lenet, SHAPE, 4))


def test_rtf_calibration_thresholds_follow_the_data():
    cal = smooth_images(100, 9)
    t = get_attack("rtf", num_bins=4, calibration=cal).thresholds(SHAPE)
    assert t.shape == (4,) and t[0] < 0 and bool((t[1:] > t[:-1]).all())
    means = cal.double().flatten(1).mean(1)
    assert float(t[2]) == pytest.approx(float(means.median()), abs=0.02)
    with pytest.raises(ValueError, match="calibration images"):
        get_attack("rtf", calibration=cal).thresholds((3, 16, 16))


@pytest.mark.cuda
def test_attack_runs_on_cuda(tiny_lenet):
    model = tiny_lenet.cuda()
    x = smooth_images(1, 1).cuda()
    y = torch.tensor([2], device="cuda")
    grads = compute_gradients(model, x, y)
    rec = get_attack("ig", iterations=50, tv_weight=1e-4)(grads, ThreatModel(model, SHAPE, 4, labels=y))
    assert rec.images.is_cuda
    assert _leak(rec.images, x) > 3


# --------------------------------------------------------------------------------------
# Lowest-objective iterate, boxed adaptive DLG, TV forms
# --------------------------------------------------------------------------------------
def _objective_at(attack_name, images, grads, threat, **kw):
    from dgp_kernels.attacks.matching import GradientObjective, dummy_gradients, resolve_masks, total_variation

    adaptive = attack_name.endswith("adaptive")
    kind = "euclidean" if attack_name.startswith("dlg") else "cosine"
    obj = GradientObjective(grads, kind, resolve_masks(grads, threat.sent_mask, adaptive))
    params = list(threat.model.parameters())
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        val = obj(dummy_gradients(threat.model, params, x, threat.labels, threat.loss_fn))
        if kw.get("tv_weight"):
            val = val + kw["tv_weight"] * total_variation(x, kw.get("tv", "mean"))
    return float(val)


def test_dlg_returns_the_lowest_objective_point_not_the_last(tiny_lenet, monkeypatch):
    """L-BFGS without a line search at lr 5 is not monotone: the last evaluated point is
    worse than the best one. The attack must return the best one (and report its value)."""
    from dgp_kernels.attacks import dlg as dlg_mod

    x, y, grads = _case(tiny_lenet)
    seen = []
    real = dlg_mod.GradientObjective.__call__

    def spy(self, dummy):
        out = real(self, dummy)
        seen.append(float(out.detach()))
        return out

    monkeypatch.setattr(dlg_mod.GradientObjective, "__call__", spy)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    rec = get_attack("dlg", iterations=6, lr=5.0, max_iter=5, boxed=True, init="uniform")(grads, threat)
    monkeypatch.undo()
    assert min(seen) < seen[-1]  # precondition: the last point is not the best
    assert rec.objective == pytest.approx(min(seen), rel=1e-6)
    assert _objective_at("dlg", rec.images, grads, threat) == pytest.approx(min(seen), rel=1e-4)


def test_ig_returns_the_lowest_objective_iterate_not_the_last(tiny_lenet):
    """Signed Adam at lr 3 bounces pixels between the box edges, so the last iterate is
    worse than an earlier one; the attack returns the best iterate (objective recomputed
    there)."""
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    kw = dict(iterations=8, lr=3.0, tv_weight=0.2, log_every=1)
    rec = get_attack("ig", **kw)(grads, threat)
    assert len(rec.losses) == 8
    assert min(rec.losses[1:]) < rec.losses[-1]  # precondition: not monotone
    got = _objective_at("ig", rec.images, grads, threat, tv_weight=0.2)
    assert got == pytest.approx(rec.objective, rel=1e-4)
    assert got <= min(rec.losses) * (1 + 1e-5)
    # and through the grid entry point: one reconstruction per setting, settings recorded
    recs = get_attack("ig", **kw).run_grid(grads, threat, [{"lr": 3.0}, {"lr": 0.1, "restart": 1}])
    assert [r.setting for r in recs] == [{"lr": 3.0}, {"lr": 0.1, "restart": 1}]
    assert recs[0].objective == pytest.approx(rec.objective, rel=1e-5)


def test_dlg_adaptive_is_boxed_and_starts_inside_the_box(tiny_lenet, monkeypatch):
    """Every image the boxed adaptive DLG evaluates lies in [0, 1] (the unboxed attacker
    starts from normal noise and wanders outside), it uses the strong-Wolfe line search and
    the returned images are the evaluated point (no clipping changes them afterwards)."""
    from dgp_kernels.attacks import dlg as dlg_mod

    x, y, grads = _case(tiny_lenet)
    mask = _random_mask(grads, 0.3, 2)
    sent = [torch.where(m, g, torch.zeros_like(g)) for g, m in zip(grads, mask)]
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y, sent_mask=mask)
    evaluated = []
    real = dlg_mod.dummy_gradients

    def spy(model, params, images, target, loss_fn):
        evaluated.append(images.detach().clone())
        return real(model, params, images, target, loss_fn)

    monkeypatch.setattr(dlg_mod, "dummy_gradients", spy)
    attack = get_attack("dlg-adaptive", iterations=4, max_iter=5)
    assert attack.boxed and attack.line_search == "strong_wolfe" and attack.init == "uniform"
    rec = attack(sent, threat)
    assert len(evaluated) > 4
    assert all(float(e.min()) >= 0 and float(e.max()) <= 1 for e in evaluated)
    monkeypatch.undo()
    assert _objective_at("dlg-adaptive", rec.images, sent, threat) == pytest.approx(rec.objective, rel=1e-4)
    # the plain attacker stays unboxed (DLG's setting)
    plain = get_attack("dlg")
    assert not plain.boxed and plain.line_search is None and plain.init == "randn"


def test_total_variation_forms_hand_computed():
    from dgp_kernels.attacks.matching import total_variation

    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]], dtype=torch.float64)
    # mean form: horizontal |1-0|, |4-2| -> 1.5; vertical |2-0|, |4-1| -> 2.5
    assert float(total_variation(x)) == pytest.approx(4.0, abs=1e-12)
    assert float(total_variation(x, "mean")) == pytest.approx(4.0, abs=1e-12)
    # breaching: zero padding right/bottom, per pixel |dx| + |dy| (+ 2 eps), one mean:
    # (1+2) + (1+3) + (2+2) + (4+4) = 19 over 4 pixels
    assert float(total_variation(x, "breaching")) == pytest.approx(19 / 4 + 2e-8, abs=1e-12)
    with pytest.raises(ValueError, match="tv must be one of"):
        total_variation(x, "iso")


def test_breaching_tv_matches_its_convolution_form():
    """breaching computes TV with a grouped 3x3 convolution, padding 1, kernels
    [[0,0,0],[0,-1,1],[0,0,0]] and its transpose, then mean((|dx|+eps) + (|dy|+eps))."""
    from dgp_kernels.attacks.matching import total_variation

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64)
    k = torch.tensor([[0, 0, 0], [0, -1, 1], [0, 0, 0]], dtype=torch.float64).view(1, 1, 3, 3)
    w = torch.cat([torch.cat((k.transpose(2, 3), k), 0)] * 3, 0)
    d = torch.nn.functional.conv2d(x, w, padding=1, groups=3)
    sq = d.abs() + 1e-8
    expected = (sq[:, 0::2] + sq[:, 1::2]).mean()
    assert float(total_variation(x, "breaching")) == pytest.approx(float(expected), rel=1e-12)
    assert float(total_variation(x, "mean")) != pytest.approx(float(expected), rel=1e-3)


def test_ig_breaching_tv_option_runs(tiny_lenet):
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    rec = get_attack("ig", iterations=20, tv="breaching", tv_weight=0.01)(grads, threat)
    assert math.isfinite(rec.objective)
    assert _objective_at("ig", rec.images, grads, threat, tv_weight=0.01, tv="breaching") == pytest.approx(
        rec.objective, rel=1e-4)
    with pytest.raises(ValueError, match="tv must be one of"):
        get_attack("ig", tv="l2")


def test_ig_grid_on_a_batch_norm_model_runs_row_by_row():
    """ResNet-18 in training mode updates batch-norm statistics, which the vectorised path
    cannot do: the settings run one after the other."""
    from dgp_kernels.attacks.inverting import _has_running_stats
    from dgp_kernels.cases.models import resnet18_cifar

    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=4)
    assert _has_running_stats(model)
    x = smooth_images(1, 1, size=16)
    y = torch.tensor([1])
    grads = compute_gradients(model, x, y)
    threat = ThreatModel(model, (3, 16, 16), 4, labels=y)
    settings = [{"tv_weight": 1e-4}, {"tv_weight": 0.2, "restart": 1}]
    recs = get_attack("ig", iterations=1).run_grid(grads, threat, settings)
    assert [r.setting for r in recs] == settings
    for r in recs:
        assert r.images.shape == (1, 3, 16, 16) and math.isfinite(r.objective)


# --------------------------------------------------------------------------------------
# Multi-round attacker (error feedback)
# --------------------------------------------------------------------------------------
def test_error_feedback_sends_more_coordinates_over_rounds(tiny_lenet):
    from dgp_kernels.attacks.multiround import accumulate, multi_round_uploads

    x, y, grads = _case(tiny_lenet)
    ef = multi_round_uploads(grads, "dgp:top=0.05,keep=0.2", 4, model=tiny_lenet)
    no_ef = multi_round_uploads(grads, "dgp:top=0.05,keep=0.2", 4, error_feedback=False, model=tiny_lenet)
    assert len(ef) == 4 and ef[0].sent_fraction == pytest.approx(0.2, abs=0.03)
    # without error feedback every round is the same upload
    for u in no_ef[1:]:
        assert all(torch.equal(a, b) for a, b in zip(u.shared_grads, no_ef[0].shared_grads))
    acc_no = accumulate(no_ef)
    assert acc_no.sent_fraction == pytest.approx(no_ef[0].sent_fraction)
    # with it, later rounds send coordinates the first one withheld
    acc = accumulate(ef)
    assert acc.sent_fraction > ef[0].sent_fraction + 0.05
    assert acc.upload_bytes == sum(u.upload_bytes for u in ef)
    for i in range(len(grads)):
        assert torch.allclose(acc.shared_grads[i], sum(u.shared_grads[i] for u in ef) / 4)
    # the first round with error feedback is the single-round operator
    assert all(torch.equal(a, b) for a, b in zip(ef[0].shared_grads, no_ef[0].shared_grads))
    with pytest.raises(ValueError, match="rounds"):
        multi_round_uploads(grads, "dgp", 0)


def test_attack_rounds_scores_single_and_accumulated(tiny_lenet):
    from dgp_kernels.attacks.multiround import attack_rounds

    x, y, _ = _case(tiny_lenet)
    out = attack_rounds(tiny_lenet, x, y, "dgp", 3, params={"iterations": 5},
                        settings=[{"tv_weight": 1e-4}, {"tv_weight": 0.2}])
    assert out["rounds"] == 3 and out["defense"] == "dgp:top=0.05,keep=0.2"
    for case in ("single", "accumulated"):
        assert math.isfinite(out[case]["psnr"]) and out[case]["setting"] in ({"tv_weight": 1e-4}, {"tv_weight": 0.2})
    assert out["accumulated"]["sent_fraction"] > out["single"]["sent_fraction"]


def test_ig_uniform_start_and_per_row_inits(tiny_lenet):
    """Rows of one grid may start from normal or uniform noise; a row equals the same
    setting run alone."""
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    attack = get_attack("ig", iterations=4)
    both = attack.run_grid(grads, threat, [{"init": "randn"}, {"init": "uniform", "restart": 1}])
    alone = get_attack("ig", iterations=4, init="uniform").run_grid(grads, threat, [{"restart": 1}])
    assert torch.allclose(both[1].images, alone[0].images, atol=1e-6)
    assert not torch.allclose(both[0].images, both[1].images)
    with pytest.raises(ValueError, match="init"):
        get_attack("ig", init="zeros")


# --------------------------------------------------------------------------------------
# L-BFGS stopping tests, float64 attacker, successive halving of the IG grid
# --------------------------------------------------------------------------------------
def test_dlg_keeps_optimising_below_torch_lbfgs_tolerances(tiny_lenet):
    """torch's L-BFGS stops each step after one evaluation once the objective changes by
    less than 1e-9 (or its gradient is below 1e-7): DLG with those tolerances stalls near
    1e-7 on the tiny case; with the default (0) it keeps going to round-off."""
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    kw = dict(iterations=10, init="uniform", line_search="strong_wolfe")
    old = get_attack("dlg", lbfgs_tolerance=1e-7, **kw)(grads, threat)
    new = get_attack("dlg", **kw)(grads, threat)
    assert old.objective > 1e-8  # precondition: the old setting stalls
    assert new.objective < 1e-9
    assert _leak(new.images, x) > _leak(old.images, x) + 5
    with pytest.raises(ValueError, match="lbfgs_tolerance"):
        get_attack("dlg", lbfgs_tolerance=-1.0)


def test_dlg_float64_computes_in_float64_and_leaves_the_model(tiny_lenet, monkeypatch):
    from dgp_kernels.attacks import dlg as dlg_mod

    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    seen = []
    real = dlg_mod.dummy_gradients

    def spy(model, params, images, target, loss_fn):
        seen.append((images.dtype, params[0].dtype))
        return real(model, params, images, target, loss_fn)

    monkeypatch.setattr(dlg_mod, "dummy_gradients", spy)
    before = [p.detach().clone() for p in tiny_lenet.parameters()]
    rec = get_attack("dlg", iterations=3, precision="float64")(grads, threat)
    assert seen and all(s == (torch.float64, torch.float64) for s in seen)
    assert rec.images.dtype == torch.float32 and math.isfinite(rec.objective)
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(tiny_lenet.parameters(), before))
    seen.clear()
    get_attack("dlg", iterations=1)(grads, threat)
    assert seen and all(s == (torch.float32, torch.float32) for s in seen)
    with pytest.raises(ValueError, match="precision"):
        get_attack("dlg", precision="float16")


def test_ig_pruning_keeps_the_lowest_objective_per_tv_weight(tiny_lenet):
    """Successive halving: at ``prune_at`` each TV weight keeps its lowest-objective row
    (the attacker's objective, never the true image); dropped rows return their best
    iterate up to then, kept rows run on exactly as without pruning."""
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    settings = [{"tv_weight": tv, "lr": lr, "restart": r}
                for tv in (1e-4, 0.2) for lr, r in ((0.1, 0), (0.03, 1), (0.3, 2))]
    kw = dict(iterations=8, log_every=1)
    full = get_attack("ig", **kw).run_grid(grads, threat, settings)
    pruned = get_attack("ig", prune_at=0.5, **kw).run_grid(grads, threat, settings)
    at_cut = [min(r.losses[:4]) for r in full]
    for group in ((0, 1, 2), (3, 4, 5)):
        winner = min(group, key=lambda j: at_cut[j])
        for j in group:
            if j == winner:
                assert len(pruned[j].losses) == 8
                assert torch.equal(pruned[j].images, full[j].images)
                assert pruned[j].objective == full[j].objective
            else:
                assert len(pruned[j].losses) == 4
                assert pruned[j].objective == pytest.approx(at_cut[j], rel=1e-6)
    assert [r.setting for r in pruned] == settings
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="prune_at"):
            get_attack("ig", prune_at=bad)


def test_ig_vmap_rows_match_row_by_row(tiny_lenet, monkeypatch):
    """Below ``VMAP_MIN_ROWS`` the rows run one after the other; forcing either path gives
    the same reconstructions."""
    from dgp_kernels.attacks import inverting

    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    settings = [{"tv_weight": 0.2, "restart": 0}, {"tv_weight": 1e-4, "lr": 0.03, "restart": 1}]
    loop = get_attack("ig", iterations=5).run_grid(grads, threat, settings)
    monkeypatch.setattr(inverting, "VMAP_MIN_ROWS", 1)
    vec = get_attack("ig", iterations=5).run_grid(grads, threat, settings)
    for a, b in zip(loop, vec):
        assert torch.allclose(a.images, b.images, atol=1e-5)
        assert a.objective == pytest.approx(b.objective, rel=1e-4)


def test_ig_pruning_with_a_rank_keeps_the_best_ranked_rows(tiny_lenet):
    """With ``rank`` (the evaluator's oracle) the ``prune_keep`` best-scored rows run on,
    whatever their TV weight; the rank sees the rows' best images so far, in [0, 1]."""
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    settings = [{"tv_weight": tv, "restart": r} for tv in (1e-4, 0.2) for r in (0, 1)]
    seen = []

    def rank(images):
        seen.append(images.shape)
        assert float(images.min()) >= 0 and float(images.max()) <= 1
        return [0.0, 3.0, 2.0, 1.0]  # rows 1 and 2 (one of each TV weight) win

    recs = get_attack("ig", iterations=6, log_every=1, prune_at=0.5, prune_keep=2).run_grid(
        grads, threat, settings, rank=rank)
    assert seen == [(4, 1, *SHAPE)]
    assert [len(r.losses) for r in recs] == [3, 6, 6, 3]
    with pytest.raises(ValueError, match="scores"):
        get_attack("ig", iterations=4, prune_at=0.5).run_grid(grads, threat, settings, rank=lambda im: [1.0])


def test_ig_learning_rate_schedules(tiny_lenet):
    """``step`` is breaching's x0.1 at 3/8, 5/8 and 7/8 of the steps; ``exp`` decays
    geometrically from 1 toward 1e-3; ``cosine`` from 1 toward 0; the schedule changes the
    run; an unknown one is refused."""
    from dgp_kernels.attacks.inverting import lr_factor

    n = 80
    assert [lr_factor("step", i, n) for i in (0, 29, 30, 49, 50, 69, 70, 79)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert [lr_factor("exp", i, n) for i in (0, 40)] == pytest.approx([1.0, 10 ** -1.5])
    assert lr_factor("exp", n - 1, n) == pytest.approx(10 ** (-3 * 79 / 80))
    assert [lr_factor("cosine", i, n) for i in (0, 40)] == pytest.approx([1.0, 0.5])
    x, y, grads = _case(tiny_lenet)
    threat = ThreatModel(tiny_lenet, SHAPE, 4, labels=y)
    runs = {s: get_attack("ig", iterations=8, schedule=s)(grads, threat, seed=3) for s in ("step", "exp")}
    again = get_attack("ig", iterations=8, schedule="exp")(grads, threat, seed=3)
    assert torch.equal(runs["exp"].images, again.images)
    assert not torch.allclose(runs["step"].images, runs["exp"].images)
    with pytest.raises(ValueError, match="schedule"):
        get_attack("ig", schedule="linear")
