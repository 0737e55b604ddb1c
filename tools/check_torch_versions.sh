#!/usr/bin/env bash
# Checks the package against each torch release it claims to support (not run in CI: it
# installs torch into fresh venvs and compiles the extension twice, ~10 minutes on 2 cores).
#
#   bash tools/check_torch_versions.sh                  # torch 2.13.0 and 2.14.1
#   TORCH_VERSIONS="2.14.1" VENV_ROOT=/tmp/venvs bash tools/check_torch_versions.sh
#
# For each version: a venv (kept under VENV_ROOT and reused when it already holds that
# torch) with that torch, then the sdist of this checkout installed the way a user builds
# from source (`pip install --no-build-isolation`), then from outside the checkout:
#   - torch is still the version installed before (installing must not replace it),
#   - `import dgp_kernels` loads without warnings and backend_info() reports the native
#     C++ CPU kernel (cpu == "cpp"), not the pure-torch fallback,
#   - the native codec serves the wire ops (dgp_kernels.codec.cpp_available()),
#   - `dgp bench --quick` runs.
# Exits non-zero at the first failure.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV_ROOT="${VENV_ROOT:-${TMPDIR:-/tmp}/dgp_torch_venvs}"
TORCH_VERSIONS="${TORCH_VERSIONS:-2.13.0 2.14.1}"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== sdist of $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo no-git))"
"$PYTHON" -m build --no-isolation --sdist --outdir "$WORK" "$REPO" > "$WORK/sdist.log" 2>&1 \
    || { cat "$WORK/sdist.log"; exit 1; }
SDIST="$(ls "$WORK"/dgp_kernels-*.tar.gz)"
echo "   $(basename "$SDIST")"

for v in $TORCH_VERSIONS; do
    venv="$VENV_ROOT/torch-$v"
    echo
    echo "== torch $v  (venv $venv)"
    if [ ! -x "$venv/bin/python" ] || \
       [ "$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != "$v" ]; then
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
        "$venv/bin/pip" install -q "torch==$v" numpy setuptools wheel ninja > "$WORK/venv-$v.log" 2>&1 \
            || { tail -n 40 "$WORK/venv-$v.log"; exit 1; }
    fi
    before="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    echo "-- torch before install: $before"
    "$venv/bin/pip" uninstall -q -y dgp_kernels > /dev/null 2>&1 || true
    start=$(date +%s)
    "$venv/bin/pip" install --no-build-isolation "$SDIST" > "$WORK/install-$v.log" 2>&1 \
        || { tail -n 40 "$WORK/install-$v.log"; exit 1; }
    echo "-- pip install --no-build-isolation $(basename "$SDIST"): ok in $(( $(date +%s) - start )) s"
    grep -E "^(Successfully installed|Requirement already satisfied: torch)" "$WORK/install-$v.log" | sed 's/^/   /'
    (
        cd "$WORK"  # import the installed package, not the checkout
        "$venv/bin/python" -W error::RuntimeWarning - "$before" <<'PY'
import importlib.metadata as md
import json
import os
import sys

import torch

import dgp_kernels
from dgp_kernels import codec

before = sys.argv[1]
info = dgp_kernels.backend_info()
lib = os.path.dirname(dgp_kernels.__file__)
so = [f for f in os.listdir(lib) if f.startswith("_C") and f.endswith(".so")]
with open(os.path.join(lib, "_C_build.json")) as f:
    built = json.load(f)
print(f"-- torch after install: {torch.__version__}")
print(f"-- dgp_kernels {dgp_kernels.__version__} from {lib}")
print(f"   requires: {[r for r in md.requires('dgp_kernels') if 'extra' not in r]}")
print(f"   {so[0]}: {os.path.getsize(os.path.join(lib, so[0])):,} bytes, built for torch {built['torch']}")
print(f"   backend_info(): {info}")
print(f"   codec.cpp_available(): {codec.cpp_available()}")
g = torch.randn(1000)
idx, val = torch.ops.dgp.select(g)  # schema defaults top=0.05, keep=0.2
print(f"   torch.ops.dgp.select(randn(1000)) with the schema defaults: {idx.numel()} entries")
assert torch.__version__ == before, f"torch changed: {before} -> {torch.__version__}"
assert info.cpu == "cpp", f"CPU kernel is {info.cpu!r}, not the C++ extension: {info.reason}"
assert codec.cpp_available(), "the C++ codec kernels are not registered"
assert idx.numel() == 200
PY
        echo "-- dgp bench --quick"
        "$venv/bin/dgp" bench --quick
    )
    echo "== torch $v: OK"
done
