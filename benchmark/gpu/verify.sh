#!/usr/bin/env bash
# First call of a device session (one GPU is enough): the GPU tests of everything that changed
# since the last verified run, then the single-GPU decode benchmark. From the project root:
#   source .gpu/env.sh && bash benchmark/gpu/verify.sh
# Logs go to $OUT (default /tmp/out); prints one summary line per part.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
( source .gpu/deepep_build.sh > "$OUT/logs/deepep_build.log" 2>&1 ) &   # ~70 s, beside the tests
BUILD=$!
timeout 330 python -m pytest -q -p no:cacheprovider test/test_elementwise_kernels.py \
  test/test_fused_moe.py test/test_dispatch_kernel.py test/test_triton_attention.py test/test_cuda_graph.py test/test_ipc_moe.py \
  "test/test_multi_instance_gpu.py" > "$OUT/logs/pytest_gpu.log" 2>&1
echo "pytest: $(tail -1 "$OUT/logs/pytest_gpu.log")"
wait $BUILD
source .gpu/deepep_build.sh > /dev/null 2>&1
python -m pytest -q -p no:cacheprovider test/test_deepep.py > "$OUT/logs/pytest_deepep.log" 2>&1
echo "deepep pytest: $(tail -1 "$OUT/logs/pytest_deepep.log")"
timeout 240 python -m benchmark.decode_step --model-path benchmark/configs/qwen3-30b-a3b --load-format dummy \
  --attention-backend triton --batch 1 8 32 128 --context 1024 8192 --tag triton_fused \
  > "$OUT/logs/decode_step.log" 2>&1
echo "decode_step rc=$?"
cp benchmark/results/decode_step_triton_fused.* "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
