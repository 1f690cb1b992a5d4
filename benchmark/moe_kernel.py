"""Fused MoE layer latency (GPU): the Triton grouped GEMM vs the per-expert torch loop, for 1-1024
tokens with the Qwen3-30B-A3B expert shape (128 experts, top-8, hidden 2048, inter 768, bf16),
against the memory roofline (touched experts' weights / copy bandwidth). --sweep times every
launch config of the grouped GEMM per token count (to tune nanocp_kernels.fused_moe.CONFIGS).

    python -m benchmark.moe_kernel --sweep
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch

from benchmark.attention_bandwidth import graph_time
from benchmark.common import RESULTS, environment, gpu_tag, write_json
from benchmark.decode_step import copy_bandwidth
from nanocp_kernels import fused_moe as fm
from nanocp_kernels.reference import fused_moe_ref


def inputs(t: int, e: int = 128, k: int = 8, h: int = 2048, inter: int = 768):
    dev = torch.device("cuda")
    x = torch.randn(t, h, dtype=torch.bfloat16, device=dev)
    w13 = torch.randn(e, 2 * inter, h, dtype=torch.bfloat16, device=dev) / h**0.5
    w2 = torch.randn(e, h, inter, dtype=torch.bfloat16, device=dev) / inter**0.5
    w, ids = torch.softmax(torch.randn(t, e, device=dev), -1).topk(k, dim=-1)
    return x, w13, w2, w.to(torch.bfloat16), ids


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 1024])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    bw = copy_bandwidth(torch.device("cuda"))
    rows = []
    for t in args.tokens:
        x, w13, w2, w, ids = inputs(t)
        touched = ids.unique().numel()
        roof = touched * (w13[0].numel() + w2[0].numel()) * 2 / bw
        row = {"tokens": t, "experts_touched": touched, "roofline_s": roof}
        run = functools.partial(fm.fused_moe, x, w13, w2, w, ids)
        row["triton_s"] = graph_time(run, 10)
        if t <= 256:
            fused_moe_ref(x, w13, w2, w, ids)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fused_moe_ref(x, w13, w2, w, ids)
            end.record()
            torch.cuda.synchronize()
            row["torch_loop_s"] = start.elapsed_time(end) / 5e3
        if args.sweep:
            saved = dict(fm.CONFIGS)
            best = None
            for bn, bk, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4)):
                bm = fm._block_sizes(t * 8, 128)[0]
                fm.CONFIGS.clear()
                fm.CONFIGS[1 << 30] = (bm, bn, bk, warps, stages)
                try:
                    s = graph_time(run, 10)
                except Exception:  # noqa: BLE001 (a config the compiler rejects: out of shared memory)
                    continue
                if best is None or s < best[0]:
                    best = (s, (bm, bn, bk, warps, stages))
            fm.CONFIGS.clear()
            fm.CONFIGS.update(saved)
            row["best_s"], row["best_config"] = best
        row["triton_pct_of_roofline"] = 100 * roof / row["triton_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    tag = args.tag or gpu_tag()
    result = {"benchmark": "moe_kernel", **environment("cuda"), "copy_bandwidth_Bps": bw, "rows": rows}
    write_json(RESULTS / f"moe_kernel_{tag}.json", result)
    return result


if __name__ == "__main__":
    main()
