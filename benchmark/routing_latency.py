"""Routing backend latency: CUDA-IPC all-to-all (peers write into each other's buffers) per call,
4 KB - 4 MB per peer, ranks sharing one GPU (or one GPU each when there are enough). NCCL
all_to_all_single is measured beside it when every rank has its own GPU (NCCL refuses two ranks
on one device).

    python -m benchmark.routing_latency --world 2 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from benchmark.common import RESULTS, environment, write_json
from nanocp.testing.multiproc import run_ranks

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]


def _bench(rank: int, world: int, iters: int, queue) -> None:
    from nanocp.distributed.ipc_comm import IpcAllToAll

    own_gpu = torch.cuda.device_count() >= world
    dev = torch.device(f"cuda:{rank if own_gpu else 0}")
    torch.cuda.set_device(dev)
    comm = IpcAllToAll(rank, world, dist.group.WORLD, dev, capacity_bytes=max(SIZES))
    nccl = dist.new_group(backend="nccl") if own_gpu else None
    rows = []
    for size in SIZES:
        x = torch.ones(world * size // 2, dtype=torch.bfloat16, device=dev).view(world * size // 256, 128)
        counts = [size // 256] * world
        for _ in range(5):
            comm.all_to_all(x, counts, counts)
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            comm.all_to_all(x, counts, counts)
        torch.cuda.synchronize()
        row = {
            "bytes_per_peer": size,
            "ipc_us": 1e6 * (time.perf_counter() - t0) / iters,
            "sync": "host barrier" if comm.shared_gpu else "device flags",
        }
        if nccl is not None:
            out = torch.empty_like(x)
            for _ in range(5):
                dist.all_to_all_single(out, x, group=nccl)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_to_all_single(out, x, group=nccl)
            torch.cuda.synchronize()
            row["nccl_us"] = 1e6 * (time.perf_counter() - t0) / iters
        rows.append(row)
    dist.barrier()
    if rank == 0:
        queue.put({"world": world, "ranks_per_gpu": 1 if own_gpu else world, "rows": rows})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    runs = []
    for world in args.world:
        run_ranks(_bench, world, args.iters, queue)
        runs.append(queue.get())
        print(json.dumps(runs[-1]), flush=True)
    tag = args.tag or torch.cuda.get_device_name().split()[1].lower()
    result = {"benchmark": "routing_latency", **environment("cuda"), "mode": "eager, per call", "runs": runs}
    write_json(RESULTS / f"routing_latency_{tag}.json", result)
    return result


if __name__ == "__main__":
    main()
