"""Packaging: one version string, py.typed, op schemas with the documented defaults, and the
native loader's diagnosis when dgp_kernels._C is missing, built for another torch, or broken."""

import os
import re
import warnings

import pytest
import torch

import dgp_kernels
from dgp_kernels import native
from dgp_kernels.ops import DEFAULT_KEEP, DEFAULT_TOP, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_version_string():
    import tomllib

    assert re.fullmatch(r"\d+\.\d+\.\d+", dgp_kernels.__version__)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dgp_kernels.__version__"}
    # torch is neither pinned in the metadata nor pulled into an isolated build
    assert "dependencies" not in meta["project"] and "dependencies" in meta["project"]["dynamic"]
    assert not any(r.startswith("torch") for r in meta["build-system"]["requires"])


def test_py_typed_is_shipped():
    assert os.path.exists(os.path.join(os.path.dirname(dgp_kernels.__file__), "py.typed"))


@pytest.mark.parametrize("op", ["select", "select_ef", "prune", "prune_", "select_multi",
                                "select_ef_multi"])
def test_schemas_carry_the_defaults(op):
    args = {a.name: a for a in getattr(torch.ops.dgp, op).default._schema.arguments}
    assert args["top"].default_value == DEFAULT_TOP
    assert args["keep"].default_value == DEFAULT_KEEP


def test_ops_callable_with_schema_defaults():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    idx, val = torch.ops.dgp.select(g)
    ridx, rval = reference.select(g, DEFAULT_TOP, DEFAULT_KEEP)
    assert torch.equal(idx, ridx) and torch.equal(val, rval)
    assert torch.equal(torch.ops.dgp.prune(g), reference.prune(g, DEFAULT_TOP, DEFAULT_KEEP))
    r = torch.zeros_like(g)
    idx2, _ = torch.ops.dgp.select_ef(g, r)
    assert torch.equal(idx2, ridx)
    x = g.clone()
    torch.ops.dgp.prune_(x)
    assert int((x != 0).sum()) == 200
    i, v, off = torch.ops.dgp.select_multi([g, g[:10]])
    assert off.tolist() == [0, 200, 202]


# --------------------------------------------------------------------------------------
# native loader: each failure is named, with the fix, and never as "a circular import"
# --------------------------------------------------------------------------------------
def _diagnose(monkeypatch, **patches):
    for name, value in patches.items():
        monkeypatch.setattr(native, name, value)
    monkeypatch.setattr(native, "_module", native._module)  # restored after the test
    monkeypatch.setattr(native, "_reason", native._reason)
    monkeypatch.setattr(native, "_loaded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.load()
    assert lib is None
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    msg = str(caught[0].message)
    assert native.BUILD_FIX in msg and "pure-torch reference" in msg and "circular" not in msg
    return msg


def test_loader_not_built(monkeypatch):
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: None)
    msg = _diagnose(monkeypatch)
    assert "dgp_kernels._C is not built" in msg


def test_loader_built_for_another_torch(monkeypatch):
    msg = _diagnose(monkeypatch, _built_for=lambda: "1.99.0")
    assert f"was built for torch 1.99.0 but this is torch {torch.__version__}" in msg


def test_loader_failing_to_load(monkeypatch):
    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10something")

    monkeypatch.setattr(native, "_built_for", lambda: None)
    monkeypatch.setattr(native.importlib, "import_module", broken)
    msg = _diagnose(monkeypatch)
    assert "failed to load (was it built against another torch?)" in msg
    assert "undefined symbol" in msg


def test_loader_reports_the_running_state():
    native.load()
    info = dgp_kernels.backend_info()
    if native.load() is None:
        assert info.cpu == "reference" and info.reason == native.reason()
    else:
        assert info.cpu == "cpp" and native.reason() is None
