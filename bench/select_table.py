"""Print the CPU comparison table: ours vs the authors' operator, topk, clone (``dgp bench``).

    python bench/select_table.py --quick --size 2000000 --threads 1

The logic lives in :mod:`dgp_kernels.speed` so the installed ``dgp`` command can use it;
this script only forwards its arguments.
"""

import os
import sys

try:
    from dgp_kernels.speed import main
except ImportError:  # a source checkout that is not installed: use the tree above bench/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dgp_kernels.speed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
