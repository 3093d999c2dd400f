#!/usr/bin/env bash
# ONE script for a lent H100/H200 (the device image has torch, cupy, transformers, pytest): the `gpu` tests,
# then benchmarks/gpu_check.py (experiments 1-3 in-process on the built-in ~1B Llama in bf16, and
# transformers' continuous batching side by side). Budget: under 6 minutes. Results go to $OUT when the
# device tool provides it, else benchmarks/results/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLOVER_HOME=${FLOVER_HOME:-/tmp/flover-home}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 250 python3 -m benchmarks.gpu_check --out "$out" 2>&1 | tee "$out/gpu_check.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, gpu_check exit $bench"
exit $(( tests || bench ))
