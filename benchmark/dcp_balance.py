"""Per-instance KV occupancy and batch size over time: static DP vs uniform CP vs DCP.

Runs the server (CPU by default, dp=ep=4) once per --cp-policy on the same seeded long-tail
workload at one rate, samples the router's cluster state, and writes JSON + a plot.
(`benchmark.compare` does this at every rate of a goodput search.)

    python -m benchmark.dcp_balance                     # CPU, benchmark MoE, dp=4
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx

from benchmark.common import RESULTS, bench_model_path, environment, pyplot, save_figure, write_json
from benchmark.serve_bench import run_workload, server_vocab
from benchmark.server_runs import ClusterSampler, modes, plot_timelines, server_flags
from benchmark.workloads import make_workload, summary
from nanocp.testing.server import ServerProcess


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--dp-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mix", default="chat-docs-small")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cp-min-shard-tokens", type=int, default=1024)
    p.add_argument("--tag", default=None)
    return p.parse_args(argv)


def run_mode(args, model: str, flags: list[str], work) -> dict:
    cmd = server_flags(model, args.dp_size, args.device, 65536, *flags)
    with ServerProcess(cmd, log_path="/tmp/nanocp-dcp-balance.log") as s:
        t0 = time.perf_counter()
        with ClusterSampler(s.url) as sampler:
            metrics = asyncio.run(run_workload(s.url, work, server_vocab(s.url)))
        elapsed = time.perf_counter() - t0
        degrees = httpx.get(s.url + "/server_info").json()["cp_degrees"]
    return {
        "samples": sampler.samples,
        "imbalance": sampler.imbalance(),
        "elapsed_s": elapsed,
        "cp_degrees": degrees,
        "cp_degree_per_request": [m["cp_degree"] for m in metrics],
    }


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    n = len(result["modes"])
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.8 * n), squeeze=False)
    plot_timelines(axes, result["modes"])
    fig.suptitle(f"dp={result['dp_size']} on {result['device']}, workload {result['mix']}", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = args.model_path or bench_model_path()
    work = make_workload(args.mix, args.num_requests, rate=args.rate, seed=args.seed)
    result = {
        "benchmark": "dcp_balance",
        **environment(args.device),
        "model": model,
        "dp_size": args.dp_size,
        "mix": args.mix,
        "rate": args.rate,
        "workload": summary(work),
        "modes": {},
    }
    for mode, flags in modes(args.dp_size, args.cp_min_shard_tokens).items():
        print(f"running {mode} ...", flush=True)
        result["modes"][mode] = r = run_mode(args, model, flags, work)
        print(f"  {r['imbalance']}, degrees {r['cp_degrees']}, {r['elapsed_s']:.0f} s", flush=True)
    tag = args.tag or f"{args.device}_dp{args.dp_size}"
    write_json(RESULTS / f"dcp_balance_{tag}.json", result)
    plot(result, RESULTS / f"dcp_balance_{tag}.png")
    return result


if __name__ == "__main__":
    main()
