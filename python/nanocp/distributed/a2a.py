"""Variable-size row exchange between the instances (MoE tokens, DCP q / KV / (o, lse)): the
interface every routing backend implements (CUDA-IPC: distributed/ipc_comm.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class A2AComm:
    """all_to_all of rows with per-peer counts (the counts themselves go over the CPU group)."""

    def __init__(self, group: dist.ProcessGroup | None, cpu_group: dist.ProcessGroup | None) -> None:
        self.group, self.cpu_group = group, cpu_group

    def exchange_counts(self, counts: list[int]) -> list[int]:
        send = torch.tensor(counts, dtype=torch.int64)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.cpu_group)
        return recv.tolist()

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        return out
