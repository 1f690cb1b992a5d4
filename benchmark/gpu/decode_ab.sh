#!/usr/bin/env bash
# The decode step of an earlier commit and of the working tree side by side in one device call
# (decode_step_<tag>_{before,after}_<gpu>.{json,png}).
#   here:       bash benchmark/gpu/decode_ab.sh prepare <commit>     (archives it under .gpu/base)
#   on the GPU: source .gpu/env.sh && bash benchmark/gpu/decode_ab.sh run <tag> "<batches>" "<contexts>"
# (carry .gpu). Results are copied to $OUT; prints one line per (batch, context).
set -u
case "${1:-}" in
  prepare)
    rm -rf .gpu/base && mkdir -p .gpu/base
    git archive "${2:?commit}" python kernels router benchmark/*.py benchmark/configs benchmark/simulator \
      | tar -x -C .gpu/base && echo ".gpu/base: $(git rev-parse --short "$2")" ;;
  run)
    TAG=${2:?tag}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
    B="python -m benchmark.decode_step --model-path benchmark/configs/qwen3-30b-a3b --load-format dummy
       --attention-backend triton --batch ${3:-1 2 4 8} --context ${4:-1024 8192 32768}"
    (cd .gpu/base && PYTHONPATH=/tmp/site:$PWD/python:$PWD/kernels:$PWD/router timeout 200 $B \
      --tag "${TAG}_before_$GPU" > "$OUT/before.log" 2>&1; cp benchmark/results/decode_step_"${TAG}"_before_"$GPU".* "$OUT/")
    timeout 200 $B --tag "${TAG}_after_$GPU" > "$OUT/after.log" 2>&1
    cp benchmark/results/decode_step_"${TAG}"_after_"$GPU".* "$OUT/"
    python - "$OUT/decode_step_${TAG}_before_$GPU.json" "$OUT/decode_step_${TAG}_after_$GPU.json" <<'P'
import json, sys
a, b = (json.load(open(f))["rows"] for f in sys.argv[1:])
for ra, rb in zip(a, b):
    print(ra["batch"], ra["context"], "%.3f -> %.3f ms, %.1f -> %.1f %% of the roofline" % (
        ra["graph_s"] * 1e3, rb["graph_s"] * 1e3, ra["graph_pct_of_roofline"], rb["graph_pct_of_roofline"]))
P
    ;;
  *) echo "usage: decode_ab.sh prepare <commit> | run <tag> [batches] [contexts]"; exit 2 ;;
esac
