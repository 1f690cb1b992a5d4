"""Run a function on N ranks of one host (torch.multiprocessing + a TCP rendezvous; torchrun's
default rendezvous hangs on the GPU machines). Tests and benchmarks of the comm backends use it."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from nanocp_router.ipc import free_tcp_port


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` spawned processes with a gloo world group; raises if any
    rank fails. fn must be importable (a module-level function)."""
    mp.spawn(_entry, args=(fn, world, free_tcp_port(), args), nprocs=world, join=True)
