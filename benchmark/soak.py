"""Soak: many mixed requests against a dp=2 server with dynamic CP; nothing lost, hung or leaked.

    python -m benchmark.soak --requests 2000            # the committed run (results/soak_cpu_dp2.json)
    python -m benchmark.soak --requests 500 --no-save   # what CI runs (test_reliability)

The mix (seeded): short and long prompts (long ones are sharded over both instances), greedy and
sampled, streamed and not, over /generate, /v1/completions and /v1/chat/completions; some
aborted (a client that leaves mid-stream, or /abort_request), some invalid (hostile bodies).
Checked: every valid request that was not aborted returns exactly its max_new_tokens (ignore_eos)
once (lost = 0), every request answers within --timeout-s (hung = 0), every invalid one gets a
4xx, no answer is a 5xx, and afterwards every instance is idle with its whole KV pool free
(leaked pages = 0). Worker RSS is read after a warm-up and at the end (growth, MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmark.common import RESULTS, environment

INVALID = [  # (path, raw body): each must get a 4xx
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("/generate", b'{"text": "\\ud800"}'),
    ("/generate", b'{"text": "hi"'),
    ("/generate", b'{"input_ids": [1, 1e30]}'),
    ("/generate", b'{"text": "hi", "sampling_params": {"max_new_tokens": 18446744073709551615}}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("/generate", b"[" * 5000 + b"]" * 5000),
    ("/generate", b'{"text": "\xff"}'),
    ("/abort_request", b'{"rid": 5}'),
]


@dataclass
class Job:
    kind: str  # "ok", "abort_disconnect", "abort_request", "invalid"
    path: str
    body: Any  # dict, or raw bytes for invalid jobs
    expect_tokens: int = 0
    stream: bool = False


def make_jobs(n: int, seed: int, vocab: int = 500) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        r = rng.random()
        if r < 0.1:
            jobs.append(Job("invalid", *rng.choice(INVALID)))
            continue
        long = rng.random() < 0.15
        prompt = [
            rng.randrange(3, vocab) for _ in range(rng.randint(300, 1200) if long else rng.randint(4, 64))
        ]
        new = rng.randint(8, 32) if long else rng.randint(4, 24)
        sp = {"max_new_tokens": new, "ignore_eos": True}
        sp.update({"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "sampling_seed": i})
        stream = rng.random() < 0.3
        kind = "ok" if r < 0.8 else ("abort_disconnect" if r < 0.9 else "abort_request")
        if kind != "ok":  # a disconnect leaves a stream; /abort_request ends a plain request
            stream = kind == "abort_disconnect"
        path = "/generate" if kind != "ok" else rng.choice(["/generate"] * 3 + ["/v1/completions"])
        if path == "/generate":
            body = {"input_ids": prompt, "sampling_params": {**sp, "max_new_tokens": 400 if kind != "ok" else new},
                    "stream": stream, "rid": f"soak-{i}"}  # fmt: skip
        else:
            body = {"prompt": prompt, "max_tokens": new, "stream": stream, "ignore_eos": True, "rid": f"soak-{i}",
                    **{k: v for k, v in sp.items() if k != "max_new_tokens"}}  # fmt: skip
            body["seed"] = body.pop("sampling_seed", None)
            body["stream_options"] = {"include_usage": True} if stream else None
        jobs.append(Job(kind, path, body, new, stream))
    return jobs


def completion_tokens(path: str, stream: bool, text: str) -> int:
    if not stream:
        data = json.loads(text)
        return (
            data["meta_info"]["completion_tokens"]
            if path == "/generate"
            else data["usage"]["completion_tokens"]
        )
    events = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]
    if path == "/generate":
        return events[-1]["meta_info"]["completion_tokens"]
    return events[-1]["usage"]["completion_tokens"]  # stream_options.include_usage


async def run_job(client: httpx.AsyncClient, job: Job, counts: dict[str, int], errors: list[str]) -> None:
    try:
        if job.kind == "invalid":
            r = await client.post(job.path, content=job.body, headers={"content-type": "application/json"})
            ok = 400 <= r.status_code < 500
            counts["invalid_4xx" if ok else "invalid_wrong"] += 1
            if not ok:
                errors.append(f"invalid {job.body[:80]!r}: {r.status_code} {r.text[:200]}")
            return
        if job.kind == "abort_request":
            task = asyncio.ensure_future(client.post(job.path, json=job.body))
            await asyncio.sleep(random.Random(job.body["rid"]).uniform(0.05, 0.5))
            await client.post("/abort_request", json={"rid": job.body["rid"]})
            r = await task
            reason = r.json()["meta_info"]["finish_reason"]["type"] if r.status_code == 200 else None
            counts["aborted" if reason == "abort" else "abort_finished_first"] += 1
            if r.status_code != 200:
                errors.append(f"abort_request: {r.status_code} {r.text[:200]}")
            return
        async with client.stream("POST", job.path, json=job.body) as r:
            if job.kind == "abort_disconnect":  # leave after the first event
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        break
                counts["disconnected"] += 1
                return
            text = (await r.aread()).decode()
        if r.status_code != 200:
            counts["failed"] += 1
            errors.append(f"{job.path} {job.body.get('rid')}: {r.status_code} {text[:200]}")
            return
        if (
            job.path == "/generate"
            and not job.stream
            and json.loads(text)["meta_info"].get("cp_degree", 1) > 1
        ):
            counts["sharded"] += 1  # of the served, those whose KV was spread over both instances
        got = completion_tokens(job.path, job.stream, text)
        counts["served" if got == job.expect_tokens else "lost"] += 1
        if got != job.expect_tokens:
            errors.append(f"{job.body.get('rid')}: {got} of {job.expect_tokens} tokens")
    except httpx.TimeoutException:
        counts["hung"] += 1
        errors.append(f"{job.kind} {job.path}: no answer in time")
    except Exception as e:  # a malformed answer: counted, the soak goes on
        counts["failed"] += 1
        errors.append(f"{job.kind} {job.path}: {type(e).__name__}: {e}")


def worker_rss_mib(client: httpx.Client) -> dict[str, float]:
    out = {}
    for inst in client.get("/server_info").json()["instances"]:
        with open(f"/proc/{inst['pid']}/status") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        out[str(inst["instance"])] = round(kb / 1024, 1)
    return out


def wait_idle(client: httpx.Client, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        cluster = client.get("/server_info").json()["cluster"]
        if all(
            i["running"] == 0 and i["waiting"] == 0 and i["free_pages"] == i["total_pages"] for i in cluster
        ):
            return cluster
        if time.monotonic() > deadline:
            return cluster
        time.sleep(0.2)


async def run_all(url: str, jobs: list[Job], concurrency: int, timeout_s: float, counts, errors) -> None:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        done = 0

        async def one(job: Job) -> None:
            nonlocal done
            async with sem:
                await run_job(client, job, counts, errors)
            done += 1
            if done % 250 == 0:
                print(f"  {done}/{len(jobs)} requests", flush=True)

        await asyncio.gather(*(one(j) for j in jobs))


def soak(url: str, requests: int, seed: int = 0, concurrency: int = 32, timeout_s: float = 120.0) -> dict:
    """Run the soak against a server at `url`; the figures (see the module docstring)."""
    import collections

    jobs = make_jobs(requests, seed)
    counts: collections.Counter = collections.Counter()
    errors: list[str] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        warm = make_jobs(40, seed + 1)  # allocator and caches settle before the first RSS reading
        asyncio.run(
            run_all(
                url, [j for j in warm if j.kind == "ok"], concurrency, timeout_s, collections.Counter(), []
            )
        )
        wait_idle(client)
        rss0 = worker_rss_mib(client)
        t0 = time.perf_counter()
        asyncio.run(run_all(url, jobs, concurrency, timeout_s, counts, errors))
        elapsed = time.perf_counter() - t0
        cluster = wait_idle(client)
        rss1 = worker_rss_mib(client)
        alive = client.post("/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3}})
    return {
        "requests": requests,
        "seed": seed,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 1),
        "counts": dict(sorted(counts.items())),
        "lost": counts["lost"] + counts["failed"],
        "hung": counts["hung"],
        "invalid_not_4xx": counts["invalid_wrong"],
        "leaked_pages": sum(i["total_pages"] - i["free_pages"] for i in cluster),
        "busy_after": sum(i["running"] + i["waiting"] for i in cluster),
        "served_after": alive.status_code == 200,
        "worker_rss_mib_start": rss0,
        "worker_rss_mib_end": rss1,
        "worker_rss_growth_mib": max(rss1[k] - rss0[k] for k in rss0),
        "errors": errors[:20],
    }


def server_args(model: str) -> list[str]:
    return [
        "--model-path", model, "--device", "cpu", "--dp-size", "2", "--ep-size", "2",
        "--max-total-tokens", "4096", "--chunked-prefill-size", "128", "--cp-min-shard-tokens", "128",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "soak_cpu_dp2.json")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    from nanocp.testing.server import ServerProcess
    from nanocp.testing.tiny_model import cached_tiny_model

    model = cached_tiny_model("soak-tiny-moe")
    with ServerProcess(server_args(model), log_path="/tmp/nanocp-soak-server.log") as s:
        print(
            f"soak: {args.requests} requests at concurrency {args.concurrency} (server log /tmp/nanocp-soak-server.log)"
        )
        result = soak(s.url, args.requests, args.seed, args.concurrency, args.timeout_s)
    result = {"benchmark": "soak", **environment(), "command": " ".join(["python -m benchmark.soak", *_argv()]),
              "server_args": server_args("<tiny moe>"), **result}  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k not in ("errors", "server_args")}, indent=1))
    for e in result["errors"]:
        print("  ", e)
    if not args.no_save:
        runs = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps([*runs, result], indent=2) + "\n")
        print(f"wrote {args.out}")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
