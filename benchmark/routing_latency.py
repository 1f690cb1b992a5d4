"""Routing backend vs NCCL: latency of one all-to-all, 4 KB - 4 MB per peer, eager and replayed
from CUDA graphs.

- ipc eager: `IpcAllToAll.all_to_all` (host counts; device flags across GPUs, a host barrier when
  ranks share one GPU);
- ipc graph: `IpcAllToAll.exchange` (fixed blocks, device counts and epoch) captured GRAPH_CALLS
  times in one graph, time per exchange;
- nccl eager / nccl graph: `all_to_all_single` with equal splits (only with one GPU per rank:
  NCCL refuses two ranks on one device).

    python -m benchmark.routing_latency --world 2              # one GPU per rank if there are enough
    python -m benchmark.routing_latency --world 2 4 --shared   # all ranks on GPU 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist

from benchmark.common import RESULTS, environment, gpu_tag, log_axes, pyplot, save_figure, write_json
from nanocp.testing.multiproc import run_ranks

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
GRAPH_CALLS = 20


def _time(fn, iters: int, sync_ranks: bool = True) -> float:
    """Mean seconds per call, all ranks started together (sync_ranks)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if sync_ranks:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def _graph(fn, sync_ranks: bool = True) -> torch.cuda.CUDAGraph:
    """GRAPH_CALLS calls of fn captured in one graph."""
    fn()  # compile / warm up (a real call: every rank makes it)
    torch.cuda.synchronize()
    if sync_ranks:
        dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_CALLS):
            fn()
    torch.cuda.synchronize()
    return g


def _measure(comm, nccl, world: int, size: int, dev: torch.device, iters: int) -> dict:
    n = size // 256  # rows of 128 bf16 per peer
    x = torch.ones(world, n, 128, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(x)
    counts = torch.full((world,), n, dtype=torch.int64, device=dev)
    out_counts = torch.empty_like(counts)
    flat, flat_out = x.view(world * n, 128), out.view(world * n, 128)
    row = {"bytes_per_peer": size, "ipc_sync": "host barrier" if comm.shared_gpu else "device flags"}
    row["ipc_eager_us"] = 1e6 * _time(lambda: comm.all_to_all(flat, [n] * world, [n] * world), iters)
    g = _graph(lambda: comm.exchange(x, counts, out, out_counts))
    row["ipc_graph_us"] = 1e6 * _time(g.replay, max(1, iters // GRAPH_CALLS)) / GRAPH_CALLS
    assert int(out_counts.sum()) == world * n
    if nccl is not None:

        def a2a() -> None:
            dist.all_to_all_single(flat_out, flat, group=nccl)

        row["nccl_eager_us"] = 1e6 * _time(a2a, iters)
        g = _graph(a2a)
        row["nccl_graph_us"] = 1e6 * _time(g.replay, max(1, iters // GRAPH_CALLS)) / GRAPH_CALLS
    return row


def _bench(rank: int, world: int, iters: int, shared: bool, queue) -> None:
    from nanocp.distributed.ipc_comm import IpcAllToAll

    own_gpu = not shared and torch.cuda.device_count() >= world
    dev = torch.device(f"cuda:{rank if own_gpu else 0}")
    torch.cuda.set_device(dev)
    comm = IpcAllToAll(
        rank, world, dist.group.WORLD, dev, capacity_bytes=max(SIZES), graph_capacity_bytes=max(SIZES)
    )
    nccl = dist.new_group(backend="nccl") if own_gpu else None
    rows = [_measure(comm, nccl, world, size, dev, iters) for size in SIZES]
    dist.barrier()
    if rank == 0:
        queue.put({"world": world, "ranks_per_gpu": 1 if own_gpu else world, "rows": rows})


def plot(result: dict, path) -> None:
    plt = pyplot()

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        kb = [r["bytes_per_peer"] / 1024 for r in run["rows"]]
        for key, style in (
            ("ipc_eager_us", "o-"),
            ("ipc_graph_us", "s-"),
            ("nccl_eager_us", "o--"),
            ("nccl_graph_us", "s--"),
        ):
            if key in run["rows"][0]:
                ax.plot(
                    kb, [r[key] for r in run["rows"]], style, label=key.removesuffix("_us").replace("_", " ")
                )
        log_axes(
            ax, "KB per peer", "us per all-to-all", f"{run['world']} ranks, {run['ranks_per_gpu']} per GPU"
        )
    fig.suptitle(f"routing backend vs NCCL, {result['device']} x{result['gpus']}", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[2])
    p.add_argument("--shared", action="store_true", help="all ranks on GPU 0")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    runs = []
    for world in args.world:
        run_ranks(_bench, world, args.iters, args.shared, queue)
        runs.append(queue.get())
        print(json.dumps(runs[-1]), flush=True)
    gpus = torch.cuda.device_count()
    tag = args.tag or gpu_tag() + (f"x{gpus}" if gpus > 1 else "")
    result = {
        "benchmark": "routing_latency",
        **environment("cuda"),
        "gpus": gpus,
        "command": "python -m benchmark.routing_latency " + " ".join(sys.argv[1:] if argv is None else argv),
        "graph_calls_per_replay": GRAPH_CALLS,
        "runs": runs,
    }
    write_json(RESULTS / f"routing_latency_{tag}.json", result)
    plot(result, RESULTS / f"routing_latency_{tag}.png")
    return result


if __name__ == "__main__":
    main()
