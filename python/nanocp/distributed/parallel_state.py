"""Process groups of the DP-attention + EP runtime.

Instance i is rank i of the world group (NCCL on GPU, gloo on CPU). A gloo group over the same
ranks carries the small per-step control all-gather, so it never waits behind GPU work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    group: dist.ProcessGroup | None = None  # data collectives (MoE exchange)
    cpu_group: dist.ProcessGroup | None = None  # control collectives

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (same length on all ranks), in rank order."""
        if self.world_size == 1:
            return [values]
        local = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.cpu_group)
        return [t.tolist() for t in out]


def init_parallel_state(
    rank: int, world_size: int, ep_size: int, device: torch.device, init_port: int, force_group: bool = False
) -> ParallelState:
    """force_group: create the (one-rank) group even for a single instance (DeepEP needs one)."""
    if world_size == 1 and not force_group:
        return ParallelState()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://127.0.0.1:{init_port}",
        rank=rank,
        world_size=world_size,
        device_id=device if device.type == "cuda" else None,
    )
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return ParallelState(
        rank=rank,
        world_size=world_size,
        ep_rank=rank if ep_size > 1 else 0,
        ep_size=ep_size,
        group=dist.group.WORLD,
        cpu_group=cpu_group,
    )


def destroy_parallel_state() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
