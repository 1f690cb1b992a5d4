"""Routing comm backend: peers write straight into each other's receive buffers (CUDA IPC).

Every rank allocates fixed-capacity receive buffers, one slot per source rank and two parities
(double buffering), plus one flag per source. The buffers' CUDA IPC handles are exchanged once
over the CPU group (torch's own tensor-sharing reduction), so each rank maps every peer's
buffers into its address space. This works between processes on ONE GPU (several instances
sharing a device, which NCCL refuses) and across GPUs over NVLink (peer access).

One exchange (`all_to_all`), call number e (parity p = e % 2):
  1. for each peer j: copy this rank's rows for j into j's slot [p, me] (device-to-device);
  2. one kernel stores e into flags[me] of every peer (release: after the copies, in stream order);
  3. one kernel waits until every flags[src] of this rank reads e (acquire spin);
  4. rows from src are in slot [p, src] of the own buffer.
Reuse is safe: a rank writes parity p again only at call e + 2, after every peer has signalled
e + 1, i.e. after each peer finished reading call e (its reads precede its next signal in stream
order). Counts are host lists here (eager, as the NCCL path); graph capture of the routing steps
with device-side counts comes with DCP graph decode.

Ranks sharing one GPU: the device spin of step 3 would hold the GPU for a whole time slice
(processes on one GPU are time-sliced, ~2 ms per call measured), so such ranks synchronize on
the host instead (own copies done, then a CPU-group barrier): correct, not graph-capturable,
meant for testing several instances on one device.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.multiprocessing.reductions import reduce_tensor

from nanocp.distributed.parallel_state import A2AComm


@triton.jit
def _signal_kernel(peer_flag_addrs_ptr, me, epoch_ptr, WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr)
    for j in tl.static_range(WORLD):
        addr = tl.load(peer_flag_addrs_ptr + j)
        flag = addr.to(tl.pointer_type(tl.int64)) + me
        tl.atomic_xchg(flag, epoch, sem="release", scope="sys")


@triton.jit
def _wait_kernel(flags_ptr, epoch_ptr, WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr)
    for src in tl.static_range(WORLD):
        seen = tl.atomic_add(flags_ptr + src, 0, sem="acquire", scope="sys")
        while seen < epoch:
            seen = tl.atomic_add(flags_ptr + src, 0, sem="acquire", scope="sys")


class IpcAllToAll(A2AComm):
    def __init__(self, rank: int, world: int, cpu_group, device: torch.device, capacity_bytes: int) -> None:
        super().__init__(None, cpu_group)
        self.rank, self.world, self.device = rank, world, device
        self.capacity = capacity_bytes
        self.recv = torch.zeros((2, world, capacity_bytes), dtype=torch.uint8, device=device)
        self.flags = torch.zeros(world, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)
        self.calls = 0
        torch.cuda.synchronize(device)
        handles: list = [None] * world
        dist.all_gather_object(
            handles, (reduce_tensor(self.recv), reduce_tensor(self.flags)), group=cpu_group
        )
        self.peer_recv, self.peer_flags = [], []
        for src, ((fn_r, args_r), (fn_f, args_f)) in enumerate(handles):
            if src == rank:
                self.peer_recv.append(self.recv)
                self.peer_flags.append(self.flags)
            else:
                self.peer_recv.append(fn_r(*_on_device(args_r, device)))
                self.peer_flags.append(fn_f(*_on_device(args_f, device)))
        self.flag_addrs = torch.tensor(
            [f.data_ptr() for f in self.peer_flags], dtype=torch.int64, device=device
        )
        uuids: list = [None] * world
        dist.all_gather_object(uuids, str(torch.cuda.get_device_properties(device).uuid), group=cpu_group)
        self.shared_gpu = uuids.count(uuids[rank]) > 1
        self.cpu_group = cpu_group
        dist.barrier(group=cpu_group)  # every rank has mapped every buffer before any write

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows x[off_j : off_j + send_counts[j]] go to rank j; returns the received rows in
        source order (like all_to_all_single with split sizes)."""
        row_shape, dtype = x.shape[1:], x.dtype
        row_bytes = math.prod(row_shape) * x.element_size()
        if max(max(send_counts), max(recv_counts)) * row_bytes > self.capacity:
            raise RuntimeError(
                f"routing buffer too small: {max(send_counts + recv_counts) * row_bytes} bytes to one peer, "
                f"capacity {self.capacity} (raise NANOCP_ROUTING_BUFFER_MB)"
            )
        self.calls += 1
        parity = self.calls % 2
        self.epoch.fill_(self.calls)
        flat = x.contiguous().view(torch.uint8).view(-1) if x.numel() else x.new_empty(0, dtype=torch.uint8)
        off = 0
        for j, n in enumerate(send_counts):
            if n:
                self.peer_recv[j][parity, self.rank, : n * row_bytes].copy_(flat[off : off + n * row_bytes])
            off += n * row_bytes
        if self.shared_gpu:
            torch.cuda.current_stream(self.device).synchronize()
            dist.barrier(group=self.cpu_group)
        else:
            _signal_kernel[(1,)](self.flag_addrs, self.rank, self.epoch, WORLD=self.world)
            _wait_kernel[(1,)](self.flags, self.epoch, WORLD=self.world)
        parts = [self.recv[parity, src, : n * row_bytes] for src, n in enumerate(recv_counts)]
        out = torch.cat(parts) if parts else flat[:0]
        return out.view(dtype).view(sum(recv_counts), *row_shape)


def _on_device(args: tuple, device: torch.device) -> tuple:
    """torch's CUDA-tensor rebuild args name the sharing process's device index; map onto ours."""
    args = list(args)
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(args)
