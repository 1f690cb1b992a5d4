"""The EP straggler of static DP, made visible by the step trace.

Static DP + EP (`--cp-policy none` behaviour): instance 0 holds every long request, the others
hold short ones. All instances step together (MoE collectives), so each step lasts as long as
instance 0's attention over its long KV; the others spend that time waiting inside the MoE
collective. The script runs the server with --step-trace-file, sends the pinned workload, and
summarises where each instance's decode-step time went.

    python -m benchmark.straggler_demo                       # CPU, dp=ep=2
    python -m benchmark.straggler_demo --dp-size 4 --device cuda --model-path ... --load-format dummy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from pathlib import Path
from statistics import mean

import httpx

from benchmark.common import RESULTS, bench_model_path, environment, pyplot, save_figure, write_json
from nanocp.testing.server import ServerProcess

PARTS = ("attention", "moe_compute", "moe_comm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the CPU benchmark MoE")
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-long", type=int, default=8, help="long requests, all on instance 0")
    p.add_argument("--long-len", type=int, default=6000)
    p.add_argument("--num-short", type=int, default=8, help="short requests per other instance")
    p.add_argument("--short-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--moe-a2a-backend", default="all_to_all")
    p.add_argument("--extra", default="", help="more launch_server flags, space separated")
    p.add_argument("--tag", default=None, help="result file name suffix (default: device and dp size)")
    return p.parse_args(argv)


async def send_all(url: str, jobs: list[tuple[list[int], int]], output_len: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as c:

        async def one(ids, rank):
            body = {
                "input_ids": ids,
                "data_parallel_rank": rank,
                "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True},
            }
            r = await c.post("/generate", json=body)
            r.raise_for_status()

        await asyncio.gather(*(one(ids, rank) for ids, rank in jobs))


def summarize(trace_paths: list[Path]) -> dict:
    per_instance = []
    for i, path in enumerate(trace_paths):
        steps = [json.loads(line) for line in path.read_text().splitlines()]
        decode = [
            s
            for s in steps
            if s["mode"] in ("DECODE", "IDLE")
            and sum(s["global_num_tokens"] or [0]) > 0
            and all(n <= 64 for n in s["global_num_tokens"])
        ]  # pure decode steps of the cluster
        row = {"instance": i, "decode_steps": len(decode)}
        if decode:
            row["step_ms"] = 1e3 * mean(s["step_s"] for s in decode)
            for part in PARTS:
                row[f"{part}_ms"] = 1e3 * mean(s[f"{part}_s"] for s in decode)
            row["other_ms"] = row["step_ms"] - sum(row[f"{p}_ms"] for p in PARTS)
            row["moe_comm_share"] = row["moe_comm_ms"] / row["step_ms"]
            row["kv_tokens"] = mean(s["kv_tokens"] for s in decode)
            row["batch_size"] = mean(s["batch_size"] for s in decode)
        per_instance.append(row)
    return {"instances": per_instance}


def plot(summary: dict, path: Path, title: str) -> None:
    plt = pyplot()

    rows = [r for r in summary["instances"] if r["decode_steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rows)
    labels = {
        "attention": "attention",
        "moe_compute": "experts",
        "moe_comm": "MoE collective (incl. waiting)",
        "other": "other (dense layers, sampling)",
    }
    for part in (*PARTS, "other"):
        vals = [r[f"{part}_ms"] for r in rows]
        ax.bar(
            [
                f"instance {r['instance']}\n{r['kv_tokens']:.0f} KV tok, bs {r['batch_size']:.0f}"
                for r in rows
            ],
            vals,
            bottom=bottom,
            label=labels[part],
        )
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("mean decode step time (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = args.model_path or bench_model_path()
    dp = args.dp_size
    rng = random.Random(0)
    jobs = [([rng.randrange(10, 500) for _ in range(args.long_len)], 0) for _ in range(args.num_long)]
    for inst in range(1, dp):
        jobs += [
            ([rng.randrange(10, 500) for _ in range(args.short_len)], inst) for _ in range(args.num_short)
        ]
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        flags = [
            "--model-path",
            model,
            "--dp-size",
            str(dp),
            "--ep-size",
            str(dp),
            "--device",
            args.device,
            "--moe-a2a-backend",
            args.moe_a2a_backend,
            "--step-trace-file",
            str(trace),
            "--chunked-prefill-size",
            "2048",
            "--cp-policy",
            "none",  # static DP: the baseline whose straggler this shows
            *args.extra.split(),
        ]
        print("launching:", " ".join(flags), flush=True)
        with ServerProcess(flags, log_path=str(Path(tmp) / "server.log")) as server:
            print(f"sending {len(jobs)} requests ...", flush=True)
            asyncio.run(send_all(server.url, jobs, args.output_len))
        summary = summarize([Path(f"{trace}.{i}") for i in range(dp)])
    result = {
        "benchmark": "straggler_demo",
        **environment(args.device),
        "model": model,
        "dp_size": dp,
        "moe_a2a_backend": args.moe_a2a_backend,
        "workload": {
            "instance 0": f"{args.num_long} x {args.long_len}-token prompts",
            "other instances": f"{args.num_short} x {args.short_len}-token prompts each",
            "output_len": args.output_len,
        },
        **summary,
    }
    for r in summary["instances"]:
        if r["decode_steps"]:
            print(
                f"instance {r['instance']}: step {r['step_ms']:.1f} ms = attention {r['attention_ms']:.1f} + "
                f"experts {r['moe_compute_ms']:.1f} + MoE collective {r['moe_comm_ms']:.1f} "
                f"({100 * r['moe_comm_share']:.0f}% of the step) + other {r['other_ms']:.1f}"
            )
    tag = args.tag or f"{args.device}_dp{dp}"
    write_json(RESULTS / f"straggler_{tag}.json", result)
    plot(
        summary,
        RESULTS / f"straggler_{tag}.png",
        f"Static DP+EP, dp={dp}: instance 0 holds all long requests ({result['device']})",
    )
    return result


if __name__ == "__main__":
    main()
