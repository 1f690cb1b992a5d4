"""Context-parallel decode inside CUDA graphs: the foreign attention of one layer, three ways.

In a graph-captured DCP decode step (nanocp.distributed.dcp_graph.GraphDCP) each holder attends
the queries its peers sent (W x C fixed query slots, most of them empty) against the shards of
KV it holds. This times that call from a CUDA graph, for `--queries` foreign requests of
`--shard` keys each, as GraphDCP makes it (`balanced`: BalancedDecode, work planned per step
from the shard lengths) and as it made it before: `fixed_splits` (47e7ff5: `paged_attention`
over all W x C slots, KV splits sized for ~one query per peer within 64 MB of scratch) and
`one_split` (before 47e7ff5). All three must give the same output (checked on every point).
Shape: Qwen3-30B-A3B attention, bf16.

    python -m benchmark.foreign_attention --world 2 --cap 64 --queries 1 2 4 8 --shard 8192 32768 131072
"""

from __future__ import annotations

import argparse

import torch

from benchmark.common import log_axes, print_row, pyplot, save_figure, save_rows

HEADS = (32, 4, 128)  # q heads, KV heads, head dim
VARIANTS = ("balanced", "fixed_splits", "one_split")
OLD_SCRATCH_BYTES = 64 << 20  # fixed_splits: the split scratch 47e7ff5 allowed


def scenario(
    world: int, cap: int, queries: int, shard: int, heads=HEADS, device="cuda", dtype=torch.bfloat16
):
    """A GraphDCP loaded with a step of `queries` foreign queries (one per request, spread over
    the peers' blocks) of `shard` keys each, and the inputs of its foreign attention."""
    from nanocp.distributed.dcp_graph import GraphDCP

    hq, hkv, d = heads
    dev = torch.device(device)
    num_slots = queries * shard + 1
    g = GraphDCP(0, world, None, dev, cap, num_slots, num_slots - 1, hq, hkv, d, dtype, comm=object())
    slots = [(i % world) * cap + i // world for i in range(queries)]  # slot of query i
    lens = torch.zeros(world * cap, dtype=torch.int64)
    lens[slots] = shard
    g.f_kv_indptr = [0, *lens.cumsum(0).tolist()]
    g.foreign.plan(g.f_kv_indptr)
    g.f_kv_indices[: queries * shard].copy_(torch.arange(queries * shard))
    g.f_kv_pos[: queries * shard].copy_(torch.arange(shard).repeat(queries))
    g.f_q_pos.zero_()[slots] = shard  # every key visible
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(world * cap, hq, d, generator=gen, device=dev).to(dtype)
    k = torch.randn(num_slots, hkv, d, generator=gen, device=dev).to(dtype)
    v = torch.randn(num_slots, hkv, d, generator=gen, device=dev).to(dtype)
    # the fixed-split variants' sequences: slot s = sequence s, keys by g.f_kv_indptr
    i32 = dict(dtype=torch.int32, device=dev)
    seqs = (torch.arange(world * cap, **i32), torch.tensor(g.f_kv_indptr, **i32))
    return g, (q, k, v, d**-0.5, *seqs), slots


def old_splits(g) -> int:
    """47e7ff5's split count: ~one query per peer, within OLD_SCRATCH_BYTES of float32 scratch."""
    from nanocp_kernels.attention import decode_splits

    hq, hkv, d = g.heads
    per_split = g.world * g.cap * hq * d * 4
    return max(1, min(decode_splits(g.world, hkv, g.f_q_pos.device), OLD_SCRATCH_BYTES // per_split))


def foreign(g, inputs, variant: str):
    """g's foreign attention: `balanced` is GraphDCP's own call; the others launch
    `paged_attention` over every slot with a fixed split count, as GraphDCP did before."""
    from nanocp_kernels.attention import paged_attention

    q, k, v, scale, seq, indptr = inputs
    if variant == "balanced":
        return g.foreign.run(q, k, v, g.f_q_pos, g.f_kv_indices, g.f_kv_pos, scale)
    splits = old_splits(g) if variant == "fixed_splits" else 1
    meta = (seq, indptr, g.f_kv_indices, g.f_q_pos, g.f_kv_pos)
    return paged_attention(q, k, v, *meta, scale, num_splits=splits)


def max_diff(g, inputs, slots: list[int]) -> float:
    """Largest difference of any variant from one split over the slots holding a query (empty
    slots must stay empty: lse -inf in all)."""
    o_ref, lse_ref = foreign(g, inputs, "one_split")
    assert not torch.isinf(lse_ref[slots]).any(), "a slot with keys came out empty"
    worst = 0.0
    for variant in VARIANTS[:-1]:
        o, lse = foreign(g, inputs, variant)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), f"{variant}: empty slots differ"
        worst = max(
            worst,
            (o[slots].float() - o_ref[slots].float()).abs().max().item(),
            (lse[slots] - lse_ref[slots]).abs().max().item(),
        )
    return worst


def measure(world: int, cap: int, queries: int, shard: int, reps: int) -> dict:
    from benchmark.attention_bandwidth import graph_time

    g, inputs, slots = scenario(world, cap, queries, shard)
    row = {"world": world, "cap": cap, "queries": queries, "shard_tokens": shard}
    row["fixed_splits"], row["work_items"] = old_splits(g), int(g.foreign.n_items)
    row["max_abs_diff"] = max_diff(g, inputs, slots)
    kv_bytes = queries * shard * HEADS[1] * HEADS[2] * 2 * 2
    for variant in VARIANTS:
        row[f"{variant}_us"] = 1e6 * graph_time(lambda variant=variant: foreign(g, inputs, variant), reps)
        row[f"{variant}_GBps"] = kv_bytes / row[f"{variant}_us"] / 1e3
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--cap", type=int, default=64, help="query slots per peer (the graph's max batch)")
    p.add_argument("--queries", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--shard", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--waves", type=int, default=None, help="BalancedDecode's programs per SM (tuning)")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.waves:
        import nanocp_kernels.balanced_attention as balanced

        balanced.BALANCED_WAVES = args.waves
    rows = []
    for shard in args.shard:
        for queries in args.queries:
            rows.append(measure(args.world, args.cap, queries, shard, args.reps))
            print_row(rows[-1])
    return save_rows("foreign_attention", args.tag, args, rows, plot)


def plot(result: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for shard in sorted({r["shard_tokens"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["shard_tokens"] == shard]
        color = None
        for variant, style in zip(VARIANTS, ("o-", "s--", "x:")):
            line = ax.plot(
                [r["queries"] for r in rs], [r[f"{variant}_us"] for r in rs], style, color=color,
                label=f"{shard // 1024}k keys, {variant.replace('_', ' ')}",
            )  # fmt: skip
            color = line[0].get_color()
    log_axes(
        ax,
        "foreign queries in the step",
        "us per layer",
        f"DCP foreign attention in a CUDA graph, {result['device']}",
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
