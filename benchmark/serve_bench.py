"""Drive a running server with a workload and measure every request.

The built-in client streams SGLang-native /generate requests (token ids in, so lengths are
exact) at the workload's arrival times and records per request: TTFT, inter-token latencies,
TPOT, E2E and the context-parallel degree the router gave it (meta_info.cp_degree).
`--client bench_serving` runs SGLang's own `python -m sglang.bench_serving` on the same
workload instead (exported as its `custom` dataset; it draws its own Poisson arrivals at the
workload's mean rate and retokenizes the prompts, so lengths may shift by a few tokens).

    python -m benchmark.serve_bench --url http://127.0.0.1:30000 --mix chat-docs-small \
        --num-requests 64 --rate 4
    python -m benchmark.serve_bench --url ... --client bench_serving --tokenizer MODEL_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmark.goodput import percentiles
from benchmark.workloads import Request, make_workload, summary, to_bench_serving_jsonl

FIRST_ID = 10  # prompt ids avoid the low (special) ids of the test tokenizers


def prompt_ids(req: Request, index: int, vocab: int) -> list[int]:
    """Deterministic prompt token ids of a workload request."""
    span = max(1, vocab - FIRST_ID)
    return [FIRST_ID + (index * 7919 + i * 104729) % span for i in range(req.input_len)]


async def _one(client: httpx.AsyncClient, req: Request, index: int, vocab: int, t0: float) -> dict:
    await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
    body = {
        # the request id names the workload request, so the server's step traces can be joined
        # with it (unique per run: the server refuses ids in use)
        "rid": f"bench{int(t0 * 1000) % 10**9}-{index}",
        "input_ids": prompt_ids(req, index, vocab),
        "sampling_params": {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True},
    }
    m = {"index": index, "kind": req.kind, "input_len": req.input_len}
    return await stream_request(client, body, m)


async def stream_request(client: httpx.AsyncClient, body: dict, m: dict) -> dict:
    """POST a /generate request streaming and record into m: ttft, itl, tpot, e2e, output_len,
    cp_degree, cached_tokens, placement (and output_ids with body["return_output_ids"]); or the
    error."""
    want_ids = body.get("return_output_ids", False)  # the client's flag, not sent
    body = {**{k: v for k, v in body.items() if k != "return_output_ids"}, "stream": True}
    m.update(output_len=0, itl=[])
    start = time.perf_counter()
    last, tokens, meta, ids = start, 0, {}, []
    try:
        async with client.stream("POST", "/generate", json=body) as res:
            if res.status_code != 200:
                raise RuntimeError(f"HTTP {res.status_code}: {(await res.aread()).decode()[:200]}")
            async for line in res.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"]))
                meta = chunk["meta_info"]
                ids = chunk.get("output_ids")
                now, n = time.perf_counter(), meta["completion_tokens"]
                if n > tokens:
                    if tokens == 0:  # tokens arriving with the first one count as ITL 0
                        m["ttft"] = now - start
                        m["itl"] += [0.0] * (n - 1)
                    else:
                        m["itl"] += [(now - last) / (n - tokens)] * (n - tokens)
                    last, tokens = now, n
    except Exception as e:  # a failed request is recorded, never dropped
        m["error"] = f"{type(e).__name__}: {e}"
    m["e2e"] = time.perf_counter() - start
    m["output_len"] = tokens
    m["cp_degree"] = meta.get("cp_degree", 1)
    m["cached_tokens"] = meta.get("cached_tokens", 0)
    if want_ids:  # the whole output (streamed chunks carry all so far)
        m["output_ids"] = ids or []
    if meta.get("placement"):  # [instance, tokens] per KV segment; the home holds the last one
        m["placement"] = meta["placement"]
    if "ttft" in m:
        m["tpot"] = (m["e2e"] - m["ttft"]) / (tokens - 1) if tokens > 1 else 0.0
    elif "error" not in m:
        m["error"] = "no token received"
    return m


async def run_workload(url: str, work: list[Request], vocab: int) -> list[dict]:
    """Send every request at its arrival time; one metrics dict per request, in workload order."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(_one(client, r, i, vocab, t0) for i, r in enumerate(work)))


def summarize(metrics: list[dict], elapsed_s: float | None = None) -> dict:
    ok = [m for m in metrics if "error" not in m]
    out = {
        "completed": len(ok),
        "failed": len(metrics) - len(ok),
        "ttft": percentiles([m["ttft"] for m in ok]),
        "tpot": percentiles([m["tpot"] for m in ok if m["output_len"] > 1]),
        "itl": percentiles([x for m in ok for x in m["itl"]]),
        "e2e": percentiles([m["e2e"] for m in ok]),
        "cp_degrees": {
            str(d): sum(1 for m in ok if m["cp_degree"] == d) for d in sorted({m["cp_degree"] for m in ok})
        },
    }
    if elapsed_s:
        out["elapsed_s"] = elapsed_s
        out["request_throughput"] = len(ok) / elapsed_s
        out["output_throughput"] = sum(m["output_len"] for m in ok) / elapsed_s
    return out


def server_vocab(url: str) -> int:
    info = httpx.get(url + "/server_info", timeout=30).json()
    return int(info["instances"][0]["vocab_size"])


def run_bench_serving(
    url: str, work: list[Request], tokenizer: str, rate: float, out_dir: Path
) -> list[dict]:
    """SGLang's bench_serving on the workload; per-request metrics in serve_bench's format."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    dataset, result = out_dir / "workload.jsonl", out_dir / "bench_serving.jsonl"
    to_bench_serving_jsonl(work, AutoTokenizer.from_pretrained(tokenizer), dataset)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    cmd = [
        sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", host, "--port", port,
        "--dataset-name", "custom", "--dataset-path", str(dataset), "--num-prompts", str(len(work)),
        "--request-rate", str(rate), "--tokenizer", tokenizer, "--model", tokenizer,
        "--output-file", str(result), "--output-details", "--disable-tqdm",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rec = json.loads(result.read_text().splitlines()[-1])
    metrics = []
    for i, (n_in, n_out, ttft, itl, err) in enumerate(
        zip(rec["input_lens"], rec["output_lens"], rec["ttfts"], rec["itls"], rec["errors"])
    ):
        m = {"index": i, "input_len": n_in, "output_len": n_out, "itl": list(itl), "cp_degree": 1}
        if err:
            m["error"] = err
        else:
            m["ttft"], m["e2e"] = ttft, ttft + sum(itl)
            m["tpot"] = sum(itl) / (n_out - 1) if n_out > 1 else 0.0
        metrics.append(m)
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--mix", default="chat-docs-small")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=4.0, help="mean request rate (req/s); inf: all at once")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client", default="native", choices=["native", "bench_serving"])
    p.add_argument("--tokenizer", help="model or tokenizer dir (bench_serving client)")
    p.add_argument("--output", type=Path, help="write the per-request metrics and summary here (JSON)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = make_workload(args.mix, args.num_requests, args.rate, args.seed, args.arrival, args.cv)
    t0 = time.perf_counter()
    if args.client == "native":
        metrics = asyncio.run(run_workload(args.url, work, server_vocab(args.url)))
    else:
        if not args.tokenizer:
            sys.exit("--client bench_serving needs --tokenizer (the model directory)")
        metrics = run_bench_serving(args.url, work, args.tokenizer, args.rate, Path(tempfile.mkdtemp()))
    result = {"workload": summary(work), "summary": summarize(metrics, time.perf_counter() - t0)}
    print(json.dumps(result["summary"], indent=1))
    if args.output:
        args.output.write_text(json.dumps({**result, "requests": metrics}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
