#!/usr/bin/env bash
# KV pooling on one GPU shared by DP instances (MPS, CUDA-IPC routing): the longest request the
# DCP server accepts (more than one instance's KV) is served; static DP with the same flags must
# refuse it. Qwen3-30B-A3B config, dummy weights, eager (the prompt's sharded prefill is eager
# anyway). KV per instance: KV (default 65536 on a >= 120 GB GPU, else 16384); the prompt's
# prefill time, not memory, bounds it within one device call (~1.5 min of prefill at 128k).
# Bundle: EXTRA="msgspec httpx httpcore h11 anyio sniffio certifi idna" bash ../shared/gpu/bundle.sh
#   source .gpu/env.sh && bash benchmark/gpu/kv_pooling.sh
set -eu
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
DP=${DP:-2}
TOTAL_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$TOTAL_MB" -gt 120000 ]; then KV=${KV:-65536}; else KV=${KV:-16384}; fi
GPU=$(python -c "from benchmark.common import gpu_tag; print(gpu_tag())")
source benchmark/gpu/mps.sh
python -m benchmark.kv_pooling --server --tag "${GPU}x1_dp${DP}" --out-tokens 32 --server-args \
  "--model-path benchmark/configs/qwen3-30b-a3b --device cuda --dp-size $DP --ep-size $DP \
   --load-format dummy --skip-tokenizer-init --dtype bfloat16 --attention-backend triton \
   --moe-a2a-backend ipc --disable-cuda-graph --max-total-tokens $KV --context-length $((KV * DP)) \
   --chunked-prefill-size 8192" > "$OUT/kv_pooling.log" 2>&1 || echo "kv_pooling failed (rc=$?)"
tail -4 "$OUT/kv_pooling.log"
cp benchmark/results/kv_pooling_"${GPU}"x1_dp"${DP}".json /tmp/nanocp-kv-pooling-*.log "$OUT/" 2>/dev/null || true
