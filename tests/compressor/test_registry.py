"""Registry and constructor argument checks (errors name the argument)."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from dgp_kernels.codec.payload import LayerPayload, PayloadError, SparsePayload
from dgp_kernels.compressor import base
from dgp_kernels.compressor import (
    Compressor,
    DGPCompressor,
    available_compressors,
    get_compressor,
    register_compressor,
)


def test_known_names():
    assert available_compressors() == ["adgp", "dgp", "dp", "none", "qsgd", "randk", "topk"]
    assert isinstance(get_compressor("dgp"), DGPCompressor)
    assert get_compressor("dgp").name == "dgp" and get_compressor("topk").name == "topk"


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown compressor 'dgpp'.*adgp, dgp, dp, none"):
        get_compressor("dgpp")
    with pytest.raises(TypeError, match="must be a str"):
        get_compressor(3)


def test_unknown_parameter_is_named():
    with pytest.raises(TypeError, match=r"'dgp' has no parameter 'keeep'.*top, keep"):
        get_compressor("dgp", keeep=0.1)
    with pytest.raises(TypeError, match="'top'"):
        get_compressor("topk", top=0.05)  # topk fixes top = 0


@pytest.mark.parametrize(
    "name,params,exc,pattern",
    [
        ("dgp", {"top": 0.9}, ValueError, "top \\+ keep"),
        ("dgp", {"keep": -0.1}, ValueError, "keep must be in"),
        ("dgp", {"top": "0.1"}, TypeError, "top must be"),
        ("dgp", {"error_feedback": 1}, TypeError, "error_feedback must be a bool"),
        ("dgp", {"value_dtype": "int8"}, ValueError, "value_dtype must be one of"),
        ("dgp", {"value_dtype": torch.float64}, ValueError, "value_dtype"),
        ("dgp", {"value_dtype": 4}, TypeError, "value_dtype"),
        ("topk", {"keep": 1.5}, ValueError, "keep"),
        ("randk", {"keep": float("nan")}, ValueError, "keep"),
        ("randk", {"seed": -1}, ValueError, "seed"),
        ("randk", {"seed": 1.5}, TypeError, "seed"),
        ("dp", {"clip": 0.0}, ValueError, "clip must be a finite number > 0"),
        ("dp", {"clip": float("inf")}, ValueError, "clip"),
        ("dp", {"noise_multiplier": -1.0}, ValueError, "noise_multiplier"),
        ("dp", {"noise_multiplier": None}, TypeError, "noise_multiplier"),
        ("qsgd", {"levels": 0}, ValueError, "levels must be an int >= 1"),
        ("qsgd", {"levels": 2.0}, TypeError, "levels must be an int"),
        ("qsgd", {"levels": True}, TypeError, "levels"),
        ("adgp", {"value_dtype": "fp8"}, ValueError, "value_dtype"),
        ("none", {"value_dtype": None}, TypeError, "value_dtype"),
    ],
)
def test_bad_parameters_are_named(name, params, exc, pattern):
    with pytest.raises(exc, match=pattern):
        get_compressor(name, **params)


def test_value_dtype_spellings():
    for spelling in ("bfloat16", "torch.bfloat16", torch.bfloat16):
        assert get_compressor("dgp", value_dtype=spelling).value_dtype == torch.bfloat16


@pytest.fixture
def registry_restored():
    """The global registry holds only the real compressors after the test."""
    before = set(base.COMPRESSORS.names())
    yield
    for name in set(base.COMPRESSORS.names()) - before:
        base.COMPRESSORS.unregister(name)


def test_register_a_new_compressor_and_errors(registry_restored):

    @register_compressor("test-identity")
    class Identity(Compressor):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def params(self) -> Dict[str, Any]:
            return {"scale": self.scale}

        def compress(self, grads):
            return SparsePayload(
                tuple(LayerPayload(g.numel(), None, g.reshape(-1).float() * self.scale) for g in grads)
            )

    c = get_compressor("test-identity", scale=2.0)
    g = [torch.ones(2, 2)]
    assert torch.equal(c.decompress(c.compress(g), g)[0], torch.full((2, 2), 2.0))
    assert "test-identity" in available_compressors()
    with pytest.raises(ValueError, match="already registered"):
        register_compressor("dgp")(Identity)
    with pytest.raises(TypeError, match="Compressor subclass"):
        register_compressor("test-bad")(int)
    with pytest.raises(TypeError, match="non-empty str"):
        register_compressor("")


def test_generic_decompress_checks_the_payload():
    c = get_compressor("dgp")
    g = [torch.randn(10), torch.randn(3, 4)]
    p = c.compress(g)
    out = c.decompress(p, [(10,), torch.Size([3, 4])])  # shapes work as well as tensors
    assert out[0].dtype == torch.float32 and out[1].shape == (3, 4)
    assert c.decompress(p, g, dtype=torch.float64)[0].dtype == torch.float64
    with pytest.raises(PayloadError, match="2 layers but 1"):
        c.decompress(p, g[:1])
    with pytest.raises(PayloadError, match="layer 1: payload numel 12"):
        c.decompress(p, [g[0], torch.randn(13)])
    bad = SparsePayload((LayerPayload(4, torch.tensor([0, 4]), torch.ones(2)),))
    with pytest.raises(PayloadError, match="out of range"):
        c.decompress(bad, [(4,)])
    dense_short = SparsePayload((LayerPayload(4, None, torch.ones(3)),))
    with pytest.raises(PayloadError, match="dense layer"):
        c.decompress(dense_short, [(4,)])
    aligned = SparsePayload((LayerPayload(4, None, torch.ones(1)),), aligned=True)
    with pytest.raises(PayloadError, match="aligned"):
        c.decompress(aligned, [(4,)])
    with pytest.raises(TypeError, match="like"):
        c.decompress(p, torch.randn(3))
