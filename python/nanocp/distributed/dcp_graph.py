"""Context-parallel decode inside CUDA graphs: the routing of dcp.py through fixed-capacity
buffers with device-side counts (IpcAllToAll.exchange), so any plan replays without re-capture.

In a decode step every row goes to a peer at most once (its K/V to the holder of its position,
its query to each holder of earlier keys), so per-peer blocks of max_bs rows always suffice.
The host builds the step's DCPPlan exactly as in eager mode (`build_dcp_plan`, one small exchange
of positions on the control group) and `begin` scatters it into the static buffers. Per layer,
inside the graph:
  1. K/V rows to their holders, written at the holder's slots (unused block rows: the pad slot);
  2. queries to holders; every received query slot attends the request's keys held here
     (causal by position; an empty slot has no keys: o = 0, lse = -inf), through a
     BalancedDecode whose work `begin` plans from the step's shard lengths (most slots are empty);
  3. (o, lse) go back to the same block positions; the home merges its local state with one
     state per peer by log-sum-exp, a peer that got no query of a row contributing -inf.
"""

from __future__ import annotations

import torch

from nanocp.distributed.dcp import DCPExecutor, DCPPlan
from nanocp_kernels.balanced_attention import BalancedDecode
from nanocp_kernels.merge import merge_states
from nanocp_kernels.reference import paged_attention_ref


def _words(t: torch.Tensor) -> torch.Tensor:
    """Rows of t as int32 words (the exchange moves bytes)."""
    return t.reshape(t.shape[0], -1).view(torch.int32)


class GraphDCP(DCPExecutor):
    def __init__(
        self,
        rank: int,
        world: int,
        cpu_group,
        device: torch.device,
        max_bs: int,
        num_slots: int,
        pad_slot: int,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        comm=None,
    ) -> None:
        """comm: anything with IpcAllToAll.exchange's contract (default: a new IpcAllToAll)."""
        self.world, self.cap, self.pad_slot = world, max_bs, pad_slot
        self.heads = (num_qo_heads, num_kv_heads, head_dim)
        self.dtype = dtype
        q_words = num_qo_heads * head_dim * dtype.itemsize // 4
        kv_words = 2 * num_kv_heads * head_dim * dtype.itemsize // 4
        o_words = q_words + num_qo_heads  # o (dtype) | lse (float32)
        self.q_words = q_words
        if comm is None:
            from nanocp.distributed.ipc_comm import IpcAllToAll

            capacity = max_bs * 4 * max(q_words, kv_words, o_words)
            comm = IpcAllToAll(rank, world, cpu_group, device, 16, graph_capacity_bytes=capacity)
        self.comm = comm
        W, C = world, max_bs
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        # the step's plan (written by begin before every replay)
        self.kv_rows = torch.zeros(W, C, **i64)  # own rows whose K/V go to peer p
        self.kv_counts = torch.zeros(W, **i64)
        self.kv_slots = torch.full((W, C), pad_slot, **i64)  # where K/V received from src go here
        self.q_rows = torch.zeros(W, C, **i64)  # own rows whose queries go to peer p
        self.q_counts = torch.zeros(W, **i64)
        self.f_q_pos = torch.zeros(W * C, **i32)
        self.f_kv_indptr = [0] * (W * C + 1)  # host: the torch reference's sequences
        self.f_kv_indices = torch.zeros(num_slots, **i32)
        self.f_kv_pos = torch.zeros(num_slots, **i32)
        # exchange blocks and the counts they report
        self.kv_send = torch.zeros(W, C, kv_words, **i32)
        self.kv_recv = torch.zeros_like(self.kv_send)
        self.q_send = torch.zeros(W, C, q_words, **i32)
        self.q_recv = torch.zeros_like(self.q_send)
        self.o_send = torch.zeros(W, C, o_words, **i32)
        self.o_back = torch.zeros_like(self.o_send)
        self.kv_recv_counts = torch.zeros(W, **i64)
        self.q_recv_counts = torch.zeros(W, **i64)
        self.back_counts = torch.zeros(W, **i64)
        self.slot = torch.arange(C, **i64)
        self.peer_base = torch.arange(1, W + 1, **i64)
        # merge input: state 0 local (rows < bs), state p + 1 peer p's answers at the rows that
        # asked it, every other row -inf (reset by begin: a row that asked p last step may not
        # now); row C of each state takes the unused block rows. Built once per step, not per layer.
        self.dest = torch.zeros(W * C, **i64)  # state row of each returned block row
        self.states_o = torch.zeros((W + 1) * (C + 1), num_qo_heads, head_dim, dtype=dtype, device=device)
        self.states_lse = torch.full(((W + 1) * (C + 1), num_qo_heads), float("-inf"), device=device)
        # the foreign attention: W * C query slots, mostly empty, shards of any length; its work
        # is planned per step from the shards' lengths (every shard is cut into equal blocks)
        self.foreign = BalancedDecode(W * C, num_qo_heads, num_kv_heads, head_dim, device)

    # ------------------------------------------------------------------ host side, per step
    def _flat_host(self, counts: list[int]) -> list[int]:
        """Block positions p * cap + j (j < counts[p]) of rows grouped by peer, in order."""
        if max(counts, default=0) > self.cap:
            raise RuntimeError(f"context-parallel graph step: {max(counts)} rows for one peer > {self.cap}")
        return [p * self.cap + j for p, n in enumerate(counts) for j in range(n)]

    def _flat(self, counts: list[int]) -> torch.Tensor:
        return self._on_device(self._flat_host(counts))

    def _on_device(self, flat: list[int]) -> torch.Tensor:
        return torch.tensor(flat, dtype=torch.int64).to(self.kv_rows.device, non_blocking=True)

    def begin(self, st: DCPPlan) -> None:
        """Scatter a decode step's plan (build_dcp_plan) into the static buffers."""
        dev = self.kv_rows.device
        counts = torch.tensor([st.kv_send_counts, st.q_send_counts], dtype=torch.int64)
        counts = counts.to(dev, non_blocking=True)
        self.kv_counts.copy_(counts[0])
        self.q_counts.copy_(counts[1])
        # unused block rows gather row 0 (they must stay inside this step's batch) and are not sent
        self.kv_rows.zero_().view(-1)[self._flat(st.kv_send_counts)] = st.kv_send_idx
        self.q_rows.zero_().view(-1)[self._flat(st.q_send_counts)] = st.q_send_idx
        self.kv_slots.fill_(self.pad_slot)
        self.kv_slots.view(-1)[self._flat(st.kv_recv_counts)] = st.kv_recv_slots
        # decode: one received query per foreign sequence, sequences in the order queries arrive
        num_q = sum(st.q_recv_counts)
        if st.f_qo_indptr != list(range(num_q + 1)):
            raise RuntimeError("context-parallel graph step: only decode steps (one query per sequence)")
        q_slots = self._flat_host(st.q_recv_counts)  # slot of received query i (host list: no sync)
        # slots ascend in arrival order, so slot s's keys follow those of the slots before it
        lens = torch.zeros(self.world * self.cap, dtype=torch.int64)
        f = torch.as_tensor(st.f_kv_indptr, dtype=torch.int64)
        lens[q_slots] = f[1:] - f[:-1]
        self.f_kv_indptr = [0, *lens.cumsum(0).tolist()]
        self.foreign.plan(self.f_kv_indptr)
        total = st.f_kv_indptr[-1]
        self.f_kv_indices[:total].copy_(st.f_kv_indices)
        self.f_kv_pos[:total].copy_(st.f_kv_pos)
        self.f_q_pos.view(-1)[self._on_device(q_slots)] = st.f_q_pos.to(torch.int32)
        rows = torch.where(self.slot[None, :] < self.q_counts[:, None], self.q_rows, self.cap)
        self.dest.copy_((rows + self.peer_base[:, None] * (self.cap + 1)).view(-1))
        self.states_lse.fill_(float("-inf"))  # stale o stays: finite, and weighted 0 by the merge

    # ------------------------------------------------------------------ device side, per layer
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        o_local: torch.Tensor,
        lse_local: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        W, C = self.world, self.cap
        hq, hkv, d = self.heads
        bs = q.shape[0]
        # 1. K/V of own tokens to the holders of their positions
        kv = torch.cat([k.reshape(bs, -1), v.reshape(bs, -1)], 1).to(k_buffer.dtype)
        torch.index_select(_words(kv), 0, self.kv_rows.view(-1), out=self.kv_send.view(W * C, -1))
        self.comm.exchange(self.kv_send, self.kv_counts, self.kv_recv, self.kv_recv_counts)
        got = self.kv_recv.view(W * C, -1).view(k_buffer.dtype).view(W * C, 2, hkv, d)
        k_buffer[self.kv_slots.view(-1)] = got[:, 0]
        v_buffer[self.kv_slots.view(-1)] = got[:, 1]
        # 2. queries to holders, attention over the foreign keys held here
        torch.index_select(_words(q.to(self.dtype)), 0, self.q_rows.view(-1), out=self.q_send.view(W * C, -1))
        self.comm.exchange(self.q_send, self.q_counts, self.q_recv, self.q_recv_counts)
        q_recv = self.q_recv.view(W * C, -1).view(self.dtype).view(W * C, hq, d)
        o_f, lse_f = self._foreign_attention(q_recv, k_buffer, v_buffer, scaling)
        # 3. partial states back to the home, merged with the local one
        send = self.o_send.view(W * C, -1)
        send[:, : self.q_words].copy_(_words(o_f))
        send[:, self.q_words :].copy_(lse_f.view(torch.int32))
        self.comm.exchange(self.o_send, self.q_recv_counts, self.o_back, self.back_counts)
        back = self.o_back.view(W * C, -1)  # strided views: index_put reads them in place
        o_b = back[:, : self.q_words].view(self.dtype).view(W * C, hq, d)
        lse_b = back[:, self.q_words :].view(torch.float32)
        self.states_o[:bs] = o_local
        self.states_lse[:bs] = lse_local
        self.states_o[self.dest] = o_b
        self.states_lse[self.dest] = lse_b
        o, _ = merge_states(
            self.states_o.view(W + 1, C + 1, hq, d),
            self.states_lse.view(W + 1, C + 1, hq),
            backend=None if q.is_cuda else "torch",
        )
        return o[:bs]

    def _foreign_attention(self, q_recv, k_buffer, v_buffer, scaling: float):
        """Every received query slot over its keys here: BalancedDecode's kernels on the GPU, the
        torch reference off it (CPU tests run ranks as threads; Triton's interpreter is not
        thread-safe, so BalancedDecode has its own test against the reference)."""
        if q_recv.is_cuda:
            meta = (self.f_q_pos, self.f_kv_indices, self.f_kv_pos)
            return self.foreign.run(q_recv, k_buffer, v_buffer, *meta, scaling)
        return paged_attention_ref(
            q_recv,
            k_buffer,
            v_buffer,
            list(range(q_recv.shape[0] + 1)),  # one query per sequence
            self.f_kv_indptr,
            self.f_kv_indices.long(),
            self.f_q_pos.long(),
            self.f_kv_pos.long(),
            scaling,
        )
