#!/usr/bin/env bash
# Context-parallel decode on the GPU machine, from the project root (~3-4 min on one H200):
#   source .gpu/env.sh && bash benchmark/gpu/dcp_check.sh
# GPU tests of the graph-captured DCP / IPC paths against their oracles (servers vs HF fp32,
# GraphDCP vs unsharded attention, IPC MoE vs the single-rank reference), then the foreign
# attention of one layer by split count (benchmark.foreign_attention). With fewer GPUs than
# ranks the multi-rank tests share a GPU, under MPS (time-sliced spin waits cost ~2 ms each).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmark/gpu/mps.sh
python -m pytest -q -p no:cacheprovider test/test_dcp_graph.py test/test_ipc_moe.py test/test_ipc_comm.py \
  test/test_triton_attention.py test/test_multi_instance_gpu.py > "$OUT/pytest_dcp.log" 2>&1
echo "pytest: $(tail -1 "$OUT/pytest_dcp.log")"
GPU=$(python -c "from benchmark.common import gpu_tag; print(gpu_tag())")
python -m benchmark.foreign_attention --world 2 --cap 64 --tag "$GPU" > "$OUT/foreign_attention.log" 2>&1
echo "foreign_attention rc=$?"; tail -3 "$OUT/foreign_attention.log"
cp benchmark/results/foreign_attention_"$GPU".* "$OUT/" 2>/dev/null || true
