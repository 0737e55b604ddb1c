"""The package's layering, checked on the source (no imports run):

* no module imports an underscore name (or an underscore module) of another subpackage;
* ``sim`` and ``attacks`` do not import each other (their ``cli.py`` modules, which wire
  the command line, may use both);
* no module imports a layer above its own (docs/architecture.md lists the layers);
* no tracked file links or points outside the repository.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dgp_kernels"

# Layers, bottom to top: a module may import its own layer and those below it. The
# top-level modules not listed (cli.py, speed.py, benchmarks_gpu.py) are wiring: top layer.
LAYERS = {
    "checks": 0, "registry": 0, "optional": 0, "spec": 0, "native": 0, "machine": 0,
    "ops": 1, "kernels": 1, "_backend": 1, "_C": 1, "": 1,  # "": the package itself
    "codec": 2,
    "compressor": 3,
    "cases": 4,
    "integrations": 5, "sim": 5, "attacks": 5,
}
TOP = 6
# Layer-5 subpackages never import each other; their cli.py modules wire the command line.
SIDEWAYS_EXEMPT = {"cli.py"}


def _modules() -> List[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> List[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return parts


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path) -> Iterator[Tuple[int, List[str], List[str]]]:
    """``(line, module parts, imported names)`` of every import in ``path`` (relative
    imports resolved), including imports inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _dotted(path)
    pkg = here if _is_package(path) else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split("."), []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = base + (node.module.split(".") if node.module else [])
            else:
                mod = node.module.split(".") if node.module else []
            yield node.lineno, mod, [a.name for a in node.names]


def _owner(parts: List[str]) -> str:
    """The subpackage (or top-level module) a ``dgp_kernels...`` module belongs to."""
    return parts[1] if len(parts) > 1 else ""


def _subpackage(parts: List[str]) -> str:
    """The subpackage a module belongs to; modules directly in ``dgp_kernels/`` belong to
    the package root ("")."""
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and PKG.joinpath(parts[1]).is_dir()) else ""


def _layer(owner: str) -> int:
    return LAYERS.get(owner, TOP)


def _internal_imports():
    for path in _modules():
        me = _dotted(path)
        for line, mod, names in _imports(path):
            if mod[:1] != ["dgp_kernels"]:
                continue
            # "from dgp_kernels.x import y" where y is a submodule counts as importing x.y.
            targets = [mod + [n] if (PKG.joinpath(*mod[1:], n).is_dir()
                                     or PKG.joinpath(*mod[1:], n + ".py").exists()) else mod
                       for n in names] or [mod]
            for n, target in zip(names or [None], targets):
                yield path, me, line, target, n


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_private_names_across_subpackages():
    bad = []
    for path, me, line, target, name in _internal_imports():
        sub = _subpackage(target)
        if sub == _subpackage(me) or (sub == "" and len(target) <= 2):
            # Its own subpackage; or the package root's plumbing (dgp_kernels._C, the
            # native loader, the backend selector), which every layer may use.
            continue
        private_module = any(p.startswith("_") and not p.startswith("__") for p in target[1:])
        private_name = name is not None and name.startswith("_") and not name.startswith("__")
        if private_module or private_name:
            bad.append(f"{_rel(path)}:{line} imports {'.'.join(target)}"
                       + (f" name {name}" if private_name else ""))
    assert not bad, "imports of another subpackage's private names:\n" + "\n".join(bad)


def test_sim_and_attacks_do_not_import_each_other():
    bad = []
    for path, me, line, target, _ in _internal_imports():
        pair = (_owner(me), _owner(target))
        if pair in (("sim", "attacks"), ("attacks", "sim")) and path.name not in SIDEWAYS_EXEMPT:
            bad.append(f"{_rel(path)}:{line} imports {'.'.join(target)}")
    assert not bad, "sim and attacks import each other:\n" + "\n".join(bad)


def test_no_upward_or_sideways_imports():
    bad = []
    for path, me, line, target, _ in _internal_imports():
        src, dst = _owner(me), _owner(target)
        if src == dst or path.name in SIDEWAYS_EXEMPT:
            continue
        ls, ld = _layer(src), _layer(dst)
        if ld > ls or (ld == ls == LAYERS["sim"]):
            bad.append(f"{_rel(path)}:{line} ({src or 'dgp_kernels'}, layer {ls}) imports "
                       f"{'.'.join(target)} (layer {ld})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_scan_sees_imports():
    """The checks above would pass vacuously if the scan found nothing: it must see the
    simulator importing the compressors and the cases."""
    seen = {(_owner(me), _owner(t)) for _, me, _, t, _ in _internal_imports()}
    assert ("sim", "compressor") in seen and ("sim", "cases") in seen and ("attacks", "cases") in seen


# --------------------------------------------------------------------------------------
# Links out of the repository
# --------------------------------------------------------------------------------------
def _tracked_text_files() -> List[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        names = [n for n in out.stdout.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    files = []
    for n in names:
        p = ROOT / n
        if not p.is_file() or p.suffix in (".png", ".so", ".gz", ".pkl", ".whl"):
            continue
        try:
            p.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        files.append(p)
    return files


# A path that climbs out of the repository to the sibling folder of design notes, or names
# those notes; absolute paths of the machines the project was built on.
OUTSIDE = re.compile(r"\.\./share[d]\b|\bshared/(DESIGN|STYLE)\.md|\bDESIGN\.md|\bSTYLE\.md|(?<![\w.])/work/")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_no_file_points_outside_the_repository():
    me = Path(__file__).resolve()
    bad = []
    for p in _tracked_text_files():
        if p.resolve() == me:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{_rel(p)}:{i}: {line.strip()[:120]}")
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def test_markdown_links_stay_inside_the_repository():
    bad = []
    for p in _tracked_text_files():
        if p.suffix != ".md":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for target in MD_LINK.findall(line):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue  # a URL or an anchor in the same file
                dest = (p.parent / target.split("#")[0]).resolve()
                if ROOT not in dest.parents and dest != ROOT:
                    bad.append(f"{_rel(p)}:{i}: {target} leaves the repository")
                elif not dest.exists():
                    bad.append(f"{_rel(p)}:{i}: {target} does not exist")
    assert not bad, "markdown links that leave the repository or are broken:\n" + "\n".join(bad)


# (the outside path is built from parts, so that this file holds no such reference itself)
@pytest.mark.parametrize("text,hit", [("see " + "../" + "shared" + "/DESIGN.md §2", True),
                                      ("docs/semantics.md", False),
                                      ("/work/main/x", True)])
def test_the_outside_pattern(text, hit):
    assert bool(OUTSIDE.search(text)) is hit
