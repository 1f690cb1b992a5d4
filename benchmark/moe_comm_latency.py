"""Per-layer MoE time with each --moe-a2a-backend over expert-parallel ranks (one GPU each):
dispatch + grouped expert GEMM + combine, Qwen3-30B-A3B expert shape (hidden 2048, 128 experts,
top-8, intermediate 768, bf16), 1-256 tokens per rank, uniform random routing.

- all_to_all: NCCL all_to_all_single with host-side counts (eager only: it syncs with the host);
- ipc: the CUDA-IPC routing backend (device counts), eager and replayed from a CUDA graph;
- deepep: DeepEP low-latency dispatch/combine, eager and graph (when deep_ep imports);
- deepep_fp8: the same with --deepep-fp8-dispatch (FP8 tokens, dequantized on arrival);
- local: every expert on one GPU, no exchange (the compute floor of one rank's tokens).

    python -m benchmark.moe_comm_latency --world 2 [--profile 1 64]

--world 1 runs every backend on one GPU (exchanges to itself): the backend's own overhead
without the link. --profile T...: the kernels of one graph-replayed layer at T tokens per rank,
per backend (saved in the result).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from benchmark.common import (
    RESULTS,
    environment,
    gpu_tag,
    kernel_profile,
    print_kernel_profile,
    pyplot,
    save_figure,
    write_json,
)
from benchmark.routing_latency import GRAPH_CALLS, _graph, _time
from nanocp.testing.multiproc import run_ranks

HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _experts(rank: int, world: int, dev: torch.device):
    from nanocp.layers.moe import FusedMoE

    m = FusedMoE(EXPERTS, TOP_K, HIDDEN, INTER, True, ep_rank=rank, ep_size=world).to(dev, torch.bfloat16)
    torch.nn.init.normal_(m.w13_weight, std=0.02)
    torch.nn.init.normal_(m.w2_weight, std=0.02)
    m.runner_backend = "triton"
    return m


def _inputs(tokens: int, dev: torch.device, seed: int):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, device=dev, generator=g, dtype=torch.bfloat16)
    logits = torch.randn(tokens, EXPERTS, device=dev, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), TOP_K, dim=-1)
    return x, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16), ids


class _Fp8Dispatch:
    """The DeepEP backend with FP8 dispatch for the calls made through it (graphs keep the path
    they were captured with)."""

    def __init__(self, comm) -> None:
        self.comm = comm

    def forward(self, *args):
        self.comm.use_fp8 = True
        try:
            return self.comm.forward(*args)
        finally:
            self.comm.use_fp8 = False


def _bench(rank: int, world: int, iters: int, profile_tokens: list[int], queue) -> None:
    from nanocp.distributed.a2a import A2AComm
    from nanocp.distributed.moe_comm import create_moe_comm
    from nanocp.distributed.parallel_state import ParallelState

    dev = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(dev)
    nccl = dist.new_group(backend="nccl")
    state = ParallelState(
        rank, world, rank, world, nccl, dist.group.WORLD, dev, A2AComm(nccl, dist.group.WORLD)
    )
    experts = _experts(rank, world, dev)
    local = _experts(0, 1, dev) if rank == 0 else None
    kw = dict(hidden_size=HIDDEN, num_experts=EXPERTS, max_tokens_per_rank=max(TOKENS), top_k=TOP_K)
    backends = {
        "all_to_all": create_moe_comm("all_to_all", state, force=True, **kw),
        "ipc": create_moe_comm("ipc", state, force=True, **kw),
    }
    try:
        backends["deepep"] = create_moe_comm("deepep", state, **kw)
        backends["deepep_fp8"] = _Fp8Dispatch(backends["deepep"])  # one DeepEP buffer per process
        deepep_error = None
    except Exception as e:  # recorded in the result: why DeepEP did not run
        deepep_error = f"{type(e).__name__}: {e}"
    rows = []
    for tokens in TOKENS:
        rows.append(_measure(backends, experts, local, tokens, world, rank, dev, iters))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    profiles = [_profile(backends, experts, local, t, world, rank, dev) for t in profile_tokens]
    dist.barrier()
    if rank == 0:
        queue.put({"world": world, "rows": rows, "deepep_error": deepep_error, "profiles": profiles})


def _measure(backends: dict, experts, local, tokens: int, world: int, rank: int, dev, iters: int) -> dict:
    x, w, ids = _inputs(tokens, dev, seed=rank)
    row: dict = {"tokens_per_rank": tokens}
    for name, comm in backends.items():

        def layer(comm=comm) -> torch.Tensor:
            return comm.forward(x, w, ids, experts, [tokens] * world)

        row[f"{name}_eager_us"] = 1e6 * _time(layer, iters)
        if name != "all_to_all":
            g = _graph(layer)
            row[f"{name}_graph_us"] = 1e6 * _time(g.replay, max(1, iters // GRAPH_CALLS)) / GRAPH_CALLS
    if local is not None:
        g = _graph(lambda: local.run_experts(x, w, ids, 0), sync_ranks=False)
        row["local_graph_us"] = (
            1e6 * _time(g.replay, max(1, iters // GRAPH_CALLS), sync_ranks=False) / GRAPH_CALLS
        )
    return row


def _profile(backends: dict, experts, local, tokens: int, world: int, rank: int, dev) -> dict:
    """Kernels of one MoE layer per graph-capturable backend (and local), replayed from graphs."""
    x, w, ids = _inputs(tokens, dev, seed=rank)
    out: dict = {"tokens_per_rank": tokens}
    for name, comm in backends.items():
        if name == "all_to_all":
            continue
        g = _graph(lambda comm=comm: comm.forward(x, w, ids, experts, [tokens] * world))
        dist.barrier()
        out[name] = kernel_profile(g.replay, reps=3, per_call=GRAPH_CALLS)
    if local is not None:
        g = _graph(lambda: local.run_experts(x, w, ids, 0), sync_ranks=False)
        out["local"] = kernel_profile(g.replay, reps=3, per_call=GRAPH_CALLS)
    if rank == 0:
        for name, rows in out.items():
            if name != "tokens_per_rank":
                print_kernel_profile(f"{name}, {tokens} tokens per rank, one layer:", rows)
    return out


def plot(result: dict, path) -> None:
    plt = pyplot()

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    tokens = [r["tokens_per_rank"] for r in rows]
    keys = [k for k in rows[0] if k.endswith("_us")]
    for key in keys:
        ax.plot(
            tokens, [r[key] for r in rows], "s-" if "graph" in key else "o--", label=key.removesuffix("_us")
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("us per MoE layer (dispatch + experts + combine)")
    ax.set_title(
        f"{result['device']} x{result['world']}, hidden {HIDDEN}, {EXPERTS} experts top-{TOP_K}", fontsize=9
    )
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--tag", default=None)
    p.add_argument("--profile", type=int, nargs="*", default=[], metavar="TOKENS")
    args = p.parse_args(argv)
    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs (found {torch.cuda.device_count()})")
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    run_ranks(_bench, args.world, args.iters, args.profile, queue)
    run = queue.get()
    tag = args.tag or gpu_tag() + f"x{args.world}"
    result = {
        "benchmark": "moe_comm_latency",
        **environment("cuda"),
        "command": "python -m benchmark.moe_comm_latency " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": {
            "hidden": HIDDEN,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "intermediate": INTER,
            "dtype": "bf16",
        },
        **run,
    }
    write_json(RESULTS / f"moe_comm_latency_{tag}.json", result)
    plot(result, RESULTS / f"moe_comm_latency_{tag}.png")
    return result


if __name__ == "__main__":
    main()
