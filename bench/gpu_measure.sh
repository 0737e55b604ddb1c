#!/usr/bin/env bash
# One call on a GPU machine (< 8 minutes): environment, C++ build, then bench/gpu_measure.py
# (CUDA tests, benchmark table eager and with graphs, launch counts from the profiler, the
# tuning sweep). Everything lands in $OUT. Uses the machine's own python/torch/triton; the
# package is imported from the checkout (PYTHONPATH), nothing is installed.
#
#   OUT=/tmp/gpu_out bash bench/gpu_measure.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  nproc; git log --oneline -1 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
MAX_JOBS=16 timeout 150 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$?" | tee -a "$OUT/build.log"
timeout 420 python3 bench/gpu_measure.py --out "$OUT"
echo "gpu_measure rc=$?"
