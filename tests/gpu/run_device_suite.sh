#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
# GPU suite on a machine where vLLM 0.26.0 lives in /tmp/site (the device
# kit, ../shared/device-kit). Applies the patch set there, runs the CUDA
# tests and benchmarks named as arguments (default: kernels engine
# bench_attention; any other argument is run as a shell command), logs
# under $OUT. KERNEL_RUNS=N runs the kernel tests N times in a row. Without
# -p no:logging, pytest prints torch's DEBUG trace, which pushed failures
# out of the logs' tails.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-test .whl/*.whl
  export PYTHONPATH=/tmp/site:/tmp/site-test
fi
python3 tools/patchset.py apply --target /tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
[ $# -gt 0 ] || set -- kernels engine bench_attention
index=0
for step in "$@"; do
  index=$((index + 1))
  echo "=== $step"
  case $step in
    kernels)
      for run in $(seq "${KERNEL_RUNS:-1}"); do
        echo "--- run $run"
        timeout 300 python3 -m pytest -q -s -p no:cacheprovider -p no:logging tests/kernels/test_trainable_attention.py -k cuda 2>&1 | grep -v "^$"
      done > "$OUT/kernels.log"
      grep -E "^--- run|passed|failed" "$OUT/kernels.log" ;;
    engine) timeout 480 python3 -m pytest -q -s -p no:cacheprovider -p no:logging tests/models/test_trainable_attention_engine.py tests/models/test_parallel_plans.py -k cuda 2>&1 | grep -v "^(EngineCore\|^(Worker\|^(MainProcess\|^INFO\|^WARNING\|^DEBUG" | tail -80 > "$OUT/engine.log" ;;
    # issue 20: torch.equal log-probabilities in the exact configuration
    # one process per model, as one trainer process holds one model: run
    # after the TorchTitan test in one process, the Megatron test differed
    exact) for model in torchtitan megatron; do
        timeout 420 python3 -m pytest -q -s -p no:cacheprovider -p no:logging tests/models/test_exact_logprobs.py -k "cuda and $model" 2>&1 | grep -v "^(EngineCore\|^(Worker\|^(MainProcess\|^INFO\|^WARNING\|^DEBUG" | tail -75
      done > "$OUT/exact.log" ;;
    # issue 21: pushes through a GPU buffer opened by CUDA IPC
    pushes) timeout 300 python3 -m pytest -q -s -p no:cacheprovider -p no:logging tests/models/test_weight_updates.py tests/model_executor/test_engine_weights.py tests/v1/engine/test_utility_call_without_waiting.py -k "cuda or without_waiting" 2>&1 | grep -v "^(EngineCore\|^(Worker\|^(MainProcess\|^INFO\|^WARNING\|^DEBUG" | tail -80 > "$OUT/pushes.log" ;;
    # issue 25: generic MoE blocks on vLLM's fused MoE layer (a device kit
    # built with --keep-moe: the default kit prunes vLLM's _moe_C)
    moe) timeout 300 python3 -m pytest -q -s -p no:cacheprovider -p no:logging tests/models/test_generic_moe.py -k "engine_matches or update or cuda" 2>&1 | grep -v "^(EngineCore\|^(Worker\|^(MainProcess\|^INFO\|^WARNING\|^DEBUG" | tail -40 > "$OUT/moe.log" ;;
    bench_attention) timeout 300 python3 benchmarks/benchmark_trainable_attention.py 2>&1 | tail -40 > "$OUT/bench_attention.log" ;;
    # two GPUs, one device call each: issue 11's bf16 parity at TP=2 and
    # at PP=2, and its throughput against native Llama at TP=2
    plans_parity)
      for sizes in "--tensor-parallel-size 2" "--tensor-parallel-size 1 --pipeline-parallel-size 2"; do
        timeout 280 python3 examples/offline_inference/parallel_plans/compare_parallel.py $sizes --tie-word-embeddings --native --dtype bfloat16 2>&1 | grep -v "WARNING\|Capturing CUDA\|Loading safetensors"
      done > "$OUT/plans_parity.log" ;;
    plans_throughput) timeout 560 python3 benchmarks/benchmark_parallel_plans.py --size 1b --tensor-parallel-size 2 --num-prompts 256 --input-len 128 --output-len 256 --rounds 20 --warmup-rounds 3 --gpu-memory-utilization 0.25 2>&1 | grep -v "Capturing CUDA\|Loading safetensors" > "$OUT/plans_throughput.log" ;;
    # numbered: two commands that start alike must not share a log
    *) timeout 500 bash -c "$step" > "$OUT/$index-$(echo "$step" | tr -c 'a-zA-Z0-9' _ | cut -c1-40).log" 2>&1 ;;
  esac
  tail -n 25 "$OUT"/*.log | tail -n 40
done
