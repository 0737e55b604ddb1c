"""GPU benchmark of the Triton band selection: ``python bench/bench_triton.py [--help]``.

The code lives in :mod:`dgp_kernels.benchmarks_gpu` so that ``dgp bench`` runs it too when
a GPU is present; this script is its command-line entry point. Skips without CUDA.
"""

import sys

from dgp_kernels.benchmarks_gpu import main

if __name__ == "__main__":
    sys.exit(main())
