"""Router planner latency: one plan's wall time per cluster size and policy (this machine, CPU).

A stream of long-tail requests ("chat-docs": 90% chat <= 2k tokens, 10% documents of 32k-256k,
prompt + output) is placed one by one on a cluster of N instances of 1M KV tokens each, every
plan accounted (apply_plan); the oldest placed requests are retired (the instances' load
reports, ClusterState.on_report) whenever the cluster is 70% full, so plans meet a steady,
uneven cluster. Timed: policy.plan alone (perf_counter_ns), p50 / p99 / max per (N, policy).
"dynamic (former)" is the planner before the index: a scan and sort of every instance per plan
and the fill level bisected 64 times per candidate degree (ScannedClusterState +
ScanningDynamicCP); it makes the same decisions (test_planner).

    python -m benchmark.planner_latency                      # -> results/planner_latency_cpu.{json,png}
    python -m benchmark.planner_latency --sizes 64 1024 --requests 4000
"""

from __future__ import annotations

import argparse
import time
from collections import deque

import numpy as np

from benchmark.common import RESULTS, environment, print_row, pyplot, save_figure, write_json
from benchmark.workloads import make_workload
from nanocp_router.cluster_state import ClusterState, ScannedClusterState
from nanocp_router.messages import Load
from nanocp_router.planner import PlannerConfig, ScanningDynamicCP, apply_plan, create_cp_policy

PAGE = 64
INSTANCE_TOKENS = 1 << 20
VARIANTS = ("none", "uniform", "dynamic", "dynamic (former)")


def run(n: int, variant: str, requests: int, seed: int, cfg: PlannerConfig) -> dict:
    former = variant == "dynamic (former)"
    state = (ScannedClusterState if former else ClusterState).create(n)
    policy = ScanningDynamicCP(cfg) if former else create_cp_policy(variant, cfg)
    used = [0] * n  # KV tokens held per instance, as its reports say
    running = [0] * n
    total_pages = INSTANCE_TOKENS // PAGE

    def report(i: int) -> None:
        free = total_pages - -(-used[i] // PAGE)
        state.on_report(Load(instance=i, total_pages=total_pages, free_pages=free, page_size=PAGE,
                             running=running[i], waiting=0, kv_tokens=used[i]))  # fmt: skip

    for i in range(n):
        report(i)
    placed: deque = deque()
    times = []
    lengths = [r.input_len + r.output_len for r in make_workload("chat-docs", requests, seed=seed)]
    for length in lengths:
        while sum(used) > 0.7 * n * INSTANCE_TOKENS and placed:  # the oldest finish
            old = placed.popleft()
            for s in old.segments:
                used[s.instance] -= s.tokens
            running[old.home] -= 1
            for i in {s.instance for s in old.segments}:
                report(i)
        t0 = time.perf_counter_ns()
        plan = policy.plan(length, state)
        times.append(time.perf_counter_ns() - t0)
        if plan is None:
            continue
        apply_plan(state, plan)
        placed.append(plan)
        for s in plan.segments:
            used[s.instance] += s.tokens
        running[plan.home] += 1
        if len(placed) % 8 == 0:  # the home's report arrives now and then (resets pending)
            report(plan.home)
    us = np.array(times) / 1e3
    return {
        "instances": n,
        "policy": variant,
        "plans": len(times),
        "p50_us": round(float(np.percentile(us, 50)), 2),
        "p99_us": round(float(np.percentile(us, 99)), 2),
        "max_us": round(float(us.max()), 2),
    }


def plot(result: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("p50_us", "p99_us")):
        for variant in VARIANTS:
            rows = [r for r in result["rows"] if r["policy"] == variant]
            if rows:
                ax.plot([r["instances"] for r in rows], [r[key] for r in rows], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("instances")
        ax.set_ylabel(f"{key[:3]} per plan (us)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Router planner latency (chat-docs stream, CPU)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 256, 1024])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--max-degree", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    cfg = PlannerConfig(cp_size=2, cp_max_degree=args.max_degree, cp_min_shard_tokens=4096)
    rows = []
    for n in args.sizes:
        for variant in args.variants:
            row = run(n, variant, args.requests, args.seed, cfg)
            print_row(row)
            rows.append(row)
    result = {"benchmark": "planner_latency", **environment("cpu"), "command": " ".join(argv or []) or "defaults",
              "args": vars(args), "rows": rows}  # fmt: skip
    if not args.no_save:
        write_json(RESULTS / f"planner_latency_{args.tag}.json", result)
        plot(result, RESULTS / f"planner_latency_{args.tag}.png")
    return result


if __name__ == "__main__":
    main()
