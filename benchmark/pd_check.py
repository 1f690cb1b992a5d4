"""Prefill/decode disaggregation against the colocated server: the same greedy tokens for prompts
of many lengths, for each KV transfer backend, and what the transfers cost (bytes, prefill +
transfer time on the prefill server, time from planning until every segment landed, TTFT).

    python -m benchmark.pd_check                                   # CPU, tiny MoE, fp32
    python -m benchmark.pd_check --device cuda --tag h100 \\
        --server-args "--attention-backend triton --max-total-tokens 65536"   # GPU: VRAM -> VRAM
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import httpx

from benchmark.common import RESULTS, environment, write_json
from nanocp.registries import KV_TRANSFER_BACKENDS
from nanocp.testing.server import ServerProcess, free_port_range
from nanocp.testing.tiny_model import cached_tiny_model

LENGTHS = [1, 7, 64, 300, 1000, 3000]


def prompts(vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]


def generate(url: str, ps: list[list[int]], new: int) -> tuple[list[list[int]], list[float]]:
    outs, ttfts = [], []
    with httpx.Client(base_url=url, timeout=600) as c:
        for p in ps:  # one at a time: TTFT without queueing
            body = {
                "input_ids": p,
                "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
            }
            t0 = time.perf_counter()
            with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                r.raise_for_status()
                first = None
                last = ""
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter()
                        last = line
            import json

            outs.append(json.loads(last[len("data: ") :])["output_ids"])
            ttfts.append(first - t0)
    return outs, ttfts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: a tiny Qwen3-MoE (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--decode-dp", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--server-args", default="", help="extra launch_server flags for every server")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    model = args.model_path or cached_tiny_model("pd-check-moe", arch="qwen3_moe")
    base = ["--model-path", model, "--device", args.device, "--dtype", args.dtype, "--page-size", "16",
            "--chunked-prefill-size", "512", *shlex.split(args.server_args)]  # fmt: skip
    dp = ["--dp-size", str(args.decode_dp), "--ep-size", str(args.decode_dp)]
    result = {
        "benchmark": "pd_check",
        **environment(args.device),
        "command": "python -m benchmark.pd_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": model,
        "lengths": LENGTHS,
        "runs": {},
    }
    with ServerProcess([*base, *dp], log_path="/tmp/nanocp-pd-colocated.log", ready_timeout=900) as s:
        vocab = httpx.get(s.url + "/model_info").json()["vocab_size"]
        ps = prompts(vocab)
        expected, ttft = generate(s.url, ps, args.new_tokens)
    result["runs"]["colocated"] = {"ttft_s": ttft}
    for name, cls in KV_TRANSFER_BACKENDS.classes().items():
        if not cls.available():
            continue
        t = ["--disaggregation-transfer-backend", name]
        boot = free_port_range(1)
        pre_args = [
            *base,
            *t,
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(boot),
        ]
        with ServerProcess(pre_args, log_path=f"/tmp/nanocp-pd-prefill-{name}.log", ready_timeout=900) as pre:
            dec_args = [
                *base,
                *dp,
                *t,
                "--disaggregation-mode",
                "decode",
                "--disaggregation-prefill-url",
                pre.url,
            ]
            with ServerProcess(
                dec_args, log_path=f"/tmp/nanocp-pd-decode-{name}.log", ready_timeout=900
            ) as dec:
                outs, ttft = generate(dec.url, ps, args.new_tokens)
                time.sleep(0.5)  # the router's snapshot (at most every 100 ms) of the last request
                d = httpx.get(dec.url + "/server_info").json()["disaggregation"]
        same = [o == e for o, e in zip(outs, expected)]
        result["runs"][name] = {"tokens_equal": same, "ttft_s": ttft, "disaggregation": d}
        print(
            f"{name}: tokens equal {sum(same)}/{len(same)}, {d['kv_bytes'] / 1e6:.1f} MB, prefill+transfer "
            f"{d['transfer_s']:.2f} s, waiting for KV {d['kv_wait_s']:.2f} s over {d['requests']} requests; "
            f"TTFT at {LENGTHS[-1]} tokens {1e3 * ttft[-1]:.0f} ms (colocated "
            f"{1e3 * result['runs']['colocated']['ttft_s'][-1]:.0f} ms)",
            flush=True,
        )
    tag = args.tag or args.device
    write_json(RESULTS / f"pd_check_{tag}.json", result)
    return result


if __name__ == "__main__":
    main()
