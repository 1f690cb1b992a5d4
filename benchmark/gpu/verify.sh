#!/usr/bin/env bash
# First calls of a device session (one GPU is enough): the GPU tests of what changed since the
# last verified run, DeepEP in graphs, and the single-GPU decode benchmark. One part per device
# call keeps each under 10 minutes. From the project root:
#   source .gpu/env.sh && bash benchmark/gpu/verify.sh kernels|multi|deepep|decode
# Logs go to $OUT (default /tmp/out); prints one summary line. The multi part's tests use the openai
# client: bundle it too (EXTRA="msgspec openai distro jiter sniffio anyio httpx httpcore h11 httpx2 httpcore2 idna truststore" bash ../shared/gpu/bundle.sh).
set -u
PART=${1:?usage: verify.sh kernels|multi|deepep|decode}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "$PART" in
  kernels)  # fused kernels, fused MoE, dispatch packing, Triton backend + graphs vs HF (fp32)
    timeout 560 python -m pytest -q -p no:cacheprovider test/test_elementwise_kernels.py \
      test/test_fused_moe.py test/test_dispatch_kernel.py test/test_triton_attention.py \
      test/test_cuda_graph.py test/test_flashinfer_attention.py test/test_small_batch_kernels.py \
      > "$OUT/pytest_kernels.log" 2>&1 ;;
  multi)  # instances sharing the GPU: IPC MoE layer, DCP + EP servers (graphs) vs HF
    timeout 560 python -m pytest -q -p no:cacheprovider test/test_ipc_moe.py \
      test/test_multi_instance_gpu.py > "$OUT/pytest_multi.log" 2>&1 ;;
  deepep)  # DeepEP built from the bundled source, then its engine test (graph replays vs eager)
    source .gpu/deepep_build.sh > "$OUT/deepep_build.log" 2>&1
    timeout 300 python -m pytest -q -p no:cacheprovider test/test_deepep.py > "$OUT/pytest_deepep.log" 2>&1 ;;
  decode)  # decode step vs roofline (Triton backend, CUDA graphs), side by side in one call:
    # before the decode-batch kernels, with them, and with PDL too (decode_step_{base,sbk,sbk_pdl}_<gpu>)
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
    B="python -m benchmark.decode_step --model-path benchmark/configs/qwen3-30b-a3b --load-format dummy
       --attention-backend triton --batch 1 2 4 8 --context 1024 8192 32768 131072"
    { NANOCP_SMALL_BATCH_KERNELS=0 NANOCP_PDL=0 timeout 180 $B --tag "base_$GPU"
      NANOCP_PDL=0 timeout 180 $B --tag "sbk_$GPU"
      timeout 180 $B --tag "sbk_pdl_$GPU"; } > "$OUT/decode_step.log" 2>&1
    cp benchmark/results/decode_step_{base,sbk,sbk_pdl}_"$GPU".json "$OUT/" 2>/dev/null ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
RC=$?
LOG=$(ls -t "$OUT"/pytest_"$PART".log "$OUT"/decode_step.log 2>/dev/null | head -1)
echo "$PART rc=$RC: $(tail -1 "$LOG" 2>/dev/null)"
