"""Sharded decode attention: effective bandwidth per GPU vs context length, for CP degree 1/2/4.

A request of context C sharded over d instances leaves C/d tokens of KV on each; every holder runs
FlashInfer batch decode (with LSE) over its shard and the home merges d partial (o, lse). One GPU
measures one holder: time = decode over the shard + the merge of d partials; effective bandwidth
= shard KV bytes / time, compared with the device's measured copy bandwidth (read + write).
To keep the GPU busy at short contexts, B = max(1, --total-kv // C) requests run together.
Kernels run from CUDA graphs (--reps calls per replay), so launch overhead is not counted.
Shape: Qwen3-30B-A3B attention (32 q heads, 4 KV heads, head dim 128), bf16, one layer.

    python -m benchmark.attention_bandwidth --context 1024 4096 16384 65536 262144 524288
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmark.common import RESULTS, environment, gpu_tag, pyplot, save_figure, write_json
from benchmark.decode_step import copy_bandwidth
from nanocp_kernels.merge import merge_states


def graph_time(fn, reps: int) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * reps)


def measure(context: int, degree: int, total_kv: int, page: int, reps: int, heads=(32, 4, 128)) -> dict:
    import flashinfer

    hq, hkv, d = heads
    dev = torch.device("cuda")
    batch = max(1, total_kv // context)
    shard = context // degree
    pages_per_req = -(-shard // page)
    num_pages = batch * pages_per_req
    kv = torch.randn(num_pages, 2, page, hkv, d, dtype=torch.bfloat16, device=dev)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=dev)
    indptr = torch.arange(0, num_pages + 1, pages_per_req, dtype=torch.int32, device=dev)
    indices = torch.arange(num_pages, dtype=torch.int32, device=dev)
    last = torch.full((batch,), shard - (pages_per_req - 1) * page, dtype=torch.int32, device=dev)
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last,
    )  # fmt: skip
    w.plan(indptr, indices, last, hq, hkv, d, page, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    attn_s = graph_time(lambda: w.run(q, kv, return_lse=True), reps)
    parts_o = torch.randn(degree, batch, hq, d, dtype=torch.bfloat16, device=dev)
    parts_lse = torch.randn(degree, batch, hq, dtype=torch.float32, device=dev)
    merge_s = (
        graph_time(lambda: merge_states(parts_o, parts_lse, backend="triton"), reps) if degree > 1 else 0.0
    )
    shard_bytes = batch * shard * hkv * d * 2 * 2
    return {
        "context": context,
        "degree": degree,
        "batch": batch,
        "shard_tokens": shard,
        "attention_s": attn_s,
        "merge_s": merge_s,
        "effective_Bps": shard_bytes / (attn_s + merge_s),
        "attention_only_Bps": shard_bytes / attn_s,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144, 524288])
    p.add_argument("--degree", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--total-kv", type=int, default=524288, help="KV tokens per shard set (batch = this / context)"
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    bw = copy_bandwidth(torch.device("cuda"))
    rows = []
    for context in args.context:
        for degree in args.degree:
            r = measure(context, degree, args.total_kv, args.page_size, args.reps)
            r["pct_of_copy"] = 100 * r["effective_Bps"] / bw
            rows.append(r)
            print(
                json.dumps({k: round(v, 7) if isinstance(v, float) else v for k, v in r.items()}), flush=True
            )
    tag = args.tag or gpu_tag()
    result = {
        "benchmark": "attention_bandwidth",
        **environment("cuda"),
        "copy_bandwidth_Bps": bw,
        "rows": rows,
    }
    write_json(RESULTS / f"attention_bandwidth_{tag}.json", result)
    plot(result, tag)
    return result


def plot(result: dict, tag: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for degree in sorted({r["degree"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["degree"] == degree]
        ax.plot(
            [r["context"] for r in rs], [r["pct_of_copy"] for r in rs], marker="o", label=f"degree {degree}"
        )
    ax.axhline(85, color="grey", ls="--", lw=0.8, label="goal 85%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("effective bandwidth, % of copy")
    ax.set_title(
        f"Sharded decode attention + LSE merge, {result['device']}\n(copy {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s; "
        "Qwen3-30B-A3B heads, bf16, FlashInfer decode, Triton merge)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    save_figure(fig, RESULTS / f"attention_bandwidth_{tag}.png")


if __name__ == "__main__":
    main()
