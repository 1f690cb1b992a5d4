"""Prefix caching under DP attention on a real server: hit rate, TTFT and throughput with the
cache off, round-robin, prefix-aware (cache_aware) and dynamic (DCP) routing, next to a single
instance (the hit rate the routing should approach), and the cluster's time-averaged max/mean
KV held and running requests (the dual balance the routing must keep).

Workloads (token ids; seeded):
  shared-prefix   sglang.bench_serving's generated-shared-prefix shape: groups of prompts
                  sharing a system prompt, each with its own question, Poisson arrivals
  multi-turn      conversations whose every turn resends the history (previous turns and
                  answers) plus a new message; turns of one conversation run one after another
  long-document   many questions over one long document (longer than --cp-min-shard-tokens:
                  DCP shards it, and reuses the shards in place)

Goal (issue prefix-cache): the dp=4 hit rate within 5% of the single instance's, with max/mean
KV and batch no worse than 1.1x those of dynamic routing without a cache.

    python -m benchmark.prefix_cache                 # CPU, benchmark MoE, dp=ep=4
    python -m benchmark.prefix_cache --workloads long-document --quick
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmark.common import RESULTS, bench_model_path, environment, pyplot, save_figure, write_json
from benchmark.goodput import percentiles
from benchmark.serve_bench import FIRST_ID, server_vocab, stream_request
from benchmark.server_runs import ClusterSampler, server_flags, wait_idle, warm_up
from nanocp.testing.server import ServerProcess

ROUTINGS = {  # label -> (dp, flags); every one also gets the shared flags of parse_args
    "single instance": (1, []),
    "cache off (DCP)": (None, ["--disable-radix-cache"]),
    "round-robin": (None, ["--cp-policy", "none", "--load-balance-method", "round_robin"]),
    "prefix-aware": (None, ["--cp-policy", "none", "--load-balance-method", "cache_aware"]),
    "dynamic (DCP)": (None, []),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the CPU benchmark MoE (random weights)")
    p.add_argument("--dp-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-total-tokens", type=int, default=32768, help="KV tokens per instance")
    p.add_argument("--chunked-prefill-size", type=int, default=512)
    p.add_argument("--cp-min-shard-tokens", type=int, default=1024)
    p.add_argument("--workloads", nargs="*", default=["shared-prefix", "multi-turn", "long-document"])
    p.add_argument("--routings", nargs="*", default=list(ROUTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run)")
    p.add_argument("--tag", default="cpu_dp4")
    return p.parse_args(argv)


# ------------------------------------------------------------------ workloads
def ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def shared_prefix(rng: random.Random, vocab: int, quick: bool) -> list[dict]:
    """bench_serving's generated-shared-prefix (its defaults: 64 groups x 16 prompts, system
    prompt 2048, question 128, output 256), scaled for a CPU: shuffled, Poisson arrivals."""
    groups, per_group, system, question, out, rate = (
        (4, 4, 512, 32, 8, 4.0) if quick else (8, 8, 1024, 64, 64, 3.0)
    )
    prompts = [ids(rng, system, vocab) for _ in range(groups)]
    reqs = [
        {"input_ids": prompts[g] + ids(rng, question, vocab), "max_new": out}
        for g in range(groups)
        for _ in range(per_group)
    ]
    rng.shuffle(reqs)
    t = 0.0
    for r in reqs:
        t += rng.expovariate(rate)
        r["arrival_s"] = t
    return reqs


def long_document(rng: random.Random, vocab: int, quick: bool) -> list[dict]:
    """Questions over one document longer than a shard (Poisson arrivals)."""
    doc_len, n, question, out, rate = (2048, 8, 24, 8, 2.0) if quick else (6144, 24, 32, 16, 1.5)
    doc = ids(rng, doc_len, vocab)
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        reqs.append({"input_ids": doc + ids(rng, question, vocab), "max_new": out, "arrival_s": t})
    return reqs


def conversations(rng: random.Random, vocab: int, quick: bool) -> list[dict]:
    """Multi-turn chat: each turn = the history + a new message (built as answers come)."""
    n, turns, first, message, out = (4, 3, 256, 32, 8) if quick else (16, 4, 512, 64, 24)
    return [
        {"first": ids(rng, first, vocab), "messages": [ids(rng, message, vocab) for _ in range(turns - 1)],
         "max_new": out, "start_s": i * 0.5}
        for i in range(n)
    ]  # fmt: skip


# ------------------------------------------------------------------ clients
def body(input_ids: list[int], max_new: int, rid: str) -> dict:
    params = {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}
    return {"rid": rid, "input_ids": input_ids, "sampling_params": params}


async def run_open_loop(url: str, reqs: list[dict], tag: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        t0 = time.perf_counter()

        async def one(i: int, r: dict) -> dict:
            await asyncio.sleep(max(0.0, r["arrival_s"] - (time.perf_counter() - t0)))
            m = {"index": i, "input_len": len(r["input_ids"])}
            return await stream_request(client, body(r["input_ids"], r["max_new"], f"{tag}-{i}"), m)

        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))


async def run_conversations(url: str, convs: list[dict], tag: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:

        async def one(c: int, conv: dict) -> list[dict]:
            await asyncio.sleep(conv["start_s"])
            history, out = list(conv["first"]), []
            for turn, message in enumerate([[], *conv["messages"]]):
                history += message
                m = {"index": len(out), "input_len": len(history), "turn": turn}
                b = {**body(history, conv["max_new"], f"{tag}-{c}-{turn}"), "return_output_ids": True}
                out.append(await stream_request(client, b, m))
                history += out[-1].get("output_ids", [])
            return out

        return [m for ms in await asyncio.gather(*(one(c, v) for c, v in enumerate(convs))) for m in ms]


def measure(url: str, name: str, work, tag: str) -> dict:
    wait_idle(url)
    with ClusterSampler(url) as sampler:
        t0 = time.perf_counter()
        if name == "multi-turn":
            metrics = asyncio.run(run_conversations(url, work, tag))
        else:
            metrics = asyncio.run(run_open_loop(url, work, tag))
        elapsed = time.perf_counter() - t0
    ok = [m for m in metrics if "error" not in m]
    prompt = sum(m["input_len"] for m in ok)
    return {
        "completed": len(ok),
        "failed": len(metrics) - len(ok),
        "hit_rate": sum(m["cached_tokens"] for m in ok) / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": sum(m["cached_tokens"] for m in ok),
        "ttft": percentiles([m["ttft"] for m in ok]),
        "elapsed_s": round(elapsed, 3),
        "request_throughput": len(ok) / elapsed,
        "cp_degrees": {
            str(d): sum(1 for m in ok if m["cp_degree"] == d) for d in sorted({m["cp_degree"] for m in ok})
        },
        "retractions": sampler.retractions(),
        "imbalance": sampler.imbalance(),
        "samples": sampler.samples,
    }


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    args = parse_args(argv)
    model = args.model_path or bench_model_path()
    results: dict[str, dict] = {w: {} for w in args.workloads}
    for label in args.routings:
        dp, flags = ROUTINGS[label]
        dp = dp or args.dp_size
        extra = [*flags, "--cp-min-shard-tokens", str(args.cp_min_shard_tokens)] if dp > 1 else flags
        cmd = server_flags(
            model, dp, args.device, args.max_total_tokens, *extra, chunked_prefill=args.chunked_prefill_size
        )
        print(f"[{label}] server: {shlex.join(cmd)}", flush=True)
        with ServerProcess(cmd, log_path=str(Path(tempfile.gettempdir()) / f"prefix_cache_dp{dp}.log")) as s:
            warm_up(s.url, dp, args.chunked_prefill_size)
            vocab = server_vocab(s.url)
            for w in args.workloads:
                rng = random.Random(args.seed)  # the same requests for every routing
                make = {
                    "shared-prefix": shared_prefix,
                    "long-document": long_document,
                    "multi-turn": conversations,
                }[w]
                httpx.post(s.url + "/flush_cache", timeout=30)  # each workload starts cold
                r = measure(s.url, w, make(rng, vocab, args.quick), f"{w}-{label.split()[0]}")
                results[w][label] = r
                print(
                    f"[{label}] {w}: hit rate {r['hit_rate']:.3f}, TTFT mean {r['ttft']['mean']:.3f} s "
                    f"p99 {r['ttft']['p99']:.3f} s, {r['request_throughput']:.2f} req/s, "
                    f"KV max/mean {r['imbalance']['kv_max_over_mean']:.2f}, batch max/mean "
                    f"{r['imbalance']['batch_max_over_mean']:.2f}, degrees {r['cp_degrees']}, failed {r['failed']}",
                    flush=True,
                )
    out = {"command": shlex.join([sys.executable, "-m", "benchmark.prefix_cache", *(argv or sys.argv[1:])]),
           "environment": environment(), "args": vars(args), "results": results}  # fmt: skip
    stem = RESULTS / f"prefix_cache_{args.tag}{'_quick' if args.quick else ''}"
    write_json(stem.with_suffix(".json"), out)
    stem.with_suffix(".md").write_text(table(out))
    plot(results, stem.with_suffix(".png"))


def table(out: dict) -> str:
    lines = [f"`{out['command']}`", ""]
    for w, runs in out["results"].items():
        base = runs.get("cache off (DCP)", {}).get("imbalance")
        lines += [f"### {w}", "", "| routing | hit rate | TTFT mean (s) | TTFT p99 (s) | req/s | KV max/mean | batch max/mean | degrees |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for label, r in runs.items():
            im = r["imbalance"]
            rel = (
                f" ({im['kv_max_over_mean'] / base['kv_max_over_mean']:.2f}x, {im['batch_max_over_mean'] / base['batch_max_over_mean']:.2f}x)"
                if base and label != "single instance"
                else ""
            )
            lines.append(
                f"| {label} | {r['hit_rate']:.3f} | {r['ttft']['mean']:.3f} | {r['ttft']['p99']:.3f} | "
                f"{r['request_throughput']:.2f} | {im['kv_max_over_mean']:.2f} | {im['batch_max_over_mean']:.2f}{rel} | "
                f"{r['cp_degrees']} |"
            )
        lines.append("")
    lines.append("(x: the dp routing's max/mean over cache off (DCP)'s: KV, batch)")
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 4, figsize=(17, 3.2 * len(results)), squeeze=False)
    for row, (w, runs) in zip(axes, results.items()):
        labels = list(runs)
        x = np.arange(len(labels))
        for ax, (key, title) in zip(
            row,
            (
                ("hit_rate", "prefix-cache hit rate"),
                ("ttft", "mean TTFT (s)"),
                ("request_throughput", "req/s"),
            ),
        ):
            vals = [runs[k][key]["mean"] if key == "ttft" else runs[k][key] for k in labels]
            ax.bar(x, vals, color=[f"C{i}" for i in range(len(labels))])
            ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=7)
            ax.set_title(f"{w}: {title}", fontsize=9)
        ax = row[3]  # the dual balance: time-averaged max/mean over instances
        for j, (key, name) in enumerate(
            (("kv_max_over_mean", "KV held"), ("batch_max_over_mean", "running"))
        ):
            ax.bar(x + (j - 0.5) * 0.4, [runs[k]["imbalance"][key] for k in labels], 0.4, label=name)
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=7)
        ax.set_title(f"{w}: max/mean over instances (time-averaged)", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
