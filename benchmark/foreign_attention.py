"""Context-parallel decode inside CUDA graphs: the foreign attention of one layer, by split count.

In a graph-captured DCP decode step (nanocp.distributed.dcp_graph.GraphDCP) each holder attends
the queries its peers sent (W x C fixed query slots, most of them empty) against the shards of
KV it holds. This times that call (`GraphDCP._foreign_attention`, one layer) from a CUDA graph
with the split count GraphDCP picks and with one split (what it picked before 47e7ff5: the
splits were sized for all W x C slots), for `--queries` foreign requests of `--shard` keys each.
Both must give the same output (checked on every point). Shape: Qwen3-30B-A3B attention, bf16.

    python -m benchmark.foreign_attention --world 2 --cap 64 --queries 1 2 4 8 --shard 8192 32768 131072
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmark.common import RESULTS, environment, gpu_tag, log_axes, pyplot, save_figure, write_json

HEADS = (32, 4, 128)  # q heads, KV heads, head dim


def scenario(
    world: int, cap: int, queries: int, shard: int, heads=HEADS, device="cuda", dtype=torch.bfloat16
):
    """A GraphDCP whose step has `queries` foreign queries (one per request, spread over the
    peers' blocks) of `shard` keys each, and the inputs of its foreign attention."""
    from nanocp.distributed.dcp_graph import GraphDCP

    hq, hkv, d = heads
    dev = torch.device(device)
    num_slots = queries * shard + 1
    g = GraphDCP(0, world, None, dev, cap, num_slots, num_slots - 1, hq, hkv, d, dtype, comm=object())
    slots = [(i % world) * cap + i // world for i in range(queries)]  # slot of query i
    lens = torch.zeros(world * cap, dtype=torch.int64)
    lens[slots] = shard
    g.f_kv_indptr[1:].copy_(lens.cumsum(0))
    g.f_kv_indices[: queries * shard].copy_(torch.arange(queries * shard))
    g.f_kv_pos[: queries * shard].copy_(torch.arange(shard).repeat(queries))
    g.f_q_pos.zero_()[slots] = shard  # every key visible
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(world * cap, hq, d, generator=gen, device=dev).to(dtype)
    k = torch.randn(num_slots, hkv, d, generator=gen, device=dev).to(dtype)
    v = torch.randn(num_slots, hkv, d, generator=gen, device=dev).to(dtype)
    return g, (q, k, v, d**-0.5), slots


def foreign(g, inputs, splits: int):
    """The foreign attention over g's step with `splits` KV splits (GraphDCP._foreign_attention's
    kernel call on CUDA, here with any split count and on CPU too, through Triton's interpreter)."""
    from nanocp_kernels.attention import paged_attention

    q, k, v, scale = inputs
    meta = (g.f_q_seq, g.f_kv_indptr, g.f_kv_indices, g.f_q_pos, g.f_kv_pos)
    return paged_attention(q, k, v, *meta, scale, num_splits=splits)


def max_diff(g, inputs, slots: list[int], splits: int) -> float:
    """Largest difference between `splits` splits and one split over the slots holding a query
    (empty slots must stay empty: lse -inf in both)."""
    o_new, lse_new = foreign(g, inputs, splits)
    o_old, lse_old = foreign(g, inputs, 1)
    assert torch.equal(torch.isinf(lse_new), torch.isinf(lse_old)), "empty slots differ"
    assert not torch.isinf(lse_new[slots]).any(), "a slot with keys came out empty"
    return max(
        (o_new[slots].float() - o_old[slots].float()).abs().max().item(),
        (lse_new[slots] - lse_old[slots]).abs().max().item(),
    )


def measure(world: int, cap: int, queries: int, shard: int, reps: int) -> dict:
    from benchmark.attention_bandwidth import graph_time

    g, inputs, slots = scenario(world, cap, queries, shard)
    picked = g.foreign_splits
    row = {"world": world, "cap": cap, "queries": queries, "shard_tokens": shard, "splits": picked}
    row["max_abs_diff"] = max_diff(g, inputs, slots, picked)
    kv_bytes = queries * shard * HEADS[1] * HEADS[2] * 2 * 2
    for name, splits in (("picked", picked), ("one_split", 1)):
        g.foreign_splits = splits  # the real call, as a captured decode step makes it
        row[f"{name}_us"] = 1e6 * graph_time(lambda: g._foreign_attention(*inputs), reps)
        row[f"{name}_GBps"] = kv_bytes / row[f"{name}_us"] / 1e3
    g.foreign_splits = picked
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--cap", type=int, default=64, help="query slots per peer (the graph's max batch)")
    p.add_argument("--queries", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--shard", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    rows = []
    for shard in args.shard:
        for queries in args.queries:
            rows.append(measure(args.world, args.cap, queries, shard, args.reps))
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                flush=True,
            )
    tag = args.tag or gpu_tag()
    result = {
        "benchmark": "foreign_attention",
        **environment("cuda"),
        "command": f"{vars(args)}",
        "rows": rows,
    }
    write_json(RESULTS / f"foreign_attention_{tag}.json", result)
    plot(result, RESULTS / f"foreign_attention_{tag}.png")
    return result


def plot(result: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for shard in sorted({r["shard_tokens"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["shard_tokens"] == shard]
        for key, style in (("picked_us", "o-"), ("one_split_us", "s--")):
            label = f"{shard // 1024}k keys, {'picked splits' if key == 'picked_us' else 'one split'}"
            ax.plot([r["queries"] for r in rs], [r[key] for r in rs], style, label=label)
    log_axes(
        ax,
        "foreign queries in the step",
        "us per layer",
        f"DCP foreign attention in a CUDA graph, {result['device']}",
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
