"""The evaluation runner and report on a tiny grid (8x8 photos, LeNet, few iterations): the real
attack code runs; the records, JSON/CSV tables, markdown report and PNGs come out consistent."""

import csv
import functools
import json
import math
import os

import pytest
import torch

from dgp_kernels.attacks import available_attacks, compute_gradients, metrics
from dgp_kernels.cases.targets import load_photos
from dgp_kernels.attacks.report import format_summary, summary_rows, write_report
from dgp_kernels.attacks.runner import (
    DEFAULT_DEFENSES,
    QUICK_GRIDS,
    TUNING_GRIDS,
    EvalConfig,
    attack_params,
    default_config,
    run_evaluation,
    run_utility,
)

TINY_BUDGET = {
    "dlg": {"iterations": 2, "max_iter": 4},
    "idlg": {"iterations": 2, "max_iter": 4},
    "dlg-adaptive": {"iterations": 2, "max_iter": 4},
    "ig": {"iterations": 6},
    "ig-adaptive": {"iterations": 6},
    "ig-dgp-aware": {"iterations": 6},
    "rtf": {},
}


def _tiny_config(**kw) -> EvalConfig:
    everything = available_attacks()
    grid = [("none", ["dlg", "ig", "rtf"]), ("dgp", everything), ("topk:keep=0.2", ["idlg", "ig-adaptive"]),
            ("dp:sigma=0.01", ["dlg"])]
    base = dict(grid=grid, images=2, image_size=8, attack_params={a: TINY_BUDGET[a] for a in everything},
                utility=False, device="cpu")
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def tiny_result():
    return run_evaluation(_tiny_config(), progress=False)


def test_records_cover_the_grid_and_are_consistent(tiny_result):
    r = tiny_result
    cfg = r.config
    assert [d for d, _ in cfg.grid][1] == "dgp:top=0.05,keep=0.2"  # canonical labels
    expected = {(d, a, i) for d, atks in cfg.grid for a in atks for i in range(2)}
    got = {(x.defense, x.attack, x.image) for x in r.attacks}
    assert got == expected and len(r.attacks) == len(expected)
    floors = metrics.floor_psnr(r.targets.images)
    for x in r.attacks:
        assert math.isfinite(x.psnr) and math.isfinite(x.ssim) and x.mse >= 0
        assert x.floor == pytest.approx(float(floors[x.image]))
        assert x.leakage == pytest.approx(x.psnr - x.floor)
        assert x.label_correct in (0.0, 1.0) and x.label == int(r.targets.labels[x.image])
        rec = r.reconstructions[(x.defense, x.attack)][x.image : x.image + 1]
        assert x.psnr == pytest.approx(min(100.0, float(metrics.psnr(rec, r.targets.images[x.image : x.image + 1]))),
                                       abs=1e-6)
    # known labels are passed to dlg/ig; idlg infers its own
    assert {x.label_source for x in r.attacks if x.attack == "dlg"} == {"known"}
    assert {x.label_source for x in r.attacks if x.attack == "idlg"} == {"inferred"}
    for rec in r.reconstructions.values():
        assert rec.shape == r.targets.images.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1


def test_defense_records(tiny_result):
    d = {x.defense: x for x in tiny_result.defenses}
    assert list(d) == [g for g, _ in tiny_result.config.grid]
    # the iDLG rule is exact on an undefended single-image gradient of a sigmoid network
    assert d["none"].idlg_label_acc == 1.0
    for x in d.values():
        assert 0.0 <= x.idlg_label_acc <= 1.0
    assert d["dgp:top=0.05,keep=0.2"].upload_bytes < 0.3 * d["none"].upload_bytes
    assert d["dgp:top=0.05,keep=0.2"].sent_fraction == pytest.approx(0.2, abs=0.02)
    assert d["dgp:top=0.05,keep=0.2"].band == (0.05, 0.2) and d["none"].band is None
    assert d["none"].upload_bytes > d["none"].dense_bytes  # header + table + checksum


def test_rtf_reads_the_undefended_image_off_the_imprint(tiny_result):
    """Robbing the Fed runs on its malicious model: analytic, so even this budget recovers
    the undefended image almost exactly (the runner must hand it the gradient of *that*
    model, not the honest one)."""
    rows = [x for x in tiny_result.attacks if x.defense == "none" and x.attack == "rtf"]
    assert all(x.psnr > 40 for x in rows)


def test_best_attack_and_summary(tiny_result):
    r = tiny_result
    for d, atks in r.config.grid:
        best = r.best_attack(d)
        assert best in atks
        assert r.mean(d, best, "leakage") == max(r.mean(d, a, "leakage") for a in atks)
    rows = summary_rows(r)
    assert [x["defense"] for x in rows] == [d for d, _ in r.config.grid]
    text = format_summary(r)
    for d, _ in r.config.grid:
        assert d in text


def test_json_csv_report_and_pngs(tiny_result, tmp_path):
    paths = write_report(tiny_result, str(tmp_path / "out"))
    data = json.loads(open(paths.json).read())
    assert len(data["attacks"]) == len(tiny_result.attacks)
    assert [x["defense"] for x in data["defenses"]] == [d for d, _ in tiny_result.config.grid]
    assert data["utility"] is None and "--no-utility" in data["utility_note"]
    assert data["machine"]["torch"] == torch.__version__
    with open(paths.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tiny_result.attacks)
    assert {"defense", "attack", "psnr", "floor", "leakage", "ssim", "upload_bytes", "idlg_label_acc"} <= set(rows[0])
    md = open(paths.report).read()
    assert "## Summary: the reported leakage per defense" in md
    assert "DESIGN" not in md and "§" not in md  # the report stands alone
    assert "n = 2 images, 1 seed" in md  # sample size next to the numbers
    assert "## Per image" in md and "not run" in md
    assert "iDLG label acc" in md and "not measured" in md
    for d, atks in tiny_result.config.grid:
        assert f"`{d}`" in md
        assert f"**{tiny_result.best_attack(d)}**" in md
    assert len(paths.images) == 3  # two image grids + the tradeoff plot
    for p in paths.images:
        assert os.path.basename(p) in md
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 2000


def test_paired_models_give_identical_results_for_identical_inputs():
    """Same seed -> same model, same defense noise, same attack init: the run is reproducible,
    and an undefended 'none' row equals a 'none:value_dtype=float32' one."""
    grid = [("none", ["dlg"])]
    a = run_evaluation(_tiny_config(grid=grid, images=1), progress=False)
    b = run_evaluation(_tiny_config(grid=grid, images=1), progress=False)
    assert a.attacks[0].psnr == b.attacks[0].psnr
    assert torch.equal(a.reconstructions[("none", "dlg")], b.reconstructions[("none", "dlg")])


def test_batch_of_two_images_per_gradient():
    cfg = _tiny_config(grid=[("none", ["idlg", "rtf"])], batch_size=2, images=2)
    r = run_evaluation(cfg, progress=False)
    assert {x.batch for x in r.attacks} == {0}
    assert len(r.attacks) == 4
    assert r.defenses[0].idlg_label_acc == 1.0  # two distinct classes: both rows negative


def test_custom_targets_and_threads_restored():
    t = load_photos(1, size=8, start=2)
    before = torch.get_num_threads()
    r = run_evaluation(_tiny_config(grid=[("dgp", ["ig-dgp-aware"])], threads=1), progress=False, targets=t)
    assert r.targets.names == ["coffee"] and r.machine["torch_threads"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"grid": [("none", ["nope"])]}, ValueError, "unknown attack 'nope'; known attacks: dlg"),
        ({"grid": [("bogus", ["dlg"])]}, ValueError, "unknown defense 'bogus'"),
        ({"grid": [("dgp", ["dlg"]), ("dgp:top=0.05,keep=0.2", ["ig"])]}, ValueError, "twice"),
        ({"grid": [("none", [])]}, ValueError, "at least one attack"),
        ({"grid": []}, ValueError, "non-empty"),
        ({"images": 0}, ValueError, "images must be an int >= 1"),
        ({"model": "vgg"}, ValueError, "unknown model 'vgg'"),
        ({"attack_params": {"dlg": {"iterations": 0}}}, ValueError, "iterations"),
        ({"attack_params": {"dlg": {"steps": 3}}}, TypeError, "steps"),
    ],
)
def test_config_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        _tiny_config(**kw).validate()


def test_default_config_grid():
    cfg = default_config(device="cpu")
    labels = [d for d, _ in cfg.grid]
    assert labels == [d for d in DEFAULT_DEFENSES]
    assert cfg.images == 4 and cfg.tuning_name == "tuned"
    grid = dict(cfg.grid)
    # every attack that can be the strongest runs: dlg/ig undefended, the adaptive variants
    # under the DGP defaults and top-k at the same density, ig under noise
    assert set(grid["none"]) == {"dlg", "ig", "rtf"}
    assert set(grid["dgp:top=0.05,keep=0.2"]) == {"dlg-adaptive", "ig-adaptive", "ig-dgp-aware", "rtf"}
    assert set(grid["topk:keep=0.2"]) == {"dlg-adaptive", "ig-adaptive", "ig-dgp-aware", "rtf"}
    assert set(grid["dp:sigma=0.01"]) == {"ig", "rtf"}
    assert cfg.attack_params["dlg"] == attack_params("dlg")
    # the same tuning grid for every defense, the documented one
    assert cfg.tuning["ig-adaptive"] == TUNING_GRIDS["ig-adaptive"]
    assert {s["tv_weight"] for s in cfg.tuning["ig"]} == {1e-4, 0.005, 0.2}
    assert len({s["lr"] for s in cfg.tuning["ig"]}) == 2 and len({s["restart"] for s in cfg.tuning["ig"]}) == 2
    assert len(cfg.tuning["ig"]) == 12
    quick = default_config(quick=True, device="cpu", iteration_scale=2.0)
    assert quick.images == 1 and len(quick.grid) < len(cfg.grid) and quick.tuning_name == "quick"
    assert quick.tuning["ig"] == QUICK_GRIDS["ig"] and len(quick.tuning["ig"]) < len(cfg.tuning["ig"])
    assert quick.attack_params["ig"]["iterations"] == attack_params("ig", scale=0.5)["iterations"]
    untuned = default_config(tuning=False, device="cpu")
    assert untuned.tuning == {} and untuned.tuning_name == "none" and untuned.settings("ig") == [{}]
    full = default_config(full=True, device="cpu")
    assert full.attack_params["ig"]["iterations"] == 24000
    unknown = default_config(known_labels=False, device="cpu")
    assert "idlg" in dict(unknown.grid)["none"] and "dlg" not in dict(unknown.grid)["none"]
    picked = default_config(defenses=["none", "randk:keep=0.1"], attacks=["dlg", "ig-adaptive"], device="cpu")
    assert picked.grid == [("none", ["dlg", "ig-adaptive"]), ("randk:keep=0.1", ["dlg", "ig-adaptive"])]
    assert default_config(workers=1, device="cpu").workers == 1
    assert default_config(device="cpu").workers == 1
    assert 1 <= default_config(workers=0, device="cpu").workers <= 4
    with pytest.raises(ValueError, match="same defense twice"):
        default_config(defenses=["dgp", "dgp:top=0.05"], device="cpu")
    with pytest.raises(ValueError, match="unknown attack"):
        default_config(attacks=["dlg", "xyz"], device="cpu")
    with pytest.raises(ValueError, match="scale"):
        default_config(iteration_scale=0.0, device="cpu")
    with pytest.raises(ValueError, match="workers"):
        default_config(workers=-1, device="cpu")


# --------------------------------------------------------------------------------------
# Tuning protocol, parallel workers, FedAvg updates
# --------------------------------------------------------------------------------------
TINY_GRID = {"ig": [{"tv_weight": 1e-4}, {"tv_weight": 0.2, "restart": 1}],
             "ig-adaptive": [{"tv_weight": 1e-4}, {"tv_weight": 0.2, "lr": 0.03}],
             "dlg": [{"init": "uniform", "line_search": "strong_wolfe"}, {"restart": 1}]}


@pytest.fixture(scope="module")
def tuned_result():
    cfg = _tiny_config(grid=[("none", ["dlg", "ig"]), ("dgp", ["ig-adaptive", "rtf"])], tuning=TINY_GRID,
                       tuning_name="tuned")
    return run_evaluation(cfg, progress=False)


def test_tuned_rows_are_the_best_setting_per_image(tuned_result):
    r = tuned_result
    by_cell = {}
    for t in r.tuning_rows:
        by_cell.setdefault((t["defense"], t["attack"], t["image"]), []).append(t)
    for rec in r.attacks:
        rows = by_cell[(rec.defense, rec.attack, rec.image)]
        assert len(rows) == rec.settings_tried == len(r.config.settings(rec.attack))
        best = max(rows, key=lambda t: t["psnr"])
        assert rec.psnr == best["psnr"] and rec.setting == best["setting"]
        # the attacker's own choice (lowest objective) is never better than the best
        assert rec.leakage_by_objective <= rec.leakage + 1e-9
        # the stored reconstruction is the best setting's
        img = r.reconstructions[(rec.defense, rec.attack)][rec.image : rec.image + 1]
        assert rec.psnr == pytest.approx(min(100.0, float(metrics.psnr(img, r.targets.images[rec.image : rec.image + 1]))),
                                         abs=1e-5)
    # the rows name the settings of the grid
    assert {rec.setting for rec in r.attacks if rec.attack == "ig"} <= {"tv_weight=0.0001", "tv_weight=0.2 restart=1"}
    assert {rec.setting for rec in r.attacks if rec.attack == "rtf"} == {"default"}


def test_tuned_attacker_is_never_weaker_than_one_fixed_setting(tuned_result):
    """The reported leakage is the best over settings, so it is at least every single
    setting's leakage, image by image; the defense's best is the best over attacks too."""
    r = tuned_result
    for t in r.tuning_rows:
        rec = next(x for x in r.attacks if (x.defense, x.attack, x.image) == (t["defense"], t["attack"], t["image"]))
        assert rec.leakage >= t["leakage"] - 1e-9
    for d, atks in r.config.grid:
        assert r.mean(d, r.best_attack(d), "leakage") == max(r.mean(d, a, "leakage") for a in atks)


def test_two_worker_processes_give_the_same_records():
    cfg1 = _tiny_config(grid=[("none", ["ig"]), ("dgp", ["ig-adaptive"])], tuning=TINY_GRID, images=2)
    cfg2 = _tiny_config(grid=[("none", ["ig"]), ("dgp", ["ig-adaptive"])], tuning=TINY_GRID, images=2, workers=2)
    a = run_evaluation(cfg1, progress=False)
    b = run_evaluation(cfg2, progress=False)
    assert b.machine["workers"] == 2 and a.machine["workers"] == 1
    key = lambda x: (x.defense, x.attack, x.image)
    for x, y in zip(sorted(a.attacks, key=key), sorted(b.attacks, key=key)):
        assert (x.psnr, x.setting, x.leakage_by_objective) == (y.psnr, y.setting, y.leakage_by_objective)
    for k in a.reconstructions:
        assert torch.equal(a.reconstructions[k], b.reconstructions[k])


def test_fedavg_update_is_the_mean_gradient_along_the_local_steps():
    torch.manual_seed(0)
    from dgp_kernels.attacks.runner import client_update
    from dgp_kernels.cases.models import lenet_sigmoid

    model = lenet_sigmoid(num_classes=4, channels=3, image_size=8)
    x = load_photos(1, size=8).images
    y = torch.tensor([1])
    before = [p.detach().clone() for p in model.parameters()]
    one = client_update(model, x, y, steps=1)
    three = client_update(model, x, y, steps=3, lr=0.1)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # model untouched
    # by hand: three SGD steps on a copy
    import copy

    m = copy.deepcopy(model)
    grads = []
    for _ in range(3):
        g = compute_gradients(m, x, y)
        grads.append(g)
        with torch.no_grad():
            for p, gi in zip(m.parameters(), g):
                p.sub_(0.1 * gi)
    for i, u in enumerate(three):
        mean_g = sum(g[i] for g in grads) / 3
        assert torch.allclose(u, mean_g, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(one, grads[0]))
    assert not torch.allclose(three[0], one[0])
    cfg = _tiny_config(grid=[("none", ["ig"])], images=1, local_steps=3, local_lr=0.1)
    r = run_evaluation(cfg, progress=False)
    assert len(r.attacks) == 1 and math.isfinite(r.attacks[0].psnr)
    with pytest.raises(ValueError, match="local_lr"):
        _tiny_config(local_lr=0.0).validate()


@pytest.mark.parametrize(
    "tuning, match",
    [
        ({"ig": [{"momentum": 0.9}]}, "cannot tune 'momentum'"),
        ({"ig": []}, "non-empty"),
        ({"nope": [{}]}, "unknown attack"),
        ({"ig": [{"tv_weight": -1.0}]}, "tv_weight"),
        ({"ig": [{"restart": -1}]}, "restart"),
    ],
)
def test_bad_tuning_grids(tuning, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _tiny_config(tuning=tuning).validate()


@pytest.mark.slow
def test_utility_runs_the_simulator_per_defense():
    from dgp_kernels.sim import simulate_defense

    out = run_utility(["none", "dgp"], trainer=simulate_defense, rounds=1, progress=False, clients=2)
    assert [u.defense for u in out] == ["none", "dgp:top=0.05,keep=0.2"]
    for u in out:
        assert 0.0 <= u.final_accuracy <= 1.0 and u.rounds == 1 and u.dense_bytes > 0
    # DGP at 20% density uploads about a quarter of the dense bytes
    assert out[1].upload_bytes_per_round < 0.3 * out[0].upload_bytes_per_round
    assert out[0].upload_bytes_per_round > out[0].dense_bytes


def test_non_finite_metrics_become_null_in_json(tiny_result, tmp_path):
    import dataclasses

    bad = dataclasses.replace(tiny_result.attacks[0], ssim=float("nan"), psnr=float("inf"))
    r = dataclasses.replace(tiny_result, attacks=[bad] + tiny_result.attacks[1:])
    path = tmp_path / "r.json"
    r.to_json(str(path))  # strict JSON: would raise on NaN
    row = json.loads(path.read_text())["attacks"][0]
    assert row["ssim"] is None and row["psnr"] is None


def test_attack_failure_names_attack_and_defense(monkeypatch):
    from dgp_kernels.attacks import runner as runner_mod

    real = runner_mod.get_attack

    class Broken:
        def prepare_model(self, model, image_shape, num_classes):
            return model

        def run_grid(self, shared_grads, threat, settings, *, seed=0, progress=False):
            raise ValueError("boom")

    monkeypatch.setattr(runner_mod, "get_attack", lambda name, **p: Broken() if name == "ig" else real(name, **p))
    with pytest.raises(ValueError, match="attack 'ig' on defense 'dgp:top=0.05,keep=0.2' \\(batch 0\\): boom"):
        run_evaluation(_tiny_config(grid=[("dgp", ["ig"])], images=1), progress=False)


def test_suite_variants_on_tiny_settings(tmp_path):
    """--suite: batches, a batch-norm model, FedAvg updates, unknown labels, each on the
    primary defenses with the base grid and tuning; suite.md sums them up."""
    from dgp_kernels.attacks.report import write_suite_report
    from dgp_kernels.attacks.runner import run_suite, suite_configs

    base = _tiny_config(grid=[("none", ["dlg", "ig"]), ("dgp", ["ig-adaptive"]), ("dp:sigma=0.01", ["ig"])],
                        tuning={"ig": [{"tv_weight": 1e-4}, {"tv_weight": 0.2}]}, images=1, image_size=16,
                        attack_params={"dlg": {"iterations": 1, "max_iter": 2}, "ig": {"iterations": 2},
                                       "ig-adaptive": {"iterations": 2}, "idlg": {"iterations": 1, "max_iter": 2}})
    assert [n for n, _ in suite_configs(base)] == ["batch4", "batch8", "resnet18", "fedavg", "unknown-labels"]
    assert dict(suite_configs(base))["resnet18"].model == "resnet18_cifar"
    # tiny: batches of 2, the small ConvNet in place of ResNet-18 (its batch-norm path is
    # tested in test_attacks), 2 local steps
    configs = suite_configs(base, batch_sizes=(2,), bn_model="convnet_small", local_steps=2)
    names = [n for n, _ in configs]
    assert names == ["batch2", "convnet_small", "fedavg", "unknown-labels"]
    cfg = dict(configs)
    assert [d for d, _ in cfg["batch2"].grid] == ["none", "dgp:top=0.05,keep=0.2"]  # primary defenses only
    assert cfg["batch2"].batch_size == 2 and cfg["batch2"].images == 2
    assert cfg["convnet_small"].model == "convnet_small"
    assert cfg["fedavg"].local_steps == 2
    assert not cfg["unknown-labels"].known_labels and "idlg" in dict(cfg["unknown-labels"].grid)["none"]
    assert all(c.tuning["ig"] == base.tuning["ig"] for c in cfg.values())
    results = run_suite(configs, progress=False)
    for name, r in results:
        assert {x.defense for x in r.attacks} == {"none", "dgp:top=0.05,keep=0.2"}
        assert all(math.isfinite(x.psnr) for x in r.attacks)
    r_unknown = dict(results)["unknown-labels"]
    assert {x.label_source for x in r_unknown.attacks} <= {"inferred", "optimised"}
    path = write_suite_report(results, str(tmp_path), figures=False)
    md = open(path).read()
    for name in names:
        assert f"| {name} |" in md
        assert os.path.exists(tmp_path / f"suite-{name}" / "report.md")


def test_headline_states_what_dgp_stops_with_the_runs_numbers(tmp_path):
    cfg = _tiny_config(grid=[("none", ["dlg", "ig", "rtf"]), ("dgp", ["dlg-adaptive", "ig-adaptive", "rtf"]),
                             ("topk:keep=0.2", ["ig-adaptive", "rtf"])], images=2)
    r = run_evaluation(cfg, progress=False)
    md = open(write_report(r, str(tmp_path), figures=True).report).read()
    head = md.split("## In plain words", 1)[1].split("## Summary", 1)[0]
    assert "pixel-exact reconstruction" in head and "coarse reconstruction" in head
    assert "Top-k at the same density" in head and "malicious server" in head
    dlg_none = r.best_rows("none", attacks=["dlg"])
    mean_psnr = sum(x.psnr for x in dlg_none) / len(dlg_none)
    assert f"{mean_psnr:.1f} dB" in head
    assert "n = 2 images, 1 seed" in head


def test_successive_halving_is_ranked_by_psnr_and_the_report_says_so(tmp_path, monkeypatch):
    """With ``prune_by="psnr"`` the runner hands IG a ranking that is the PSNR against the
    true images (the oracle); with ``"objective"`` none (the attack's own choice); the
    report states which."""
    from dgp_kernels.attacks.inverting import InvertingGradients

    ranks = []
    real = InvertingGradients.run_grid

    @functools.wraps(real)  # keeps the signature the runner inspects for ``rank``
    def spy(self, *args, **kw):
        ranks.append(kw.get("rank"))
        return real(self, *args, **kw)

    monkeypatch.setattr(InvertingGradients, "run_grid", spy)
    settings = [{"tv_weight": tv, "restart": r} for tv in (1e-4, 0.2) for r in (0, 1)]
    budget = {"ig": {"iterations": 6, "prune_at": 0.5, "prune_keep": 1}}
    for how in ("psnr", "objective"):
        ranks.clear()
        cfg = EvalConfig(grid=[("none", ["ig"])], images=1, image_size=8, attack_params=budget,
                         tuning={"ig": settings}, utility=False, device="cpu", prune_by=how)
        result = run_evaluation(cfg, progress=False)
        assert len(result.tuning_rows) == 4
        text = open(write_report(result, str(tmp_path / how), figures=False).report).read()
        assert "Successive halving (ig)" in text
        assert ("oracle" in text) == (how == "psnr")
        if how == "objective":
            assert ranks == [None]
        else:
            (rank,) = ranks
            x = result.targets.images[:1]
            scores = rank(torch.stack([x, torch.zeros_like(x)]))
            assert scores[0] == pytest.approx(100.0)
            assert scores[1] == pytest.approx(float(metrics.psnr(torch.zeros_like(x), x)[0]))
    with pytest.raises(ValueError, match="prune_by"):
        EvalConfig(grid=[("none", ["ig"])], prune_by="nope").validate()
