"""The dgp parameters added for error feedback (``top_feedback="floor"``, ``dense_below``)
pass through every front end that takes compressor parameters: defense specs
(``dgp train --defenses``), the simulator's config, the DDP hook state and the Flower mod."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.compressor import DGPCompressor
from dgp_kernels.sim import SimConfig
from dgp_kernels.sim.config import compressor_params
from dgp_kernels.spec import parse_spec, parse_value

PARAMS = {"top_feedback": "floor", "dense_below": 100}


def test_spec_and_sim_config():
    name, raw = parse_spec("dgp:top_feedback=floor,dense_below=100")
    assert (name, {k: parse_value(v) for k, v in raw.items()}) == ("dgp", PARAMS)
    cfg = SimConfig(defense="dgp", defense_params=dict(PARAMS))
    cfg.validate()
    assert compressor_params(cfg, 0) == PARAMS
    with pytest.raises(ValueError, match="dense_below"):
        SimConfig(defense="dgp", defense_params={"dense_below": -1}).validate()


def test_ddp_hook_state():
    ddp = pytest.importorskip("dgp_kernels.integrations.ddp")
    state = ddp.DGPHookState(compressor="dgp", params=dict(PARAMS))
    gs = [torch.randn(200, generator=torch.Generator().manual_seed(0)), torch.randn(50)]
    comp = state.compressor_for(((1, 200), (2, 50)), gs)
    assert comp.top_feedback == "floor" and comp.dense_below == 100
    p = comp.compress(gs)
    assert p.layers[0].indices is not None and p.layers[1].indices is None  # 50 < 100: dense
    assert comp.dropped_entries > 0


def test_flower_mod():
    pytest.importorskip("flwr", reason='needs pip install "dgp_kernels[flower]"')
    from flwr.app import RecordDict

    from dgp_kernels.integrations import flower as fl

    mod = fl.DGPMod("dgp", dict(PARAMS))
    comp = fl._load_compressor(RecordDict(), mod.compressor, mod.params)
    assert isinstance(comp, DGPCompressor)
    assert comp.top_feedback == "floor" and comp.dense_below == 100
