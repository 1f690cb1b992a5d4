"""KV pooling: one request longer than any instance's KV cache, served over the cluster's pool.

In the calibrated simulator with the router's real planner: a 1M-token context (+ 256 output
tokens) on Qwen3-235B-A22B, 8 / 16 instances of one H200 each (about 280k / 430k KV tokens per
instance), next to a background of chat requests, as a decode cluster (prompts prefilled
elsewhere, PD disaggregation: TTFT is the wait for KV room). Each policy's request is first checked with
the server's own up-front rule (request.check_generate against RequestLimits.with_pool, as the
HTTP boundary does): static DP must refuse it (one instance's pool), uniform CP (--cp-size 8)
and DCP serve it. Reported: the long request's degree, TTFT and TPOT, the background's P99 TPOT.

    python -m benchmark.kv_pooling            # -> results/kv_pooling_sim.json

On real servers (--server; benchmark/gpu/kv_pooling.sh: 2 instances sharing one GPU): a DCP
server is asked for the longest request it accepts (/server_info max_request_tokens) and serves
a prompt of that length minus the output (TTFT, TPOT, degree, placement, from a stream); then a
static-DP server with the same flags gets the same request, which it must refuse.

    python -m benchmark.kv_pooling --server --tag h200 --server-args "--model-path ... --dp-size 2 ..."
"""

from __future__ import annotations

import argparse
import json

from benchmark.common import RESULTS, write_json
from benchmark.goodput import percentiles
from benchmark.simulator.cost import H200, MODELS, CostModel
from benchmark.simulator.sim import Simulator
from benchmark.workloads import Request
from nanocp.errors import InvalidRequestError
from nanocp.scheduler.validation import RequestLimits, check_generate
from nanocp_router.planner import cp_policy_from

POLICIES = ("none", "uniform", "dynamic")
VOCAB = 151_936  # the token ids checked up front (Qwen3's vocabulary)


def workload(long_len: int, long_out: int, chat: int, rate: float) -> list[Request]:
    """`chat` requests of 1-4k prompts at `rate` req/s, the long one arriving at t = 1 s."""
    import numpy as np

    rng = np.random.default_rng(0)
    t = np.cumsum(rng.exponential(1 / rate, chat))
    reqs = [Request(float(a), int(rng.integers(1000, 4000)), int(rng.integers(64, 256)), "chat") for a in t]
    reqs.append(Request(1.0, long_len, long_out, "long"))
    return sorted(reqs, key=lambda r: r.arrival_s)


def run(model: str, n: int, policy: str, args) -> dict:
    cost = CostModel(MODELS[model], H200, n)
    page = 64
    pool = cost.kv_capacity_tokens() // page * page
    cp = {"policy": policy, "cp_size": min(8, n), "cp_max_degree": min(8, n), "cp_min_shard_tokens": 4096}
    limits = RequestLimits(VOCAB, 1 << 24, pool).with_pool(cp, [pool] * n, page)
    row = {"model": model, "instances": n, "policy": policy, "instance_kv_tokens": pool,
           "max_request_tokens": limits.kv_capacity(placed=True)[0]}  # fmt: skip
    try:
        check_generate([1] * args.long_len, {"max_new_tokens": args.long_out}, limits, placed=True)
    except InvalidRequestError as e:
        return {**row, "served": False, "refused": str(e)}
    sim = Simulator(
        cost, cp_policy_from(cp), page_size=page, disaggregated=True, load_balance_method="total_requests"
    )
    work = workload(args.long_len, args.long_out, args.chat, args.rate * n)
    metrics = sim.run(work).metrics
    kinds = {i: r.kind for i, r in enumerate(work)}  # Simulator rids are workload indices
    long = next(m for m in metrics if kinds[m["rid"]] == "long")
    chat = [m for m in metrics if kinds[m["rid"]] == "chat"]
    return {
        **row,
        "served": True,
        "long_degree": long["degree"],
        "long_ttft_s": round(long["ttft"], 2),
        "long_tpot_ms": round(1e3 * long["tpot"], 2),
        "chat_requests": len(chat),
        "chat_tpot_ms": {k: round(1e3 * v, 2) for k, v in percentiles([m["tpot"] for m in chat]).items()},
    }


def serve_longest(server_args: list[str], policy: str, prompt_len: int | None, out: int, log: str) -> dict:
    """Against a server started with `server_args --cp-policy policy`: the longest prompt it
    accepts (or `prompt_len`), streamed; TTFT / TPOT from the stream's events."""
    import time

    import httpx
    import numpy as np

    from nanocp.testing.server import ServerProcess

    args = [*server_args, "--cp-policy", policy]
    with (
        ServerProcess(args, log_path=log, ready_timeout=600) as s,
        httpx.Client(base_url=s.url, timeout=3600) as c,
    ):
        info = c.get("/server_info").json()
        n = prompt_len if prompt_len is not None else info["max_request_tokens"] - out
        ids = np.random.default_rng(0).integers(3, info["instances"][0]["vocab_size"], n).tolist()
        body = {
            "input_ids": ids,
            "stream": True,
            "sampling_params": {"max_new_tokens": out, "ignore_eos": True},
        }
        row = {"policy": policy, "instance_kv_tokens": info["max_total_num_tokens"],
               "max_request_tokens": info["max_request_tokens"], "prompt_tokens": n}  # fmt: skip
        t0, stamps, last, first_tokens = time.perf_counter(), [], None, 0
        with c.stream("POST", "/generate", json=body) as r:
            if r.status_code != 200:
                r.read()
                return {
                    **row,
                    "served": False,
                    "status": r.status_code,
                    "refused": r.json()["error"]["message"],
                }
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter() - t0)
                    last = line
                    first_tokens = first_tokens or len(json.loads(line[len("data: ") :])["output_ids"])
        meta = json.loads(last[len("data: ") :])["meta_info"]
        return {**row, "served": meta["completion_tokens"] == out, "ttft_s": round(stamps[0], 2),
                # events may carry several tokens (a slow reader): per token after the first event's
                "tpot_ms": round(1e3 * (stamps[-1] - stamps[0]) / max(1, out - first_tokens), 2),
                "cp_degree": meta.get("cp_degree"), "placement": meta.get("placement")}  # fmt: skip


def main_server(args) -> None:
    import shlex

    from benchmark.common import environment

    server_args = shlex.split(args.server_args)
    log = "/tmp/nanocp-kv-pooling-{}.log"
    dcp = serve_longest(server_args, "dynamic", None, args.out_tokens, log.format("dynamic"))
    print(dcp, flush=True)
    static = serve_longest(server_args, "none", dcp["prompt_tokens"], args.out_tokens, log.format("none"))
    print(static, flush=True)
    path = RESULTS / f"kv_pooling_{args.tag}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    device = "cuda" if "cuda" in server_args else "cpu"
    write_json(path, [*runs, {"benchmark": "kv_pooling", **environment(device), "server_args": server_args,
                              "rows": [dcp, static]}])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", action="store_true", help="measure real servers (see the module docstring)")
    p.add_argument("--server-args", default="", help="flags of both servers (--cp-policy is added)")
    p.add_argument("--out-tokens", type=int, default=32)
    p.add_argument("--tag", default="gpu")
    p.add_argument("--model", default="Qwen3-235B-A22B", choices=sorted(MODELS))
    p.add_argument("--instances", nargs="+", type=int, default=[8, 16])
    p.add_argument("--long-len", type=int, default=1_000_000)
    p.add_argument("--long-out", type=int, default=256)
    p.add_argument("--chat", type=int, default=400, help="background chat requests")
    p.add_argument("--rate", type=float, default=0.5, help="chat requests per second per instance")
    args = p.parse_args()
    if args.server:
        return main_server(args)
    rows = []
    for n in args.instances:
        for policy in POLICIES:
            row = run(args.model, n, policy, args)
            print({k: v for k, v in row.items() if k != "model"}, flush=True)
            rows.append(row)
    cmd = "python -m benchmark.kv_pooling " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k in ("model", "instances", "long_len", "long_out", "chat", "rate")
    )
    write_json(RESULTS / "kv_pooling_sim.json", [{"benchmark": "kv_pooling", "simulated": True, "command": cmd,
                                                  "rows": rows}])  # fmt: skip


if __name__ == "__main__":
    main()
