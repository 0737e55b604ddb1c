#!/usr/bin/env bash
# One lent-GPU session (issue 4) in two calls of under 10 minutes each: build the C++
# extension, run every CUDA test, then the benchmarks, each step capped so a failure never
# hides the others.
#
#   OUT=/tmp/gpu_out bash bench/gpu_session.sh tests   # ~5 min: CUDA tests, default + fused
#   OUT=/tmp/gpu_out bash bench/gpu_session.sh bench   # ~5 min: bench with variants, profile
#   OUT=/tmp/gpu_out bash bench/gpu_session.sh all     # both (over 10 minutes)
#
# Runs in the repository root with the machine's own python3/torch/triton (no install:
# the package is imported from the checkout via PYTHONPATH). Logs land in $OUT (at most
# 8 files): env.txt build.log, then tests_kernels.log tests_more.log (tests), bench.log
# profile.log profile.json (bench). NCU=1 adds ncu.txt (bench).
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET DGP_TRITON_FUSE DGP_CUDA_GRAPHS
PY=python3
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; uname -r; git log --oneline -1 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "build dgp_kernels._C in the background"
( MAX_JOBS=16 timeout 240 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$?" >> "$OUT/build.log" ) &
BUILD=$!

if [ "$PART" = tests ] || [ "$PART" = all ]; then
  # tests/kernels forces every boundary path, fused tails and persistent passes itself
  # (the forced_path fixture); the second run makes fused tails the default for the tests
  # that do not take that fixture.
  stamp "tests/kernels on CUDA tensors (8 workers)"
  { echo "===== defaults"
    timeout 220 $PY -m pytest -q -n 8 -p no:cacheprovider tests/kernels \
      -k "not compile_for_sm90 and not matches_cpp_kernel" 2>&1
    echo "tests/kernels rc=$?"; } >> "$OUT/tests_kernels.log"
  tail -3 "$OUT/tests_kernels.log"
  stamp "tests/kernels without the forced_path fixture, DGP_TRITON_FUSE=1"
  { echo "===== DGP_TRITON_FUSE=1"
    DGP_TRITON_FUSE=1 timeout 90 $PY -m pytest -q -n 8 -p no:cacheprovider tests/kernels \
      -k "not compile_for_sm90 and not matches_cpp_kernel and not every_boundary_path and not random_configurations and not nan_raises" 2>&1
    echo "tests/kernels fused rc=$?"; } >> "$OUT/tests_kernels.log"
  tail -3 "$OUT/tests_kernels.log"
  wait $BUILD
  tail -2 "$OUT/build.log"
  stamp "C++-kernel comparisons, compressors on CUDA, ops on CUDA (torch.compile included), CUDA graphs on"
  DGP_CUDA_GRAPHS=1 timeout 90 $PY -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_triton_select.py::test_matches_cpp_kernel \
    tests/compressor/test_cuda.py tests/ops/test_select.py tests/ops/test_select_errors.py \
    tests/codec/test_accumulate_device.py \
    -k "matches_cpp_kernel or cuda" > "$OUT/tests_more.log" 2>&1
  echo "tests_more rc=$?" >> "$OUT/tests_more.log"
  tail -4 "$OUT/tests_more.log"
  stamp "dgp bench --gpu on (the CLI's CPU table, then the GPU benchmark), small"
  { echo "===== dgp bench --gpu on --quick --threads 16 --size 2000000"
    timeout 120 $PY -m dgp_kernels.cli bench --gpu on --quick --threads 16 --size 2000000 2>&1 | tail -40
    echo "dgp bench rc=${PIPESTATUS[0]}"; } >> "$OUT/tests_more.log"
  tail -3 "$OUT/tests_more.log"
fi

if [ "$PART" = bench ] || [ "$PART" = all ]; then
  wait $BUILD
  tail -2 "$OUT/build.log"
  stamp "bench_triton: ours (default and variants) vs authors vs topk vs clone, one process"
  timeout 180 $PY bench/bench_triton.py --reps 20 \
    --variant graphs:USE_CUDA_GRAPHS=1 \
    --variant fused:FUSE_TAILS=1 \
    --variant fused+graphs:FUSE_TAILS=1,USE_CUDA_GRAPHS=1 \
    --variant fused+graphs+wreg80:FUSE_TAILS=1,USE_CUDA_GRAPHS=1,WRITE_MAXNREG=80 \
    --variant persist:FUSE_TAILS=1,PERSISTENT=3,BLOCK=1024 \
    --variant persist+graphs:FUSE_TAILS=1,PERSISTENT=3,BLOCK=1024,USE_CUDA_GRAPHS=1 \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$?" >> "$OUT/bench.log"
  grep -E "^#|ours|x\*\*" "$OUT/bench.log" | tail -60

  stamp "gpu_profile (copy ceiling, per-kernel times, knob sweep with kernel device times)"
  timeout 280 $PY bench/gpu_profile.py --reps 20 --json "$OUT/profile.json" > "$OUT/profile.log" 2>&1
  echo "profile rc=$?" >> "$OUT/profile.log"
  cat "$OUT/profile.log" | tail -60

  NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ "${NCU:-0}" = 1 ] && [ -n "$NCU_BIN" ]; then
    stamp "ncu: one 25M select_ef_multi call (gather, refine, write kernels)"
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
fi
wait
stamp "done"
