"""Shared test set-up.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set
here, before dgp_kernels is imported: without a GPU the Triton kernels run on CPU tensors
in Triton's interpreter (slow: keep those inputs to ~1e5 elements).

Device-dependent tests are chosen at collection, not skipped at run time, so that a run's
skip count holds only meaningful skips:

* ``@pytest.mark.cuda``: needs a CUDA device; not collected on a machine without one;
* ``@pytest.mark.no_cuda``: checks the behaviour without CUDA; not collected where CUDA is
  available.

The tests left out are reported as deselected, with one summary line saying why.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dgp_kernels  # noqa: E402,F401  (registers the ops and backends once)

_LEFT_OUT = pytest.StashKey[int]()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (not collected without one)")
    config.addinivalue_line(
        "markers", "no_cuda: checks the behaviour without CUDA (not collected where CUDA is available)"
    )


def pytest_collection_modifyitems(config, items):
    skip_marker = "cuda" if not HAS_CUDA else "no_cuda"
    kept, left_out = [], []
    for item in items:
        (left_out if item.get_closest_marker(skip_marker) is not None else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
    config.stash[_LEFT_OUT] = len(left_out)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.stash.get(_LEFT_OUT, 0)
    if n:
        why = "no CUDA device here" if not HAS_CUDA else "a CUDA device is present"
        kind = "CUDA-only" if not HAS_CUDA else "no-CUDA"
        terminalreporter.write_line(f"{n} {kind} tests not collected ({why}; listed as deselected)")
