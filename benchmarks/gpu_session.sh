#!/usr/bin/env bash
# One GPU session's measurements, most important first (each part writes its JSON as it goes, so a session cut
# short keeps what finished): the batch-2 levers against the 3x target, with a profile of each, then the table's
# missing cells. Usage, from the repository root on the GPU machine (wheels: see benchmarks/README.md):
#   bash benchmarks/gpu_session.sh OUT_DIR
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/bench_gpu.py --batches 2 --variants eager-bf16 compiled-bf16 cudagraphs-bf16 \
    --profile 5 --timeout 170 --out "$out/gpu_loop.json"
python3 benchmarks/bench_gpu.py --batches 2 --variants eager-fp32 cudagraphs-fp32 --timeout 170 --append --out "$out/gpu_loop.json"
python3 benchmarks/bench_gpu.py --batches 8 32 --variants cudagraphs-bf16 compiled-bf16 --timeout 200 --append --out "$out/gpu_loop.json"
