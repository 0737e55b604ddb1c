"""Shared test set-up.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set
here, before dgp_kernels is imported: without a GPU the Triton kernels run on CPU tensors
in Triton's interpreter (slow: keep those inputs to ~1e5 elements).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dgp_kernels  # noqa: E402,F401  (registers the ops and backends once)
