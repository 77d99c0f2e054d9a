#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU and torch/triton/transformers installed: the GPU
# tests, then `afd bench` on CUDA (MoE kernels, monolithic decode: CUDA-graph compiled vs eager vs
# transformers). Results go to $OUT (default benchmarks/results). Each part is time-boxed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', t.__version__, torch.cuda.get_device_name())"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_triton_moe.py tests/test_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.log"
timeout 120 python3 -m afd_compile bench --scenario moe --device cuda --dtype bfloat16 --repeats 20 \
    --out "$OUT/moe_cuda.json"
timeout "${BENCH_TIMEOUT:-240}" python3 -m afd_compile bench --scenario monolithic --device cuda \
    --batch-sizes 1,16,64 --repeats 3 --out "$OUT/monolithic_cuda.json"
