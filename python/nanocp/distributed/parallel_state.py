"""Process groups of the DP-attention + EP runtime.

Instance i is rank i of the world group (NCCL on GPU, gloo on CPU). A gloo group over the same
ranks carries the small per-step control all-gather, so it never waits behind GPU work.
Variable-size data exchanges (MoE tokens, context-parallel q / KV / (o, lse)) go through
`ParallelState.a2a`: all_to_all_single on the world group, or, when instances share GPUs (more
instances than devices: NCCL refuses two ranks on one GPU), the CUDA-IPC routing backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nanocp import envs
from nanocp.distributed.a2a import A2AComm


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    group: dist.ProcessGroup | None = None  # data collectives (None when instances share GPUs)
    cpu_group: dist.ProcessGroup | None = None  # control collectives
    device: torch.device | None = None
    a2a: A2AComm | None = None  # variable-size data exchange between the ranks
    shared_gpu: bool = False  # more instances than GPUs: some share a device (CUDA-IPC routing)

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (same length on all ranks), in rank order."""
        if self.world_size == 1:
            return [values]
        local = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.cpu_group)
        return [t.tolist() for t in out]


def instance_device(instance: int, device_type: str) -> torch.device:
    """Instance i runs on GPU i, or round-robin when there are more instances than GPUs."""
    if device_type != "cuda":
        return torch.device("cpu")
    return torch.device(f"cuda:{instance % max(1, torch.cuda.device_count())}")


def init_parallel_state(
    rank: int,
    world_size: int,
    ep_size: int,
    device: torch.device,
    init_method: str,
    force_group: bool = False,
    store: bool = False,
) -> ParallelState:
    """init_method: tcp://HOST:PORT, hosted by rank 0, or with store=True a TCPStore that another
    process hosts there (node 0's launcher, for several nodes). force_group: create the
    (one-rank) group even for a single instance (DeepEP needs one)."""
    if world_size == 1 and not force_group:
        return ParallelState(device=device)
    shared_gpu = device.type == "cuda" and world_size > torch.cuda.device_count()
    backend = "nccl" if device.type == "cuda" and not shared_gpu else "gloo"
    rendezvous: dict = {"init_method": init_method}
    if store:
        host, _, port = init_method.removeprefix("tcp://").rpartition(":")
        timeout = timedelta(seconds=envs.startup_timeout_s())
        rendezvous = {"store": dist.TCPStore(host.strip("[]"), int(port), None, False, timeout=timeout)}
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        device_id=device if backend == "nccl" else None,
        **rendezvous,
    )
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    if shared_gpu:
        from nanocp.distributed.ipc_comm import IpcAllToAll

        group, a2a = None, IpcAllToAll(rank, world_size, cpu_group, device, envs.routing_buffer_bytes())
    else:
        group = dist.group.WORLD
        a2a = A2AComm(group, cpu_group)
    return ParallelState(
        rank=rank,
        world_size=world_size,
        ep_rank=rank if ep_size > 1 else 0,
        ep_size=ep_size,
        group=group,
        cpu_group=cpu_group,
        device=device,
        a2a=a2a,
        shared_gpu=shared_gpu,
    )


def destroy_parallel_state() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
