"""Static DP vs uniform CP vs DCP on one workload, on a real server: SLO goodput, P99 TPOT and
per-instance KV occupancy / batch size over time.

For each mode (--cp-policy none / uniform / dynamic) a server is started once; the workload
(seeded; the same request lengths at every rate, arrivals scaled) is replayed at each probed rate
by the streaming client of benchmark.serve_bench. Goodput = the highest rate at which at least
--attainment of the requests meet the TPOT SLO (bisection, benchmark.goodput). Every mode is also
run at --timeline-rate, where the cluster state is sampled and P99 TPOT is compared side by side.
Step traces (--step-trace-file) are kept under --trace-dir for simulator calibration.

    python -m benchmark.compare                       # CPU, benchmark MoE, dp=ep=4
    python -m benchmark.compare --rates 0.5 1 2       # fixed rates instead of the search
    python -m benchmark.compare --disaggregation-prefill-dp 1   # decode servers fed by a prefill server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

from benchmark.common import RESULTS, bench_model_path, environment, pyplot, save_figure, write_json
from benchmark.goodput import attainment, goodput_search
from benchmark.serve_bench import run_workload, server_vocab, summarize
from benchmark.server_runs import ClusterSampler, modes, plot_timelines, server_flags, wait_idle, warm_up
from benchmark.workloads import Request, nested_workload, summary
from nanocp import envs
from nanocp.testing.server import ServerProcess, free_port_range


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the CPU benchmark MoE (random weights)")
    p.add_argument("--dp-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-total-tokens", type=int, default=65536, help="KV tokens per instance")
    p.add_argument("--chunked-prefill-size", type=int, default=1024)
    p.add_argument("--mix", default="chat-docs-small")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per probed rate")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tpot-slo-ms", type=float, default=500.0)
    p.add_argument("--ttft-slo-s", type=float, default=15.0, help="0: TPOT only")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--rate-lo", type=float, default=0.25)
    p.add_argument("--rate-hi", type=float, default=2.0)
    p.add_argument("--rel-tol", type=float, default=0.15)
    p.add_argument("--rates", type=float, nargs="*", help="measure these rates instead of searching")
    p.add_argument("--timeline-rate", type=float, default=1.0)
    p.add_argument("--cp-min-shard-tokens", type=int, default=1024)
    p.add_argument(
        "--server-args",
        default="",
        help="extra launch_server flags for every mode, e.g. '--load-format dummy --skip-tokenizer-init'",
    )
    p.add_argument(
        "--disaggregation-prefill-dp",
        type=int,
        default=0,
        help="P > 0: each mode's server is a decode server (--disaggregation-mode decode) fed by a "
        "prefill server of P instances started beside it; 0: prefill and decode colocated",
    )
    p.add_argument("--trace-dir", type=Path, default=Path("/tmp/nanocp-compare-traces"))
    p.add_argument("--tag", default=None)
    p.add_argument(
        "--only",
        nargs="+",
        choices=["none", "uniform", "dynamic"],
        help="re-run these modes only, replacing them in the existing result file",
    )
    return p.parse_args(argv)


def workload(args, rate: float) -> list[Request]:
    """The first max(min_requests, rate * duration) requests of one seeded pool, arrivals scaled
    to the rate: every rate replays a prefix of the same request sequence (steady load)."""
    return nested_workload(args.mix, max(args.min_requests, int(rate * args.duration)), rate, args.seed)


def slug(mode: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", mode.lower()).strip("_")


def run_mode(args, model: str, mode: str, flags: list[str]) -> dict:
    args.trace_dir.mkdir(parents=True, exist_ok=True)
    trace = args.trace_dir / f"{slug(mode)}.jsonl"
    for old in args.trace_dir.glob(f"{slug(mode)}*.jsonl*"):
        old.unlink()
    cmd = server_flags(
        model,
        args.dp_size,
        args.device,
        args.max_total_tokens,
        *flags,
        *shlex.split(args.server_args),
        chunked_prefill=args.chunked_prefill_size,
    )
    runs: dict[float, dict] = {}
    with contextlib.ExitStack() as stack:
        if args.disaggregation_prefill_dp:
            pre = stack.enter_context(prefill_server(args, model, mode))
            cmd += ["--disaggregation-mode", "decode", "--disaggregation-prefill-url", pre.url]
        s = stack.enter_context(
            ServerProcess(
                [*cmd, "--step-trace-file", str(trace)],
                log_path=f"/tmp/nanocp-compare-{slug(mode)}.log",
                ready_timeout=envs.startup_timeout_s(),
            )
        )
        vocab = server_vocab(s.url)
        warm_up(s.url, args.dp_size, args.chunked_prefill_size)

        def measure(rate: float) -> list[dict]:
            if rate not in runs:
                work = workload(args, rate)
                wait_idle(s.url)
                t0 = time.perf_counter()
                with ClusterSampler(s.url) as sampler:
                    metrics = asyncio.run(run_workload(s.url, work, vocab))
                elapsed = time.perf_counter() - t0
                runs[rate] = {
                    "rate": rate,
                    "num_requests": len(work),
                    "summary": summarize(metrics, elapsed),
                    "attainment": attainment(scored(metrics), args.tpot_slo_ms / 1e3, ttft_slo(args)),
                    "samples": sampler.samples,
                    "imbalance": sampler.imbalance(),
                    "retractions": sampler.retractions(),
                    "requests": metrics,
                }
                r = runs[rate]
                print(
                    f"  {mode:24s} rate {rate:6.3f}: attainment {r['attainment']:.2f}, P99 TPOT "
                    f"{1e3 * r['summary']['tpot']['p99']:.0f} ms, KV max/mean {r['imbalance']['kv_max_over_mean']:.2f}, "
                    f"{r['retractions']} retractions, {elapsed:.0f} s",
                    flush=True,
                )
            return scored(runs[rate]["requests"])

        measure(args.timeline_rate)
        if args.rates:
            for rate in args.rates:
                measure(rate)
            goodput = max((r for r in args.rates if runs[r]["attainment"] >= args.attainment), default=0.0)
        else:
            goodput = goodput_search(
                measure,
                args.tpot_slo_ms / 1e3,
                ttft_slo(args),
                attain=args.attainment,
                lo=args.rate_lo,
                hi=args.rate_hi,
                rel_tol=args.rel_tol,
            ).goodput
    return {
        "flags": flags,
        "goodput_rps": goodput,
        "trace": str(trace),
        "runs": [runs[r] for r in sorted(runs)],
    }


def prefill_server(args, model: str, mode: str) -> ServerProcess:
    """The prefill server a disaggregated mode's decode server sends its prompts to."""
    p = args.disaggregation_prefill_dp
    cmd = server_flags(
        model, p, args.device, args.max_total_tokens, *shlex.split(args.server_args),
        chunked_prefill=args.chunked_prefill_size,
    )  # fmt: skip
    boot = free_port_range(1)
    trace = args.trace_dir / f"{slug(mode)}_prefill.jsonl"
    cmd += ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot),
            "--step-trace-file", str(trace)]  # fmt: skip
    log = f"/tmp/nanocp-compare-{slug(mode)}-prefill.log"
    return ServerProcess(cmd, log_path=log, ready_timeout=envs.startup_timeout_s())


def ttft_slo(args) -> float | None:
    return args.ttft_slo_s or None


def scored(metrics: list[dict]) -> list[dict]:
    """Failed requests count as missing the SLO."""
    return [m if "error" not in m else {**m, "tpot": math.inf, "ttft": math.inf} for m in metrics]


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    modes_ = result["modes"]
    fig = plt.figure(figsize=(12, 3.2 + 2.6 * len(modes_)))
    grid = fig.add_gridspec(1 + len(modes_), 2)
    ax_att, ax_p99 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for (mode, r), marker in zip(modes_.items(), "osD"):
        rates = [x["rate"] for x in r["runs"]]
        ax_att.plot(
            rates,
            [x["attainment"] for x in r["runs"]],
            marker=marker,
            label=f"{mode} ({r['goodput_rps']:.2f} req/s)",
        )
        ax_p99.plot(rates, [1e3 * x["summary"]["tpot"]["p99"] for x in r["runs"]], marker=marker, label=mode)
    ax_att.axhline(result["slo"]["attainment"], color="grey", ls="--", lw=0.8)
    ax_att.set_title(
        f"SLO attainment (TPOT <= {result['slo']['tpot_ms']:.0f} ms); legend: goodput", fontsize=9
    )
    ax_p99.axhline(result["slo"]["tpot_ms"], color="grey", ls="--", lw=0.8)
    ax_p99.set_title("P99 TPOT (ms)", fontsize=9)
    for ax in (ax_att, ax_p99):
        ax.set_xlabel("request rate (req/s)")
        ax.legend(fontsize=7)
    timeline = {
        mode: next(x for x in r["runs"] if x["rate"] == result["timeline_rate"]) for mode, r in modes_.items()
    }
    rows = [[fig.add_subplot(grid[1 + i, 0]), fig.add_subplot(grid[1 + i, 1])] for i in range(len(modes_))]
    plot_timelines(rows, {f"{m} @ {result['timeline_rate']} req/s": t for m, t in timeline.items()})
    fig.suptitle(f"{result['device']}, dp=ep={result['dp_size']}, workload {result['mix']}", fontsize=10)
    save_figure(fig, path)


def write_summary(result: dict, path: Path) -> None:
    m = result["modes"]
    names = list(m)
    dp, uni, dcp = (m[n] for n in names)

    def at_timeline(r: dict) -> dict:
        return next(x for x in r["runs"] if x["rate"] == result["timeline_rate"])["summary"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    lines = [
        f"| mode | goodput (req/s) | P99 TPOT @ {result['timeline_rate']} req/s (ms) | P50 TPOT (ms) | "
        "P99 TTFT (s) | KV max/mean | batch max/mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = at_timeline(m[name])
        imb = next(x for x in m[name]["runs"] if x["rate"] == result["timeline_rate"])["imbalance"]
        lines.append(
            f"| {name} | {m[name]['goodput_rps']:.2f} | {1e3 * s['tpot']['p99']:.0f} | {1e3 * s['tpot']['p50']:.0f} | "
            f"{s['ttft']['p99']:.1f} | {imb['kv_max_over_mean']:.2f} | {imb['batch_max_over_mean']:.2f} |"
        )
    p99 = {n: at_timeline(m[n])["tpot"]["p99"] for n in names}
    lines += [
        "",
        f"DCP / static DP goodput: {ratio(dcp['goodput_rps'], dp['goodput_rps'])}; "
        f"DCP / uniform CP goodput: {ratio(dcp['goodput_rps'], uni['goodput_rps'])}; "
        f"P99 TPOT static DP / DCP: {ratio(p99[names[0]], p99[names[2]])}; "
        f"uniform CP / DCP: {ratio(p99[names[1]], p99[names[2]])}.",
    ]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = args.model_path or bench_model_path()
    result = {
        "benchmark": "compare",
        **environment(args.device),
        "command": "python -m benchmark.compare " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": model,
        "dp_size": args.dp_size,
        "mix": args.mix,
        "workload_at_timeline_rate": summary(workload(args, args.timeline_rate)),
        "slo": {"tpot_ms": args.tpot_slo_ms, "ttft_s": ttft_slo(args), "attainment": args.attainment},
        "timeline_rate": args.timeline_rate,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "modes": {},
    }
    pd = args.disaggregation_prefill_dp
    result["disaggregation"] = {"prefill_dp": pd} if pd else None
    tag = args.tag or f"{args.device}_dp{args.dp_size}" + (f"_pd{pd}" if pd else "")
    if args.only and (RESULTS / f"compare_{tag}.json").exists():  # keep the other modes' runs
        old = json.loads((RESULTS / f"compare_{tag}.json").read_text())
        result["modes"] = old["modes"]
        result["command"] = f"{old['command']} ({old['date']}); re-run of {args.only}: {result['command']}"
    for mode, flags in modes(args.dp_size, args.cp_min_shard_tokens).items():
        if args.only and flags[1] not in args.only:
            continue
        print(f"{mode} ...", flush=True)
        result["modes"][mode] = run_mode(args, model, mode, flags)
    write_json(RESULTS / f"compare_{tag}.json", result)
    if len(result["modes"]) < 3:
        print(f"{len(result['modes'])} of 3 modes so far: run the rest with --only; plots come then")
        return result
    plot(result, RESULTS / f"compare_{tag}.png")
    write_summary(result, RESULTS / f"compare_{tag}.md")
    return result


if __name__ == "__main__":
    main()
