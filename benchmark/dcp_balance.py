"""Per-instance KV occupancy and batch size over time: static DP vs uniform CP vs DCP.

Runs the server (CPU by default, dp=ep=4) once per --cp-policy on the same seeded long-tail
workload, samples the router's cluster state, and writes JSON + a plot.

    python -m benchmark.dcp_balance                     # CPU, benchmark MoE, dp=4
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path
from statistics import mean

import httpx
import numpy as np

from benchmark.common import RESULTS, bench_model_path, environment, write_json
from benchmark.workloads import make_workload, summary
from nanocp.testing.server import ServerProcess

MODES = {
    "static DP (--cp-policy none)": ["--cp-policy", "none", "--load-balance-method", "total_requests"],
    "uniform CP (--cp-size 4)": ["--cp-policy", "uniform", "--cp-size", "4"],
    "DCP (--cp-policy dynamic)": ["--cp-policy", "dynamic", "--cp-min-shard-tokens", "1024"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--dp-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mix", default="chat-docs-small")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-interval", type=float, default=0.25)
    p.add_argument("--tag", default=None)
    return p.parse_args(argv)


async def drive(url: str, work) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        t0 = time.perf_counter()

        async def one(r):
            await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - t0)))
            body = {
                "input_ids": [10 + (i * 7919) % 480 for i in range(r.input_len)],
                "sampling_params": {"max_new_tokens": r.output_len, "temperature": 0, "ignore_eos": True},
            }
            res = (await c.post("/generate", json=body)).json()
            return res["meta_info"]

        return await asyncio.gather(*(one(r) for r in work))


def run_mode(args, model: str, flags: list[str], work) -> dict:
    samples: list[dict] = []
    server_flags = [
        "--model-path",
        model,
        "--dp-size",
        str(args.dp_size),
        "--ep-size",
        str(args.dp_size),
        "--device",
        args.device,
        "--chunked-prefill-size",
        "1024",
        "--page-size",
        "16",
        "--max-total-tokens",
        "65536",
        *flags,
    ]
    with ServerProcess(server_flags, log_path="/tmp/nanocp-dcp-balance.log") as s:
        stop = threading.Event()

        def sample() -> None:
            t0 = time.perf_counter()
            with httpx.Client(base_url=s.url, timeout=10) as c:
                while not stop.is_set():
                    cluster = c.get("/server_info").json()["cluster"]
                    samples.append(
                        {
                            "t": time.perf_counter() - t0,
                            "kv_tokens": [
                                (i["total_pages"] - i["free_pages"]) * i["page_size"] for i in cluster
                            ],
                            "batch": [i["running"] for i in cluster],
                        }
                    )
                    stop.wait(args.sample_interval)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        metas = asyncio.run(drive(s.url, work))
        elapsed = time.perf_counter() - t0
        stop.set()
        th.join()
        degrees = httpx.get(s.url + "/server_info").json()["cp_degrees"]
    busy = [x for x in samples if sum(x["kv_tokens"]) > 0]

    def ratio(key: str) -> float:
        vals = [max(x[key]) / mean(x[key]) for x in busy if mean(x[key]) > 0]
        return float(np.mean(vals)) if vals else 1.0

    return {
        "samples": samples,
        "elapsed_s": elapsed,
        "cp_degrees": degrees,
        "mean_max_over_mean_kv": ratio("kv_tokens"),
        "mean_max_over_mean_batch": ratio("batch"),
        "cp_degree_per_request": [m.get("cp_degree", 1) for m in metas],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 2.8 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        r = result["modes"][mode]
        t = [x["t"] for x in r["samples"]]
        for col, (key, label) in enumerate((("kv_tokens", "KV tokens held"), ("batch", "running requests"))):
            ax = axes[row][col]
            series = np.array([x[key] for x in r["samples"]])
            for i in range(series.shape[1] if len(series) else 0):
                ax.plot(t, series[:, i], label=f"instance {i}", lw=1)
            stat = r["mean_max_over_mean_kv" if key == "kv_tokens" else "mean_max_over_mean_batch"]
            ax.set_title(f"{mode}: {label} (mean max/mean {stat:.2f})", fontsize=9)
            ax.set_xlabel("s")
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"dp={result['dp_size']} on {result['device']}, workload {result['mix']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


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
    for mode, flags in MODES.items():
        print(f"running {mode} ...", flush=True)
        result["modes"][mode] = r = run_mode(args, model, flags, work)
        print(
            f"  KV max/mean {r['mean_max_over_mean_kv']:.2f}, batch max/mean {r['mean_max_over_mean_batch']:.2f}, "
            f"degrees {r['cp_degrees']}, {r['elapsed_s']:.0f} s",
            flush=True,
        )
    tag = args.tag or f"{args.device}_dp{args.dp_size}"
    write_json(RESULTS / f"dcp_balance_{tag}.json", result)
    plot(result, RESULTS / f"dcp_balance_{tag}.png")
    return result


if __name__ == "__main__":
    main()
