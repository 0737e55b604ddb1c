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
    # an empty list runs the Python composite kernel, called without the default arguments
    for args in (([],), ([], DEFAULT_TOP, DEFAULT_KEEP), ([], 0.1, 0.3)):
        assert torch.ops.dgp.select_multi(*args)[2].tolist() == [0]
        assert torch.ops.dgp.select_ef_multi(args[0], [], *args[1:])[2].tolist() == [0]


def test_compile_with_schema_defaults():
    """torch.compile traces the ops through their fake kernels with the defaults left out."""
    g = torch.randn(300, generator=torch.Generator().manual_seed(1))
    fn = torch.compile(lambda x: torch.ops.dgp.prune(x * 2), backend="eager", fullgraph=True)
    assert torch.equal(fn(g), reference.prune(g * 2, DEFAULT_TOP, DEFAULT_KEEP))


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


def test_readme_using_it_examples_run():
    """The Python examples of the README's "Using it" section run and print what they say."""
    import subprocess
    import sys

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Using it"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    outs = []
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                              timeout=120, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert "(0, 0) (0, 1)" in outs[0] and "tensor(True)" in outs[0]
    assert "16., 17., 18., 19.,  0.]" in outs[0] and outs[0].rstrip().endswith("True")
