#!/usr/bin/env bash
# Modes of benchmark.compare on the GPU machine with decode from CUDA graphs (EP exchanges and
# DCP routing inside), Qwen3-30B-A3B config with dummy weights, one instance per GPU. Each mode is
# its own compare run (--only), so results accumulate in the same tag and a call cut short keeps
# the modes it finished; "all" = none dynamic uniform (2 rates: ~5 min on 2x H200).
#   source .gpu/env.sh && bash benchmark/gpu/compare_suite.sh none|uniform|dynamic|all ...
# Knobs (env): DP (default: number of GPUs), RATES, SLO_MS, DURATION, TAG, A2A (ipc or deepep),
# LIMIT_S (stop each mode's compare after this many seconds, keeping what it wrote; 0: none),
# CHUNK (--chunked-prefill-size, 4096: every instance's decoders wait for a prefill chunk in
# lockstep, 0.3-0.7 s for 4k tokens after a 20-30k prefix on 2x H200).
# DP above the GPU count puts instances on shared GPUs (IPC exchanges; DP=2 on one H200 fits,
# ~57 GB per instance with this KV budget). Those need MPS: time-sliced processes make every
# exchange inside a graph cost a ~2 ms slice (one mode took 422 s for one 15 s rate,
# 2026-11-24), so the script starts an MPS daemon for them and stops it at the end.
set -eu
[ $# -gt 0 ] || { echo "usage: compare_suite.sh none|uniform|dynamic|all ..." >&2; exit 2; }
MODES="$*"
[ "$MODES" = all ] && MODES="none dynamic uniform"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
GPUS=$(nvidia-smi -L | wc -l)
DP=${DP:-$GPUS}
A2A=${A2A:-ipc}
RATES=${RATES:-4 8 16}
TAG=${TAG:-h200x${DP}_dp${DP}_graphs_${A2A}}
[ "$A2A" = deepep ] && source .gpu/deepep_build.sh > "$OUT/deepep_build.log" 2>&1
if [ "$DP" -gt "$GPUS" ]; then source benchmark/gpu/mps.sh; fi
for MODE in $MODES; do
  timeout "${LIMIT_S:-0}" python -m benchmark.compare --model-path benchmark/configs/qwen3-30b-a3b --device cuda --dp-size "$DP" \
    --max-total-tokens 262144 --chunked-prefill-size ${CHUNK:-4096} --mix chat-docs-medium \
    --rates $RATES --timeline-rate "${RATES%% *}" --duration ${DURATION:-20} --min-requests 32 \
    --tpot-slo-ms ${SLO_MS:-50} --ttft-slo-s 10 --tag "$TAG" --only "$MODE" \
    --server-args="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --attention-backend triton \
    --moe-a2a-backend $A2A --cuda-graph-max-bs 64" > "$OUT/compare_$MODE.log" 2>&1 || true
  tail -5 "$OUT/compare_$MODE.log"
  cp benchmark/results/compare_"$TAG".* "$OUT/" 2>/dev/null || true
  tar -czf "$OUT/traces.tgz" /tmp/nanocp-compare-traces /tmp/nanocp-compare-*.log 2>/dev/null || true
done
