"""Decode step time with expert parallelism, per --moe-a2a-backend, eager and from CUDA graphs.

`world` ranks (one GPU each, or sharing GPUs through the IPC backend) each build the real model
runner for dp = ep = world (`--load-format dummy`), hold `batch` synthetic decode requests of
`context` tokens, and run decode steps together (every step has the MoE exchange of all layers).
Reported: rank 0's mean step time per (backend, batch, context), eager and graph. Backends
that cannot be captured (all_to_all: host-side splits) are eager only.

    python -m benchmark.ep_decode_step --model-path benchmark/configs/qwen3-30b-a3b --world 2 \
        --backends all_to_all ipc deepep --batch 1 8 32 64 --context 4096
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.multiprocessing as mp

from benchmark.common import RESULTS, environment, pyplot, save_figure, write_json


def _timer(device: torch.device):
    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]
    return time.perf_counter


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, backend: str, out) -> None:
    import torch.distributed as dist

    from benchmark.decode_step import decode_batch
    from nanocp import ServerArgs
    from nanocp.distributed.parallel_state import destroy_parallel_state, init_parallel_state, instance_device
    from nanocp.kvcache.manager import KVManager
    from nanocp.model_executor.model_runner import ModelRunner

    device = instance_device(rank, args.device)
    parallel = init_parallel_state(
        rank, world, world, device, f"tcp://127.0.0.1:{port}", force_group=True
    )  # barriers
    sa = ServerArgs(
        model_path=args.model_path,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        dp_size=world,
        ep_size=world,
        cp_policy="none",
        moe_a2a_backend=backend,
        attention_backend="triton" if args.device == "cuda" else "torch",
        cuda_graph_max_bs=max(args.batch),
        max_running_requests=max(args.batch),
        max_total_tokens=args.max_total_tokens,
        skip_tokenizer_init=True,
        random_seed=0,
    )
    runner = ModelRunner(sa, parallel)
    kv = KVManager(runner.page_allocator, runner.req_to_token_pool)
    now = _timer(device)
    rows = []
    for context in args.context:
        for bs in args.batch:
            if bs * (context + 1) > runner.max_total_num_tokens:
                continue
            batch, reqs = decode_batch(runner, kv, bs, context)
            batch.global_num_tokens = [bs] * world
            row = {"batch": bs, "context": context}
            modes = (
                [("eager", None), ("graph", runner.graph_runner)]
                if runner.graph_runner
                else [("eager", None)]
            )
            for name, graphs in modes:
                saved, runner.graph_runner = runner.graph_runner, graphs
                for _ in range(3):
                    runner.forward(batch)
                dist.barrier(group=parallel.cpu_group)
                t0 = now()
                for _ in range(args.iters):
                    runner.forward(batch)
                row[f"{name}_ms"] = 1e3 * (now() - t0) / args.iters
                runner.graph_runner = saved
            rows.append(row)
            for r in reqs:
                kv.release(r)
            if rank == 0:
                print(f"  {backend:10s} batch {bs:4d} context {context:6d}: {row}", flush=True)
    if rank == 0:
        out.put(rows)
    dist.barrier(group=parallel.cpu_group)
    runner.shutdown()
    destroy_parallel_state()


def run_backend(args: argparse.Namespace, backend: str) -> list[dict]:
    from nanocp_router.ipc import free_tcp_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _rank, args=(args.world, free_tcp_port(), args, backend, out), nprocs=args.world, start_method="spawn"
    )
    return out.get()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="benchmark/configs/qwen3-30b-a3b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["all_to_all", "ipc", "deepep"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, nargs="+", default=[4096])
    p.add_argument("--max-total-tokens", type=int, default=300_000)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    result = {
        "benchmark": "ep_decode_step",
        **environment(),
        "command": "python -m benchmark.ep_decode_step " + " ".join(sys.argv[1:] if argv is None else argv),
        "world": args.world,
        "model": args.model_path,
        "backends": {},
    }
    for backend in args.backends:
        print(f"{backend} ...", flush=True)
        try:
            result["backends"][backend] = run_backend(args, backend)
        except Exception as e:  # e.g. deep_ep missing: record why, go on with the others
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            result["backends"][backend] = {"error": why}
            print(f"  {backend} failed: {why}", flush=True)
    tag = args.tag or f"{args.device}_x{args.world}"
    write_json(RESULTS / f"ep_decode_step_{tag}.json", result)
    plot(result, tag)
    return result


def plot(result: dict, tag: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend, rows in result["backends"].items():
        if not isinstance(rows, list) or not rows:
            continue
        context = rows[0]["context"]
        rows = [r for r in rows if r["context"] == context]
        for mode, style in (("eager", "--"), ("graph", "-")):
            pts = [(r["batch"], r[f"{mode}_ms"]) for r in rows if f"{mode}_ms" in r]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{backend} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch per rank")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"EP decode step, {result['world']} ranks ({result.get('device', '')})", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, RESULTS / f"ep_decode_step_{tag}.png")


if __name__ == "__main__":
    main()
