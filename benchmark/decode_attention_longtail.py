"""Decode attention of one layer from a CUDA graph on long-tail batches: BalancedDecode (what the
triton backend's decode graphs run now) vs `paged_attention` with the split count a graph of that
batch size fixes at capture (what they ran before).

A batch is `--batch` requests: one of `--long` keys (0: none) and the rest of `--short` keys. With
fixed splits the long request gets splits x KV-heads programs whatever its length; the balanced
kernel cuts the step's keys into equal chunks. Both must give the same output (checked on every
point). Shape: Qwen3-30B-A3B attention, bf16.

    python -m benchmark.decode_attention_longtail --batch 1 8 32 64 --long 0 32768 131072 --short 2048
"""

from __future__ import annotations

import argparse

import torch

from benchmark.common import log_axes, print_row, pyplot, save_figure, save_rows

HEADS = (32, 4, 128)  # q heads, KV heads, head dim


def scenario(batch: int, long: int, short: int, heads=HEADS, device="cuda", dtype=torch.bfloat16):
    """The batch's lengths, its q / KV cache / metadata (keys of each row contiguous, shuffled
    slots) and a BalancedDecode planned for it."""
    from nanocp_kernels.balanced_attention import BalancedDecode

    hq, hkv, d = heads
    dev = torch.device(device)
    lens = [long] + [short] * (batch - 1) if long else [short] * batch
    total = sum(lens)
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(batch, hq, d, generator=gen, device=dev).to(dtype)
    k = torch.randn(total, hkv, d, generator=gen, device=dev).to(dtype)
    v = torch.randn(total, hkv, d, generator=gen, device=dev).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    i32 = dict(dtype=torch.int32, device=dev)
    meta = {
        "q_seq": torch.arange(batch, **i32),
        "kv_indptr": torch.tensor([0, *lens_t.cumsum(0).tolist()], **i32),
        "kv_indices": torch.randperm(total, generator=gen, device=dev).to(torch.int32),
        "q_pos": torch.tensor(lens, **i32),  # every key visible
        "kv_pos": torch.cat([torch.arange(n, **i32) for n in lens]),
    }
    bd = BalancedDecode(batch, hq, hkv, d, dev)
    bd.plan([0, *lens_t.cumsum(0).tolist()])
    return lens, (q, k, v, d**-0.5), meta, bd


def attend(variant: str, inputs, meta, bd):
    from nanocp_kernels.attention import paged_attention

    q, k, v, scale = inputs
    if variant == "balanced":
        return bd.run(q, k, v, meta["q_pos"], meta["kv_indices"], meta["kv_pos"], scale)
    m = meta
    return paged_attention(
        q, k, v, m["q_seq"], m["kv_indptr"], m["kv_indices"], m["q_pos"], m["kv_pos"], scale
    )


def measure(batch: int, long: int, short: int, reps: int) -> dict:
    from benchmark.attention_bandwidth import graph_time
    from nanocp_kernels.attention import decode_splits

    lens, inputs, meta, bd = scenario(batch, long, short)
    (o_b, lse_b), (o_f, lse_f) = (attend(v, inputs, meta, bd) for v in ("balanced", "fixed_splits"))
    row = {"batch": batch, "long_tokens": long, "short_tokens": short}
    row["fixed_splits"] = decode_splits(batch, HEADS[1], inputs[0].device)
    row["work_items"] = int(bd.n_items)
    row["max_abs_diff"] = max(
        (o_b.float() - o_f.float()).abs().max().item(), (lse_b - lse_f).abs().max().item()
    )
    kv_bytes = sum(lens) * HEADS[1] * HEADS[2] * 2 * 2
    for variant in ("balanced", "fixed_splits"):
        row[f"{variant}_us"] = 1e6 * graph_time(
            lambda variant=variant: attend(variant, inputs, meta, bd), reps
        )
        row[f"{variant}_GBps"] = kv_bytes / row[f"{variant}_us"] / 1e3
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--long", type=int, nargs="+", default=[0, 32768, 131072])
    p.add_argument("--short", type=int, default=2048)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    rows = []
    for long in args.long:
        for batch in args.batch:
            rows.append(measure(batch, long, args.short, args.reps))
            print_row(rows[-1])
    return save_rows("decode_attention_longtail", args.tag, args, rows, plot)


def plot(result: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for long in sorted({r["long_tokens"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["long_tokens"] == long]
        what = f"one {long // 1024}k + short" if long else "all short"
        line = ax.plot(
            [r["batch"] for r in rs], [r["balanced_us"] for r in rs], "o-", label=f"{what}, balanced"
        )
        ax.plot(
            [r["batch"] for r in rs], [r["fixed_splits_us"] for r in rs], "s--", color=line[0].get_color(),
            label=f"{what}, fixed splits",
        )  # fmt: skip
    short = result["rows"][0]["short_tokens"]
    log_axes(
        ax,
        "batch size",
        "us per layer",
        f"Decode attention in a CUDA graph ({short}-key short rows), {result['device']}",
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
