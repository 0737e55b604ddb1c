#!/usr/bin/env bash
# One lent-GPU session in one call (issue 4): build the C++ extension, run every CUDA test,
# then the benchmarks, each step capped so a failure never hides the others.
#
#   OUT=/tmp/gpu_out bash bench/gpu_session.sh
#
# Runs in the repository root with the machine's own python3/torch/triton (no install:
# the package is imported from the checkout via PYTHONPATH). Logs land in $OUT (at most
# 8 files): env.txt build.log tests_kernels.log tests_more.log bench.log bench_graphs.log
# profile.log profile.json. NCU=1 adds ncu.txt instead of bench_graphs.log.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=python3
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; uname -r
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "build dgp_kernels._C in the background"
( MAX_JOBS=16 timeout 240 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$?" >> "$OUT/build.log" ) &
BUILD=$!

stamp "tests/kernels on CUDA tensors (8 workers; the C++ comparisons run after the build)"
timeout 100 $PY -m pytest -q -n 8 -p no:cacheprovider tests/kernels \
  -k "not compile_for_sm90 and not matches_cpp_kernel" > "$OUT/tests_kernels.log" 2>&1
echo "tests/kernels rc=$?" >> "$OUT/tests_kernels.log"
tail -4 "$OUT/tests_kernels.log"
stamp "the same with fused tails on by default (DGP_TRITON_FUSE=1)"
DGP_TRITON_FUSE=1 timeout 100 $PY -m pytest -q -n 8 -p no:cacheprovider tests/kernels \
  -k "not compile_for_sm90 and not matches_cpp_kernel" > "$OUT/tests_fused.tmp" 2>&1
echo "tests/kernels fused rc=$?" >> "$OUT/tests_fused.tmp"
{ echo; echo "===== DGP_TRITON_FUSE=1"; cat "$OUT/tests_fused.tmp"; } >> "$OUT/tests_kernels.log"
rm -f "$OUT/tests_fused.tmp"
tail -4 "$OUT/tests_kernels.log"

wait $BUILD
tail -2 "$OUT/build.log"
stamp "build done"

stamp "bench_triton (ours vs authors vs topk vs clone), then with fused tails"
timeout 60 $PY bench/bench_triton.py --reps 20 > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
cat "$OUT/bench.log" | tail -40
echo "===== DGP_TRITON_FUSE=1" >> "$OUT/bench.log"
DGP_TRITON_FUSE=1 timeout 60 $PY bench/bench_triton.py --reps 20 >> "$OUT/bench.log" 2>&1
echo "bench fused rc=$?" >> "$OUT/bench.log"
grep -E "ours" "$OUT/bench.log" | tail -16
if [ "${NCU:-0}" != 1 ]; then
  stamp "bench_triton with CUDA graphs (DGP_CUDA_GRAPHS=1), unfused then fused"
  DGP_CUDA_GRAPHS=1 timeout 60 $PY bench/bench_triton.py --reps 20 > "$OUT/bench_graphs.log" 2>&1
  echo "bench graphs rc=$?" >> "$OUT/bench_graphs.log"
  echo "===== DGP_TRITON_FUSE=1" >> "$OUT/bench_graphs.log"
  DGP_TRITON_FUSE=1 DGP_CUDA_GRAPHS=1 timeout 60 $PY bench/bench_triton.py --reps 20 >> "$OUT/bench_graphs.log" 2>&1
  echo "bench graphs fused rc=$?" >> "$OUT/bench_graphs.log"
  grep -E "^#|ours" "$OUT/bench_graphs.log" | tail -24
fi

stamp "gpu_profile (copy ceiling, per-kernel times, knob sweep incl. FUSE_TAILS)"
timeout 200 $PY bench/gpu_profile.py --reps 20 --json "$OUT/profile.json" > "$OUT/profile.log" 2>&1
echo "profile rc=$?" >> "$OUT/profile.log"
cat "$OUT/profile.log" | tail -40

stamp "C++-kernel comparisons, compressors on CUDA, ops on CUDA (torch.compile included), CUDA graphs on"
DGP_CUDA_GRAPHS=1 timeout 80 $PY -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_triton_select.py::test_matches_cpp_kernel \
  tests/compressor/test_cuda.py tests/ops/test_select.py tests/ops/test_select_errors.py \
  -k "matches_cpp_kernel or cuda" > "$OUT/tests_more.log" 2>&1
echo "tests_more rc=$?" >> "$OUT/tests_more.log"
tail -4 "$OUT/tests_more.log"
stamp "ncu: one 25M select_ef_multi call (gather, refine, write kernels)"
NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${NCU:-0}" = 1 ] && [ -n "$NCU_BIN" ]; then
  timeout 90 "$NCU_BIN" --clock-control none --launch-skip 21 --launch-count 7 \
    -k regex:'_gather_kernel|_refine_kernel|_write_kernel' \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    $PY -c "import torch, dgp_kernels
g = torch.randn(25_000_000, device='cuda'); e = torch.zeros_like(g)
for _ in range(4): dgp_kernels.select_ef_multi([g], [e], 0.05, 0.2)
torch.cuda.synchronize()" > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?" >> "$OUT/ncu.txt"
  grep -E "_kernel|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|ncu rc" "$OUT/ncu.txt" | head -60
fi
stamp "done"
