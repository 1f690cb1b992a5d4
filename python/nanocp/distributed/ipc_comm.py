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
order). Counts are host lists here (eager, as the NCCL path).

`exchange` is the graph-capturable form: rows sit in fixed-capacity per-peer blocks, the counts
are device data and the epoch lives on the device (bumped by the signal kernel), so one captured
graph replays any plan. Three launches: push (each peer's block, counts written beside the data
in the peer's meta array), signal (epoch += 1, then release-store it into every peer's flag),
pull (per source: acquire-spin on its flag, then copy its block out of the receive parity into a
fixed output, so the caller never holds a view of a buffer that peers will overwrite).

Ranks sharing one GPU: processes on one GPU are time-sliced, so the device spin of step 3 (and
of `exchange`'s pull) holds the GPU for a whole slice (~2.2 ms per call measured on H200). Eager
calls of such ranks therefore synchronize on the host (own copies done, then a CPU-group
barrier, ~0.5 ms). Under MPS the processes run concurrently and the device flags work as across
GPUs (H200, 2 ranks: 6-23 us per captured exchange); `envs.shared_gpu_sync` picks the mode.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.multiprocessing.reductions import reduce_tensor

from nanocp import envs
from nanocp.distributed.a2a import A2AComm


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


@triton.jit
def _push_kernel(
    x_ptr, counts_ptr, peer_recv_ptr, peer_meta_ptr, epoch_ptr, me, row_words, cap_rows, buf_words,
    WORLD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    j, b, nb = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    parity = (tl.load(epoch_ptr) + 1) % 2  # the epoch the signal kernel is about to publish
    n = tl.load(counts_ptr + j)
    n_words = n * row_words
    slot_words = cap_rows.to(tl.int64) * row_words
    dst = tl.load(peer_recv_ptr + j).to(tl.pointer_type(tl.int32)) + (parity * WORLD + me) * buf_words
    src = x_ptr + j * slot_words
    for start in range(b * BLOCK, n_words, nb * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_words
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
    if b == 0:
        meta = tl.load(peer_meta_ptr + j).to(tl.pointer_type(tl.int64))
        tl.store(meta + WORLD + parity * WORLD + me, n)


@triton.jit
def _bump_and_signal_kernel(peer_meta_ptr, me, epoch_ptr, WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1
    tl.store(epoch_ptr, epoch)
    for j in tl.static_range(WORLD):
        flag = tl.load(peer_meta_ptr + j).to(tl.pointer_type(tl.int64)) + me
        tl.atomic_xchg(flag, epoch, sem="release", scope="sys")


@triton.jit
def _pull_kernel(
    meta_ptr, recv_ptr, out_ptr, out_counts_ptr, epoch_ptr, row_words, cap_rows, buf_words,
    WORLD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    src, b, nb = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    epoch = tl.load(epoch_ptr)
    seen = tl.atomic_add(meta_ptr + src, 0, sem="acquire", scope="sys")
    while seen < epoch:
        seen = tl.atomic_add(meta_ptr + src, 0, sem="acquire", scope="sys")
    parity = epoch % 2
    n = tl.load(meta_ptr + WORLD + parity * WORLD + src, volatile=True)
    if b == 0:
        tl.store(out_counts_ptr + src, n)
    slot_words = cap_rows.to(tl.int64) * row_words
    inp = recv_ptr + (parity * WORLD + src) * buf_words
    out = out_ptr + src * slot_words
    n_words = n * row_words
    for start in range(b * BLOCK, n_words, nb * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_words
        tl.store(out + offs, tl.load(inp + offs, mask=mask, cache_modifier=".cg"), mask=mask)


class IpcAllToAll(A2AComm):
    def __init__(
        self,
        rank: int,
        world: int,
        cpu_group,
        device: torch.device,
        capacity_bytes: int,
        graph_capacity_bytes: int = 0,
    ) -> None:
        """capacity_bytes: per source and parity for `all_to_all`; graph_capacity_bytes: the same
        for `exchange` (its own buffers: the two protocols' parities are independent)."""
        super().__init__(None, cpu_group)
        self.rank, self.world, self.device = rank, world, device
        self.capacity = capacity_bytes
        self.recv = torch.zeros((2, world, capacity_bytes), dtype=torch.uint8, device=device)
        self.flags = torch.zeros(world, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)
        # graph-capturable exchange: [flags per source | counts per (parity, source)]
        self.meta = torch.zeros(3 * world, dtype=torch.int64, device=device)
        self.graph_capacity = graph_capacity_bytes // 4 * 4
        self.xrecv = torch.zeros((2, world, max(16, self.graph_capacity)), dtype=torch.uint8, device=device)
        self.dev_epoch = torch.zeros(1, dtype=torch.int64, device=device)
        self.calls = 0
        torch.cuda.synchronize(device)
        handles: list = [None] * world
        own = (self.recv, self.flags, self.meta, self.xrecv)
        dist.all_gather_object(handles, tuple(reduce_tensor(t) for t in own), group=cpu_group)
        self.peer_recv, self.peer_flags, self.peer_meta, self.peer_xrecv = [], [], [], []
        for src, peer in enumerate(handles):
            mapped = own if src == rank else [fn(*_on_device(args, device)) for fn, args in peer]
            for lst, t in zip((self.peer_recv, self.peer_flags, self.peer_meta, self.peer_xrecv), mapped):
                lst.append(t)

        def addrs(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)

        self.flag_addrs, self.xrecv_addrs, self.meta_addrs = (
            addrs(self.peer_flags),
            addrs(self.peer_xrecv),
            addrs(self.peer_meta),
        )
        uuids: list = [None] * world
        dist.all_gather_object(uuids, str(torch.cuda.get_device_properties(device).uuid), group=cpu_group)
        self.shared_gpu = uuids.count(uuids[rank]) > 1
        self.host_sync = self.shared_gpu and envs.shared_gpu_sync() == "host"
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
        if self.host_sync:
            torch.cuda.current_stream(self.device).synchronize()
            dist.barrier(group=self.cpu_group)
        else:
            _signal_kernel[(1,)](self.flag_addrs, self.rank, self.epoch, WORLD=self.world)
            _wait_kernel[(1,)](self.flags, self.epoch, WORLD=self.world)
        parts = [self.recv[parity, src, : n * row_bytes] for src, n in enumerate(recv_counts)]
        out = torch.cat(parts) if parts else flat[:0]
        return out.view(dtype).view(sum(recv_counts), *row_shape)

    def exchange(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        out: torch.Tensor,
        out_counts: torch.Tensor,
        blocks: int | None = None,
    ) -> None:
        """Graph-capturable all-to-all of fixed-capacity blocks: rows x[j, :counts[j]] go to rank
        j; on return out[src, :out_counts[src]] holds the rows rank src sent here. x and out are
        [world, cap_rows, *row] (same row shape and dtype), counts / out_counts int64 [world] on
        the device. Every rank must call it the same number of times (eager or replayed)."""
        world, cap_rows = x.shape[0], x.shape[1]
        row_bytes = math.prod(x.shape[2:]) * x.element_size()
        if x.shape[0] != self.world or out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(f"exchange: x and out must be [world={self.world}, cap, ...] alike")
        if row_bytes % 4 or not (x.is_contiguous() and out.is_contiguous()):
            raise ValueError("exchange: contiguous rows of a multiple of 4 bytes are required")
        if cap_rows * row_bytes > self.graph_capacity:
            raise RuntimeError(
                f"exchange: {cap_rows * row_bytes} bytes per peer exceed graph_capacity_bytes {self.graph_capacity}"
            )
        words, row_words = x.view(torch.int32), row_bytes // 4
        if blocks is None:  # ~32 KB of block capacity per program: 4 MB blocks get 128 per peer
            blocks = max(4, min(128, cap_rows * row_bytes >> 15))
        grid = (world, blocks)
        _push_kernel[grid](
            words, counts, self.xrecv_addrs, self.meta_addrs, self.dev_epoch, self.rank, row_words,
            cap_rows, self.graph_capacity // 4, WORLD=world, BLOCK=1024,
        )  # fmt: skip
        _bump_and_signal_kernel[(1,)](self.meta_addrs, self.rank, self.dev_epoch, WORLD=world)
        _pull_kernel[grid](
            self.meta, self.xrecv.view(torch.int32), out.view(torch.int32), out_counts, self.dev_epoch,
            row_words, cap_rows, self.graph_capacity // 4, WORLD=world, BLOCK=1024,
        )  # fmt: skip


def _on_device(args: tuple, device: torch.device) -> tuple:
    """torch's CUDA-tensor rebuild args name the sharing process's device index; map onto ours."""
    args = list(args)
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(args)
