"""Simulated SLO goodput of static DP vs uniform CP vs DCP on large clusters.

For each model profile and cluster size, bisect the highest Poisson request rate at which >= 90%
of requests meet the TPOT SLO (and the TTFT SLO, which here measures waiting for KV memory:
prompts are prefilled elsewhere, PD-disaggregated). The router's real planner places requests.

    python -m benchmark.simulate                 # both profiles, 8/16/32/64 instances
    python -m benchmark.simulate --instances 8 --models Qwen3-235B-A22B --duration 30
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from benchmark.common import RESULTS, pyplot, write_json
from benchmark.goodput import MAX_BRACKET_GROWTH, goodput_search, percentiles
from benchmark.simulator.cost import H200, MODELS, CostModel
from benchmark.simulator.sim import Simulator
from benchmark.workloads import make_workload, nested_workload, summary
from nanocp_router.planner import PlannerConfig, create_cp_policy

POLICIES = ("none", "uniform", "dynamic")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["Qwen3-235B-A22B", "DeepSeek-V3"], choices=sorted(MODELS))
    p.add_argument("--instances", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--mix", default="chat-docs")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per measured rate")
    p.add_argument("--tpot-slo-ms", type=float, default=40.0)
    p.add_argument("--ttft-slo-s", type=float, default=10.0)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--cp-size", type=int, default=8, help="uniform CP group size")
    p.add_argument("--cp-max-degree", type=int, default=8)
    p.add_argument("--cp-min-shard-tokens", type=int, default=4096)
    p.add_argument(
        "--load-balance-method",
        default="total_requests",
        help="static DP's router policy (benchmark.compare runs static DP with total_requests)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="searches run in parallel")
    p.add_argument("--tag", default="sim")
    return p.parse_args(argv)


def measurer(args, model: str, n: int, policy: str):
    """rate -> per-request metrics of one simulated run of `policy` on n instances."""
    cost = CostModel(MODELS[model], H200, n)
    cfg = PlannerConfig(
        cp_size=min(args.cp_size, n),
        cp_max_degree=min(args.cp_max_degree, n),
        cp_min_shard_tokens=args.cp_min_shard_tokens,
    )

    # every probed rate replays a prefix of one pool (sized for the highest rate any search can
    # probe), so probes differ only in load, and every policy and cluster size sees the same requests
    pool_size = max(50, int(search_bounds(max(args.instances))[1] * MAX_BRACKET_GROWTH * args.duration))

    def measure(rate: float) -> list[dict]:
        # enough requests to reach steady state: the rate applied for `duration` seconds
        work = nested_workload(args.mix, max(50, int(rate * args.duration)), rate, args.seed, pool_size)
        sim = Simulator(
            cost,
            create_cp_policy(policy, cfg),
            disaggregated=True,
            load_balance_method=args.load_balance_method,
        )
        return sim.run(work).metrics

    return measure


def search_bounds(n: int) -> tuple[float, float]:
    """Request rates (req/s) the goodput search brackets on n instances."""
    return 0.05 * n, 1.0 * n


def run_point(args, model: str, n: int, policy: str) -> dict:
    measure = measurer(args, model, n, policy)
    lo, hi = search_bounds(n)
    res = goodput_search(
        measure,
        tpot_slo=args.tpot_slo_ms / 1e3,
        ttft_slo=args.ttft_slo_s,
        attain=args.attainment,
        lo=lo,
        hi=hi,
        rel_tol=0.03,
    )
    at_goodput = [p for p in res.points if res.goodput and abs(p["rate"] - res.goodput) < 1e-9]
    return {
        "model": model,
        "instances": n,
        "policy": policy,
        "goodput_rps": res.goodput,
        "p99_tpot_ms_at_goodput": 1e3 * at_goodput[0]["tpot"]["p99"] if at_goodput else None,
        "points": res.points,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    points = [(model, n, policy) for model in args.models for n in args.instances for policy in POLICIES]
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:  # independent searches: one per process
        futures = {pool.submit(run_point, args, *point): point for point in points}
        for done in as_completed(futures):
            row = done.result()
            print(
                f"{row['model']:18s} n={row['instances']:3d} {row['policy']:8s} goodput "
                f"{row['goodput_rps']:7.2f} req/s ({time.time() - t0:.0f} s since start)",
                flush=True,
            )
        rows = [f.result() for f in futures]  # in the order of `points`
    # P99 TPOT of every policy at the same rate: static DP's goodput
    for model in args.models:
        for n in args.instances:
            base = next(
                r for r in rows if r["model"] == model and r["instances"] == n and r["policy"] == "none"
            )
            rate = base["goodput_rps"]
            for r in rows:
                if r["model"] == model and r["instances"] == n:
                    pts = [p for p in r["points"] if abs(p["rate"] - rate) < 1e-9]
                    if not pts:
                        ms = measurer(args, model, n, r["policy"])(rate)
                        r["p99_tpot_ms_at_dp_goodput"] = 1e3 * percentiles([m["tpot"] for m in ms])["p99"]
                    else:
                        r["p99_tpot_ms_at_dp_goodput"] = 1e3 * pts[0]["tpot"]["p99"]
    result = {
        "benchmark": "simulated_goodput",
        "device_profile": H200.__dict__,
        "mix": args.mix,
        "workload_example": summary(make_workload(args.mix, 2000, rate=1.0, seed=args.seed)),
        "slo": {"tpot_ms": args.tpot_slo_ms, "ttft_s": args.ttft_slo_s, "attainment": args.attainment},
        "prefill": "disaggregated (decode cluster only)",
        "planner": vars(args),
        "rows": rows,
    }
    write_json(RESULTS / f"{args.tag}_goodput.json", result)
    plot(result, args)
    write_summary(result, args)
    return result


def plot(result: dict, args) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(2, len(args.models), figsize=(6 * len(args.models), 7), squeeze=False)
    for col, model in enumerate(args.models):
        for policy, marker in zip(POLICIES, "osD"):
            rows = [r for r in result["rows"] if r["model"] == model and r["policy"] == policy]
            ns = [r["instances"] for r in rows]
            axes[0][col].plot(ns, [r["goodput_rps"] for r in rows], marker=marker, label=policy)
            axes[1][col].plot(ns, [r["p99_tpot_ms_at_dp_goodput"] for r in rows], marker=marker, label=policy)
        axes[0][col].set_title(f"{model}: goodput (TPOT <= {args.tpot_slo_ms:.0f} ms for 90%)", fontsize=9)
        axes[0][col].set_ylabel("req/s")
        axes[1][col].set_title("P99 TPOT at static DP's goodput rate", fontsize=9)
        axes[1][col].set_ylabel("ms")
        axes[1][col].set_xlabel("instances")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"Simulated (H200 roofline), workload {args.mix}, cp-policy none / uniform / dynamic", fontsize=10
    )
    fig.tight_layout()
    path = RESULTS / f"{args.tag}_goodput.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def write_summary(result: dict, args) -> None:
    lines = [
        "# Simulated goodput: static DP vs uniform CP vs DCP",
        "",
        f"Cluster simulator (`python -m benchmark.simulate`), H200 roofline costs, workload `{args.mix}` "
        "(90% chat <= 2k tokens + 10% documents 32k-256k; Poisson arrivals), decode cluster with "
        f"disaggregated prefill. SLO: TPOT <= {args.tpot_slo_ms:.0f} ms and queueing (TTFT) <= "
        f"{args.ttft_slo_s:.0f} s for >= {100 * args.attainment:.0f}% of requests. Placement by the real "
        f"router planner (uniform CP group {args.cp_size}, DCP max degree {args.cp_max_degree}).",
        "",
        "| model | instances | goodput none | uniform | dynamic | DCP / static DP | DCP / uniform | "
        "P99 TPOT @ DP goodput: none / dynamic (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        for n in args.instances:
            g = {r["policy"]: r for r in result["rows"] if r["model"] == model and r["instances"] == n}

            def ratio(a, b):
                return f"{a / b:.2f}x" if b else "n/a"

            lines.append(
                f"| {model} | {n} | {g['none']['goodput_rps']:.2f} | {g['uniform']['goodput_rps']:.2f} | "
                f"{g['dynamic']['goodput_rps']:.2f} | {ratio(g['dynamic']['goodput_rps'], g['none']['goodput_rps'])} | "
                f"{ratio(g['dynamic']['goodput_rps'], g['uniform']['goodput_rps'])} | "
                f"{g['none']['p99_tpot_ms_at_dp_goodput']:.1f} / {g['dynamic']['p99_tpot_ms_at_dp_goodput']:.1f} |"
            )
    lines += [
        "",
        "Simulated, not measured. The simulator schedules as the server does (router placement, "
        "admission, retraction, growth); its validation against real runs: sim_validation_*.md. "
        "Every probed rate replays a prefix of one seeded request pool (arrivals scaled), the same "
        "for all three policies.",
    ]
    path = RESULTS / f"{args.tag}_goodput.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
