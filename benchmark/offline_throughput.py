"""Offline throughput of nanocp.Engine: random prompts, fixed output length, tokens/s.

CPU (default: the tiny demo-size MoE model, created on the fly):
    python -m benchmark.offline_throughput --num-prompts 64 --input-len 256 --output-len 64
GPU, real-size Qwen3-30B-A3B shape with random weights:
    python -m benchmark.offline_throughput --model-path benchmark/configs/qwen3-30b-a3b \
        --load-format dummy --skip-tokenizer-init --num-prompts 64 --input-len 1024 --output-len 128

Every ServerArgs flag is accepted. Results are appended to benchmark/results/ as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import time
from pathlib import Path

import torch

from benchmark.common import bench_model_path
from nanocp import Engine, ServerArgs

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ServerArgs]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ServerArgs.add_cli_args(parser)
    b = parser.add_argument_group("benchmark")
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--input-len", type=int, default=256)
    b.add_argument("--output-len", type=int, default=64)
    b.add_argument(
        "--random-range-ratio",
        type=float,
        default=1.0,
        help="lengths drawn uniformly from [ratio*len, len] (1.0: all equal)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--warmup-prompts", type=int, default=2)
    b.add_argument(
        "--result-file",
        type=str,
        default=None,
        help="default: benchmark/results/offline_throughput_<device>.json",
    )
    args = parser.parse_args(argv)
    if args.model_path is None:
        args.model_path = bench_model_path()
    try:
        server_args = ServerArgs.from_cli_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args, server_args


def make_requests(args, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)

    def length(n: int) -> int:
        return rng.randint(max(1, int(n * args.random_range_ratio)), n)

    return [
        ([rng.randrange(10, vocab) for _ in range(length(args.input_len))], length(args.output_len))
        for _ in range(args.num_prompts)
    ]


def main(argv: list[str] | None = None) -> dict:
    args, server_args = parse_args(argv)
    t0 = time.perf_counter()
    with Engine(server_args=server_args) as engine:
        load_s = time.perf_counter() - t0
        vocab = engine.runner.vocab_size
        if engine.tokenizer is not None:
            vocab = min(vocab, len(engine.tokenizer))
        reqs = make_requests(args, vocab)
        params = [{"max_new_tokens": out, "temperature": 0.0, "ignore_eos": True} for _, out in reqs]
        if args.warmup_prompts:
            engine.generate(
                input_ids=[r[0] for r in reqs[: args.warmup_prompts]],
                sampling_params=params[: args.warmup_prompts],
            )
        sync = torch.cuda.synchronize if server_args.device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        done, last_report = 0, start
        out_tokens = 0
        for chunk in engine.generate(input_ids=[r[0] for r in reqs], sampling_params=params, stream=True):
            out_tokens += len(chunk["output_ids"])
            if chunk["meta_info"]["finish_reason"] is not None:
                done += 1
            if time.perf_counter() - last_report > 10:
                last_report = time.perf_counter()
                print(f"  {done}/{len(reqs)} requests done, {out_tokens} tokens", flush=True)
        sync()
        elapsed = time.perf_counter() - start
        in_tokens = sum(len(r[0]) for r in reqs)
        result = {
            "benchmark": "offline_throughput",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name()
            if server_args.device == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__,
            "model": server_args.model_path,
            "load_format": server_args.load_format,
            "dtype": str(engine.runner.dtype),
            "attention_backend": server_args.attention_backend,
            "page_size": server_args.page_size,
            "num_prompts": len(reqs),
            "input_tokens": in_tokens,
            "output_tokens": out_tokens,
            "load_s": round(load_s, 2),
            "elapsed_s": round(elapsed, 3),
            "request_throughput": round(len(reqs) / elapsed, 3),
            "output_tok_s": round(out_tokens / elapsed, 2),
            "total_tok_s": round((in_tokens + out_tokens) / elapsed, 2),
            "forward_steps": engine.scheduler.forward_ct,
            "retractions": engine.scheduler.num_retractions,
        }
    print(json.dumps(result, indent=2))
    path = (
        Path(args.result_file)
        if args.result_file
        else RESULTS / f"offline_throughput_{server_args.device}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(result)
    path.write_text(json.dumps(history, indent=2) + "\n")
    print(f"appended to {path}")
    return result


if __name__ == "__main__":
    main()
