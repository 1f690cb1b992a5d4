#!/usr/bin/env bash
# Graph decode and context-parallel decode on the GPU machine, from the project root (~5-6 min
# on one H100):
#   source .gpu/env.sh && bash benchmark/gpu/dcp_check.sh   (bundle: EXTRA as verify.sh says: openai needs httpx2)
# GPU tests of the graph-captured decode / DCP / IPC paths against their oracles (servers and
# graph decode vs HF fp32, GraphDCP vs unsharded attention, BalancedDecode vs the torch reference,
# IPC MoE vs the single-rank reference), then one layer's attention: DCP's foreign attention
# (benchmark.foreign_attention) and decode on long-tail batches
# (benchmark.decode_attention_longtail), balanced vs fixed splits. With fewer GPUs than ranks
# the multi-rank tests share a GPU, under MPS (time-sliced spin waits cost ~2 ms each).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmark/gpu/mps.sh
python -m pytest -q -p no:cacheprovider test/test_dcp_graph.py test/test_ipc_moe.py test/test_ipc_comm.py \
  test/test_triton_attention.py test/test_multi_instance_gpu.py test/test_cuda_graph.py -k "not flashinfer" \
  > "$OUT/pytest_dcp.log" 2>&1
echo "pytest: $(tail -1 "$OUT/pytest_dcp.log")"
GPU=$(python -c "from benchmark.common import gpu_tag; print(gpu_tag())")
for BENCH in foreign_attention decode_attention_longtail; do
  python -m benchmark.$BENCH --tag "$GPU" > "$OUT/$BENCH.log" 2>&1
  echo "$BENCH rc=$?"; tail -3 "$OUT/$BENCH.log"
  cp benchmark/results/"$BENCH"_"$GPU".* "$OUT/" 2>/dev/null || true
done
