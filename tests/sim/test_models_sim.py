"""Models the simulator builds for each dataset (8x8 grayscale digits included)."""

import pytest
import torch

from dgp_kernels.sim import SimConfig, build_model
from dgp_kernels.cases.models import MODELS, get_model, mlp


def test_mlp_shapes_and_errors():
    m = mlp(num_classes=10, channels=1, image_size=8)
    assert sum(p.numel() for p in m.parameters()) == 64 * 64 + 64 + 64 * 10 + 10 == 4810
    assert m(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        mlp(hidden=0)
    assert "mlp" in MODELS and isinstance(get_model("mlp", channels=3), torch.nn.Module)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("dataset,shape,classes", [("digits", (1, 8, 8), 10), ("cifar100", (3, 32, 32), 100)])
def test_build_model_fits_dataset(model, dataset, shape, classes):
    cfg = SimConfig(dataset=dataset, model=model)
    m = build_model(cfg)
    m.eval()
    with torch.no_grad():
        assert m(torch.rand(2, *shape)).shape == (2, classes)
    # Seeded init that leaves the global RNG alone.
    state = torch.get_rng_state()
    again = build_model(cfg)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
