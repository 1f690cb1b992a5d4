"""Calibrate the cluster simulator on a real run of benchmark.compare and report its error.

1. Fit a cost profile (simulator.cost.ProfileCost) to the run's step traces, by non-negative
   least squares over every lockstep step of every mode (see fit_profile: on a CPU host the
   instances share cores, so work adds up across instances; combine="shared").
2. Simulate each mode at each measured rate on the same workload (mix, seed, duration) with the
   router's real planner, the run's page size, chunk size and KV capacity.
3. Compare P99 TPOT per (mode, rate), SLO attainment and goodput (the same rate search on the
   simulator), and the modes' goodput ranking. Writes profile_<tag>.json and
   sim_validation_<tag>.{json,md,png} under benchmark/results/.

    python -m benchmark.sim_validate --compare benchmark/results/compare_cpu_dp4.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmark.common import RESULTS, pyplot, save_figure, write_json
from benchmark.compare import scored, workload
from benchmark.goodput import attainment, goodput_search, percentiles
from benchmark.server_runs import server_flags
from benchmark.simulator.cost import ProfileCost
from benchmark.simulator.sim import Simulator
from nanocp.server_args import ServerArgs
from nanocp_router.planner import PlannerConfig, create_cp_policy

JITTER_S = 0.1
JITTER_RUNS = 8


def load_traces(compare: dict, trace_dir: Path | None = None) -> list[list[dict]]:
    """Per mode and lockstep step: the records of every instance (trace_dir: where the run's
    trace files are now, if they were moved off the machine that ran it)."""
    steps = []
    for r in compare["modes"].values():
        by_step: dict[int, list[dict]] = defaultdict(list)
        base = Path(r["trace"]) if trace_dir is None else trace_dir / Path(r["trace"]).name
        for i in range(compare["dp_size"]):
            for line in Path(f"{base}.{i}").read_text().splitlines():
                rec = json.loads(line)
                by_step[rec["step"]].append(rec)
        steps += [recs for recs in by_step.values() if len(recs) == compare["dp_size"]]
    return steps


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (drop the most negative column, refit)."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        if coef.min() >= 0:
            return coef
        active.remove(int(np.argmin(coef)))


def fit_profile(compare: dict, steps: list[list[dict]], combine: str = "shared") -> tuple[ProfileCost, dict]:
    """Per step, max over instances of step_s ~ a linear model of the work (decode KV tokens,
    prefill query-key pairs, requests, tokens, foreign queries, a DCP-exchange indicator) + a
    constant (collectives, scheduling), combined over instances as the hardware does:
    "shared": the instances share the host's few cores, so a lockstep step costs about the SUM
    of the instances' work (and at least the busiest instance's, on one core);
    "max": one device per instance, the busiest instance sets the lockstep step."""
    n = compare["dp_size"]

    def pairs(r: dict) -> float:
        return r["attn_pairs"] + r.get("foreign_pairs", 0)

    def foreign_seqs(r: dict, decode_step: bool) -> float:
        # traces before 2026-11-24 lack the count: in an all-decode step each foreign query is
        # one request's; elsewhere prefill chunks dominate and the per-sequence cost is noise
        if "foreign_seqs" in r:
            return r["foreign_seqs"]
        return r.get("foreign_queries", 0) if decode_step else 0

    def features(r: dict, decode_step: bool) -> list[float]:
        return [
            pairs(r) * (r["mode"] == "DECODE"),  # KV tokens read by decodes
            pairs(r) * (r["mode"] != "DECODE"),  # query-key pairs of prefill (or mixed) steps
            r["batch_size"] + foreign_seqs(r, decode_step),  # attention sequences: own + served
            r["num_tokens"],
            r.get("foreign_queries", 0),
            float("foreign_queries" in r) / n,  # the step ran DCP exchanges (charged per instance)
        ]

    def step_features(s: list[dict]) -> list[list[float]]:
        decode_step = all(r["mode"] in ("DECODE", "IDLE") for r in s)
        return [features(r, decode_step) for r in s]

    per = np.array([step_features(s) for s in steps])  # [steps, instances, features]
    y = np.array([max(r["step_s"] for r in s) for s in steps])
    cores = 1 if combine == "max" else os.cpu_count() or 1
    # shared: step = max(cores * max_i w_i, sum_i w_i) + const, w_i = a . features_i: fit the sum first,
    # then refit with the binding term of each step until the assignment settles
    x = np.concatenate([per.sum(1), np.ones((len(steps), 1))], 1)
    for _ in range(8):
        a = nnls(x, y)
        w = per @ a[:-1]
        busiest = w.argmax(1)
        binds = (cores * w.max(1) > w.sum(1)) | (combine == "max")
        x_new = np.where(binds[:, None], cores * per[np.arange(len(steps)), busiest], per.sum(1))
        x_new = np.concatenate([x_new, np.ones((len(steps), 1))], 1)
        if np.allclose(x_new, x):
            break
        x = x_new
    a = nnls(x, y)
    r2 = float(1 - np.sum((y - x @ a) ** 2) / max(1e-12, np.sum((y - y.mean()) ** 2)))
    settings = compare["settings"]
    profile = ProfileCost(
        num_instances=n,
        kv_capacity=int(settings["max_total_tokens"]),
        attn_per_kv_token_s=float(a[0]),
        attn_per_prefill_pair_s=float(a[1]),
        attn_per_request_s=float(a[2]),
        compute_base_s=0.0,
        compute_per_token_s=float(a[3]),
        moe_comm_base_s=float(a[6]),  # the constant: collectives and scheduling of a step
        moe_comm_per_token_s=0.0,
        routing_per_query_s=float(a[4]),
        routing_step_s=float(a[5]) / n,
        combine=combine,
        cores=cores,
        device=compare["device"],
        source=f"fitted to the step traces of {compare['command']} ({compare['date']})",
    )
    return profile, {
        "steps": len(steps),
        "r2_step_time": r2,
        "steps_bound_by_one_instance": float(binds.mean()),
    }


def server_args(compare: dict, mode: str) -> argparse.Namespace:
    """The mode's server flags as the server parsed them (the simulator takes the same values)."""
    s = compare["settings"]
    flags = server_flags(
        "model",
        compare["dp_size"],
        "cpu",
        int(s["max_total_tokens"]),
        *compare["modes"][mode]["flags"],
        *shlex.split(s.get("server_args") or ""),
        chunked_prefill=int(s["chunked_prefill_size"]),
    )
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(flags)


def simulate(
    profile: ProfileCost, compare: dict, mode: str, rate: float, jitter_seed: int | None = None
) -> list[dict]:
    """One simulated run of the compare run's workload. jitter_seed: arrivals shifted by
    |N(0, JITTER_S)| (the real client's requests reach the router a little late, by how busy the
    host is), so that repeated runs show how much P99 moves with the order of near-ties alone."""
    s = compare["settings"]
    args = SimpleNamespace(
        mix=s["mix"], duration=float(s["duration"]), min_requests=int(s["min_requests"]), seed=int(s["seed"])
    )
    work = workload(args, rate)
    if jitter_seed is not None:
        rng = np.random.default_rng(jitter_seed)
        delays = np.abs(rng.normal(0.0, JITTER_S, len(work)))
        work = sorted(
            (dataclasses.replace(r, arrival_s=r.arrival_s + d) for r, d in zip(work, delays)),
            key=lambda r: r.arrival_s,
        )
    a = server_args(compare, mode)
    cfg = PlannerConfig(
        cp_size=a.cp_size, cp_max_degree=a.cp_max_degree, cp_min_shard_tokens=a.cp_min_shard_tokens
    )
    sim = Simulator(
        profile,
        create_cp_policy(a.cp_policy, cfg),
        page_size=a.page_size,
        chunk=a.chunked_prefill_size,
        capacity_tokens=a.max_total_tokens,
        max_running=a.max_running_requests,
        load_balance_method=a.load_balance_method,
        schedule_conservativeness=a.schedule_conservativeness,
        disaggregated=bool(compare.get("disaggregation")),  # compare --disaggregation-prefill-dp
    )
    return sim.run(work).metrics


def p99_tpot(metrics: list[dict]) -> float:
    return percentiles([m["tpot"] for m in metrics])["p99"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", type=Path, default=RESULTS / "compare_cpu_dp4.json")
    p.add_argument("--tag", default=None)
    p.add_argument("--traces", type=Path, default=None, help="folder holding the run's step traces now")
    p.add_argument(
        "--repeat",
        type=Path,
        default=None,
        help="a second run of the same compare command (same workload and flags): the real runs' own "
        "spread is reported next to the simulator's error, and the profile is fitted to both runs' steps",
    )
    p.add_argument(
        "--repeat-traces", type=Path, default=None, help="folder holding the repeat's step traces now"
    )
    p.add_argument(
        "--combine",
        choices=["auto", "shared", "max"],
        default="auto",
        help="how instances' work adds up in a step: shared CPU cores, or one device each (auto: by device)",
    )
    args = p.parse_args(argv)
    compare = json.loads(args.compare.read_text())
    tag = args.tag or args.compare.stem.removeprefix("compare_")
    combine = args.combine
    if combine == "auto":
        combine = "shared" if "cpu" in compare["device"].lower() else "max"
    steps = load_traces(compare, args.traces)
    repeat = None
    if args.repeat is not None:
        repeat = json.loads(args.repeat.read_text())
        where = ("trace_dir", "tag", "only")  # where a run wrote its files and which modes it re-ran

        def ran(c: dict) -> dict:
            return {k: v for k, v in c["settings"].items() if k not in where} | {"dp_size": c["dp_size"]}

        if ran(repeat) != ran(compare):
            raise SystemExit(
                f"--repeat {args.repeat}: not a run of the same compare settings as {args.compare}"
            )
        steps += load_traces(repeat, args.repeat_traces)
    profile, fit = fit_profile(compare, steps, combine)
    (RESULTS / f"profile_{tag}.json").write_text(profile.to_json() + "\n")
    slo = compare["slo"]
    s = compare["settings"]
    points, goodput = [], {}
    fixed_rates = s.get("rates") not in (None, "None", "")  # compare --rates: a grid, not a search
    for mode, r in compare["modes"].items():
        for run in r["runs"]:
            sim = simulate(profile, compare, mode, run["rate"])
            real_p99 = run["summary"]["tpot"]["p99"]
            sim_p99 = p99_tpot(sim)
            jittered = [
                p99_tpot(simulate(profile, compare, mode, run["rate"], seed)) for seed in range(JITTER_RUNS)
            ]
            points.append(
                {
                    "mode": mode,
                    "rate": run["rate"],
                    "real_p99_tpot_ms": 1e3 * real_p99,
                    "sim_p99_tpot_ms": 1e3 * sim_p99,
                    "p99_rel_error": (sim_p99 - real_p99) / real_p99,
                    # the same simulation with arrivals jittered: min / median / max P99
                    "sim_p99_tpot_ms_jitter": [1e3 * float(f(jittered)) for f in (np.min, np.median, np.max)],
                    "real_attainment": attainment(
                        scored(run["requests"]), slo["tpot_ms"] / 1e3, slo["ttft_s"]
                    ),
                    "sim_attainment": attainment(sim, slo["tpot_ms"] / 1e3, slo["ttft_s"]),
                }
            )
            if repeat is not None:
                again = next(x for x in repeat["modes"][mode]["runs"] if x["rate"] == run["rate"])
                repeat_p99 = again["summary"]["tpot"]["p99"]
                points[-1].update(
                    real_p99_tpot_ms_repeat=1e3 * repeat_p99,
                    real_repeat_rel_diff=repeat_p99 / real_p99 - 1,
                    p99_rel_error_vs_real_mean=sim_p99 / ((real_p99 + repeat_p99) / 2) - 1,
                )
        sim_goodput = goodput_search(
            lambda rate, mode=mode: simulate(profile, compare, mode, rate),
            slo["tpot_ms"] / 1e3,
            slo["ttft_s"],
            attain=slo["attainment"],
            lo=float(s["rate_lo"]),
            hi=float(s["rate_hi"]),
            rel_tol=float(s["rel_tol"]),
        ).goodput
        goodput[mode] = {"real": r["goodput_rps"], "sim": sim_goodput}
        if fixed_rates:  # the real goodput is the highest measured rate that met the SLO: same for the sim
            met = [
                x["rate"] for x in points if x["mode"] == mode and x["sim_attainment"] >= slo["attainment"]
            ]
            goodput[mode]["sim_on_real_rates"] = max(met, default=0.0)
    # rank like for like: on the real run's rate grid when it had one
    sim_key = "sim_on_real_rates" if fixed_rates else "sim"
    rank = {k: sorted(goodput, key=lambda m: -goodput[m][k]) for k in ("real", sim_key)}
    rank["sim"] = rank.pop(sim_key)
    tol = float(s["rel_tol"])  # goodputs closer than the search's resolution are a tie

    def order(x: float, y: float) -> int:
        return 0 if abs(x - y) <= tol * max(x, y) else (1 if x > y else -1)

    names = list(goodput)
    agrees = all(
        order(goodput[m]["real"], goodput[o]["real"]) * order(goodput[m][sim_key], goodput[o][sim_key]) >= 0
        for m in names
        for o in names
    )
    errors = [abs(x["p99_rel_error"]) for x in points]
    within = sum(e <= 0.2 for e in errors)
    in_band = sum(
        x["sim_p99_tpot_ms_jitter"][0] <= x["real_p99_tpot_ms"] <= x["sim_p99_tpot_ms_jitter"][2]
        for x in points
    )
    median_errors = [abs(x["sim_p99_tpot_ms_jitter"][1] / x["real_p99_tpot_ms"] - 1) for x in points]
    result = {
        "benchmark": "sim_validation",
        "compare": str(args.compare),
        "profile": json.loads(profile.to_json()),
        "fit": fit,
        "points": points,
        "goodput": goodput,
        "ranking": rank,
        "ranking_agrees": agrees,  # no pair of modes ordered differently (ties within the search resolution)
        "p99_tpot_abs_rel_error": {
            "mean": float(np.mean(errors)),
            "median": float(np.median(errors)),
            "max": float(np.max(errors)),
            "points_within_20pct": f"{within} of {len(errors)}",
        },
        "jitter": {
            "arrival_delay_s": f"|N(0, {JITTER_S})|",
            "runs": JITTER_RUNS,
            "real_p99_inside_sim_range": f"{in_band} of {len(points)}",
            "median_p99_abs_rel_error_mean": float(np.mean(median_errors)),
            "median_points_within_20pct": f"{sum(e <= 0.2 for e in median_errors)} of {len(points)}",
        },
    }
    if repeat is not None:
        real_diffs = [abs(x["real_repeat_rel_diff"]) for x in points]
        mean_errors = [abs(x["p99_rel_error_vs_real_mean"]) for x in points]
        result["repeat"] = {
            "compare": str(args.repeat),
            "real_vs_real_abs_rel_diff_mean": float(np.mean(real_diffs)),
            "real_vs_real_points_within_20pct": f"{sum(e <= 0.2 for e in real_diffs)} of {len(points)}",
            "sim_vs_real_mean_abs_rel_error_mean": float(np.mean(mean_errors)),
            "sim_vs_real_mean_points_within_20pct": f"{sum(e <= 0.2 for e in mean_errors)} of {len(points)}",
            "goodput_real_repeat": {m: repeat["modes"][m]["goodput_rps"] for m in compare["modes"]},
        }
    write_json(RESULTS / f"sim_validation_{tag}.json", result)
    write_report(result, compare, tag)
    return result


def write_report(result: dict, compare: dict, tag: str) -> None:
    plt = pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, marker in zip(result["goodput"], "osD"):
        pts = [x for x in result["points"] if x["mode"] == mode]
        ax.scatter(
            [x["real_p99_tpot_ms"] for x in pts],
            [x["sim_p99_tpot_ms"] for x in pts],
            marker=marker,
            label=mode,
        )
    hi = max(max(x["real_p99_tpot_ms"], x["sim_p99_tpot_ms"]) for x in result["points"]) * 1.1
    ax.plot([0, hi], [0, hi], "k-", lw=0.8)
    ax.fill_between([0, hi], [0, 0.8 * hi], [0, 1.2 * hi], color="grey", alpha=0.15, label="±20%")
    ax.set_xlabel("real P99 TPOT (ms)")
    ax.set_ylabel("simulated P99 TPOT (ms)")
    ax.legend(fontsize=7)
    names = list(result["goodput"])
    x = np.arange(len(names))
    g = result["goodput"]
    grid = all("sim_on_real_rates" in g[n] for n in names)
    w = 0.27 if grid else 0.4
    bx.bar(x - w / 2 * (2 if grid else 1), [g[n]["real"] for n in names], w, label="real")
    bx.bar(x + (0 if grid else w / 2), [g[n]["sim"] for n in names], w, label="simulated (bisection)")
    if grid:
        bx.bar(x + w, [g[n]["sim_on_real_rates"] for n in names], w, label="simulated, real run's rates")
    bx.set_xticks(x, names, fontsize=7)
    bx.set_ylabel(f"goodput (req/s, TPOT <= {compare['slo']['tpot_ms']:.0f} ms)")
    bx.legend(fontsize=7)
    fig.suptitle(f"Simulator vs real run ({compare['device']}, dp={compare['dp_size']})", fontsize=10)
    save_figure(fig, RESULTS / f"sim_validation_{tag}.png")
    lines = [
        "| mode | rate | real P99 TPOT (ms) | sim P99 TPOT (ms) | error | sim, jittered arrivals: min / median / max |"
        " real / sim attainment |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lo, mid, hi = p["sim_p99_tpot_ms_jitter"]
        lines.append(
            f"| {p['mode']} | {p['rate']:.3f} | {p['real_p99_tpot_ms']:.0f} | {p['sim_p99_tpot_ms']:.0f} | "
            f"{100 * p['p99_rel_error']:+.0f}% | {lo:.0f} / {mid:.0f} / {hi:.0f} | "
            f"{p['real_attainment']:.2f} / {p['sim_attainment']:.2f} |"
        )
    g = result["goodput"]
    lines += [
        "",
        "Goodput real / simulated (bisection"
        + (", on the real run's rates" if "sim_on_real_rates" in next(iter(g.values())) else "")
        + "): "
        + "; ".join(
            f"{n} {g[n]['real']:.2f} / {g[n]['sim']:.2f}"
            + (f", {g[n]['sim_on_real_rates']:.2f}" if "sim_on_real_rates" in g[n] else "")
            for n in g
        )
        + ". "
        f"Ranking real {result['ranking']['real']}, simulated {result['ranking']['sim']} "
        f"({'agree' if result['ranking_agrees'] else 'DISAGREE'}). P99 TPOT |error| mean "
        f"{100 * result['p99_tpot_abs_rel_error']['mean']:.0f}%, max {100 * result['p99_tpot_abs_rel_error']['max']:.0f}%; "
        f"{result['p99_tpot_abs_rel_error']['points_within_20pct']} points within 20%.",
        "",
        f"Jittered arrivals ({result['jitter']['runs']} runs, delays {result['jitter']['arrival_delay_s']} s): "
        f"the real P99 lies inside the simulated range at {result['jitter']['real_p99_inside_sim_range']} "
        f"points; the median simulated P99 is within 20% at {result['jitter']['median_points_within_20pct']} "
        f"(mean |error| {100 * result['jitter']['median_p99_abs_rel_error_mean']:.0f}%).",
    ]
    if "repeat" in result:
        rp = result["repeat"]
        lines += [
            "",
            f"Repeat of the real run ({rp['compare']}, same command): real P99 TPOT, first / repeat / "
            "simulated vs their mean:",
            "",
            "| mode | rate | real (ms) | repeat (ms) | real vs real | sim vs real mean |",
            "|---|---|---|---|---|---|",
            *(
                f"| {p['mode']} | {p['rate']:.3f} | {p['real_p99_tpot_ms']:.0f} | {p['real_p99_tpot_ms_repeat']:.0f} | "
                f"{100 * p['real_repeat_rel_diff']:+.0f}% | {100 * p['p99_rel_error_vs_real_mean']:+.0f}% |"
                for p in result["points"]
            ),
            "",
            f"Real vs real: mean |difference| {100 * rp['real_vs_real_abs_rel_diff_mean']:.0f}%, within 20% at "
            f"{rp['real_vs_real_points_within_20pct']} points. Simulated vs the two runs' mean: mean |error| "
            f"{100 * rp['sim_vs_real_mean_abs_rel_error_mean']:.0f}%, within 20% at "
            f"{rp['sim_vs_real_mean_points_within_20pct']}. Repeat's goodput: "
            + "; ".join(f"{m} {g:.2f}" for m, g in rp["goodput_real_repeat"].items())
            + ".",
        ]
    (RESULTS / f"sim_validation_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
