#!/usr/bin/env bash
# Multi-GPU checks and micro-benchmarks on the GPU machine (2+ GPUs), from the project root:
#   source .gpu/env.sh && bash benchmark/gpu/multi_gpu_suite.sh
# GPU tests (IPC exchange across GPUs, IPC MoE, DCP/ipc servers, DeepEP), DeepEP's own 2-rank
# low-latency test, routing backend vs NCCL, per-layer MoE time per backend. Logs and results
# go to $OUT (default /tmp/out). test_multi_instance_gpu needs the openai client in the bundle:
#   EXTRA="msgspec openai distro jiter sniffio anyio httpx httpcore h11 httpx2 httpcore2 idna truststore" bash ../shared/gpu/bundle.sh
# (the device returns at most 8 files from $OUT: results are copied, logs go in one tarball).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
( source .gpu/deepep_build.sh > "$OUT/logs/deepep_build.log" 2>&1 ) &   # ~70 s, beside the tests
BUILD=$!
nvidia-smi topo -m > "$OUT/logs/topo.txt" 2>&1
python -m pytest -q -p no:cacheprovider test/test_ipc_comm.py test/test_ipc_moe.py \
  test/test_triton_attention.py test/test_cuda_graph.py test/test_multi_instance_gpu.py > "$OUT/logs/pytest_gpu.log" 2>&1
echo "pytest: $(tail -1 "$OUT/logs/pytest_gpu.log")"
python -m benchmark.routing_latency --world 2 > "$OUT/logs/routing_latency.log" 2>&1
echo "routing_latency rc=$?"
wait $BUILD
source .gpu/deepep_build.sh > /dev/null 2>&1
python -m pytest -q -p no:cacheprovider test/test_deepep.py > "$OUT/logs/pytest_deepep.log" 2>&1
echo "deepep pytest: $(tail -1 "$OUT/logs/pytest_deepep.log")"
( cd /tmp/deepep && timeout 180 python tests/test_low_latency.py --num-processes 2 --num-tokens 128 \
    --hidden 2048 --num-topk 8 --num-experts 128 ) > "$OUT/logs/deepep_ll_test_2ranks.log" 2>&1
echo "deepep low-latency test (2 ranks) rc=$?"
python -m benchmark.moe_comm_latency --world 2 > "$OUT/logs/moe_comm_latency.log" 2>&1
echo "moe_comm_latency rc=$?"
python -m benchmark.ep_decode_step --world 2 --backends all_to_all ipc deepep --batch 1 8 32 64 \
  --context 4096 --tag h200x2 > "$OUT/logs/ep_decode_step.log" 2>&1
echo "ep_decode_step rc=$?"
cp benchmark/results/routing_latency_h200x2.* benchmark/results/moe_comm_latency_h200x2.* \
  benchmark/results/ep_decode_step_h200x2.* "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
