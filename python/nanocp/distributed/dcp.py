"""Dynamic context parallelism in the workers, per step: the step's plan (DCPPlan: which K/V
rows and queries of sharded requests go to which holder, and the foreign keys each received
query sees) and the executors that run it in every layer (scheduler/dcp.py has the whole path).

A sharded request's home runs its tokens (embedding, QKV, MoE, sampling) and holds its own held
ranges; holders keep the rest in pages reserved for it (ForeignKV). A token's K/V is computed on
the home and stored by whoever holds its position. Per layer:
  1. K/V of the home's tokens whose positions a holder holds go to that holder;
  2. queries of the home's tokens that can see keys of a holder go to that holder;
  3. every instance attends its own tokens over the KV it holds (the attention backend) and the
     received queries over its foreign KV (causal by absolute position), each giving (o, lse);
  4. partials go back to the home, which merges them by log-sum-exp (exact).
All instances take part in every exchange of the step (lockstep), with empty blocks if idle.
Executors (DCPExecutor): EagerDCP (all_to_all of the step's exact sizes) and GraphDCP
(dcp_graph.py: fixed buffers inside CUDA graphs); both take the plan at begin().
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanocp.distributed.a2a import A2AComm
from nanocp.scheduler.dcp import ForeignKV, ForeignSegment
from nanocp_kernels.balanced_attention import BalancedDecode
from nanocp_kernels.merge import merge_states
from nanocp_kernels.reference import paged_attention_ref

_HEADER = 3  # key, n_kv, n_q


@dataclass(frozen=True)
class DCPPlan:
    """One instance's part of a context-parallel step (per-peer lists indexed by instance)."""

    kv_send_idx: torch.Tensor  # own rows whose K/V go to holders, grouped by peer
    kv_send_counts: list[int]
    kv_recv_counts: list[int]
    kv_recv_slots: torch.Tensor  # where received K/V rows are written here
    q_send_idx: torch.Tensor  # own rows whose queries go to holders, grouped by peer
    q_send_counts: list[int]
    q_recv_counts: list[int]
    # received queries as attention sequences over the foreign KV here (host indptrs)
    f_qo_indptr: list[int]
    f_kv_indptr: list[int]
    f_kv_indices: torch.Tensor
    f_q_pos: torch.Tensor
    f_kv_pos: torch.Tensor
    graph: bool = False  # every instance replays this step from its context-parallel CUDA graphs
    # (cp_key, last position + 1) of the foreign K/V rows written here this step (prefix cache)
    written: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def idle(cls, world: int, device: torch.device) -> DCPPlan:
        """A step in which this instance routes nothing (what graphs are captured with)."""
        e = torch.empty(0, dtype=torch.int64, device=device)
        z = [0] * world
        return cls(e, z, z, e, e, z, z, [0], [0], e, e, e)

    def foreign_stats(self) -> dict[str, int]:
        """Work served for other homes this step (the step trace)."""
        qo, kv = self.f_qo_indptr, self.f_kv_indptr
        return {
            "foreign_queries": sum(self.q_recv_counts),
            "foreign_seqs": len(qo) - 1,  # requests whose queries attend here
            "foreign_pairs": sum((qo[i + 1] - qo[i]) * (kv[i + 1] - kv[i]) for i in range(len(qo) - 1)),
        }


class DCPExecutor(ABC):
    """Runs a DCPPlan: begin() once per step (before a graph replay), attend() in every layer."""

    @abstractmethod
    def begin(self, plan: DCPPlan) -> None:
        """Take the step's plan (device metadata, static buffers)."""

    @abstractmethod
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
        """Steps 1-4 of the module docstring for one layer: the own tokens' K/V and queries
        (q [T, Hq, D], k/v [T, Hkv, D]), their local attention state (o_local, lse_local) and
        the layer's KV cache; returns this instance's merged output [T, Hq, D]."""


# ---------------------------------------------------------------------- the plan, per step
def _exchange_ints(blocks: list[list[int]], group) -> list[list[int]]:
    """all_to_all of variable-length int lists (on the control group, CPU)."""
    counts = torch.tensor([len(b) for b in blocks], dtype=torch.int64)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    send = torch.tensor([x for b in blocks for x in b], dtype=torch.int64)
    recv = torch.empty(int(recv_counts.sum()), dtype=torch.int64)
    dist.all_to_all_single(recv, send, recv_counts.tolist(), counts.tolist(), group=group)
    out, off = [], 0
    for c in recv_counts.tolist():
        out.append(recv[off : off + c].tolist())
        off += c
    return out


def _segment_slots(seg: ForeignSegment, page: int, device: torch.device) -> torch.Tensor:
    if seg.slots is None:
        rel = torch.arange(seg.end - seg.start, device=device)
        ids = torch.tensor(seg.pages, dtype=torch.int64, device=device)
        seg.slots = ids[rel // page] * page + rel % page
    return seg.slots


def foreign_slots(foreign: ForeignKV, key: int, positions: list[int], device: torch.device) -> torch.Tensor:
    """The slots here of a request's foreign positions."""
    segs, page = foreign.held(key, positions), foreign.allocator.page_size
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    out = torch.empty_like(pos)
    for seg in segs:
        m = (pos >= seg.start) & (pos < seg.end)
        out[m] = _segment_slots(seg, page, device)[pos[m] - seg.start]
    return out


def foreign_sequence(
    foreign: ForeignKV, key: int, upto: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, positions) of the request's foreign positions below `upto`: the keys queries at
    positions < upto can see (reserved positions beyond are not written yet and would only be
    masked out, at full cost)."""
    page = foreign.allocator.page_size
    segs = [seg for seg in foreign.held(key, []) if seg.start < upto]
    slots = torch.cat([_segment_slots(seg, page, device)[: min(seg.end, upto) - seg.start] for seg in segs])
    pos = torch.cat([torch.arange(seg.start, min(seg.end, upto), device=device) for seg in segs])
    return slots, pos


def build_dcp_plan(
    work: list[tuple],
    rank: int,
    world: int,
    foreign: ForeignKV,
    cpu_group,
    device: torch.device,
    graph: bool = False,
) -> DCPPlan:
    """work: (req, row_offset, start, end) of this instance's sharded requests in the batch.
    Collective: every instance calls it in the step (an idle one with no work)."""
    blocks: list[list[int]] = [[] for _ in range(world)]
    kv_rows: list[list[int]] = [[] for _ in range(world)]
    q_rows: list[list[int]] = [[] for _ in range(world)]
    for req, row0, start, end in work:
        for inst, held in req.placement.holders().items():
            kv_pos = [p for s, e in held for p in range(max(start, s), min(end, e))]
            # tokens at or after the holder's first position see some of its keys
            q_pos = list(range(max(start, min(s for s, _ in held)), end))
            if not kv_pos and not q_pos:
                continue
            blocks[inst] += [req.cp_key, len(kv_pos), len(q_pos), *kv_pos, *q_pos]
            kv_rows[inst] += [row0 + p - start for p in kv_pos]
            q_rows[inst] += [row0 + p - start for p in q_pos]
    received = _exchange_ints(blocks, cpu_group)
    kv_recv_counts, q_recv_counts, kv_slots, written = [], [], [], []
    f_qo, f_kv, f_kv_idx, f_qpos, f_kvpos = [0], [0], [], [], []
    for blk in received:
        n_kv_total = n_q_total = 0
        i = 0
        while i < len(blk):
            key, n_kv, n_q = blk[i : i + _HEADER]
            kv_pos = blk[i + _HEADER : i + _HEADER + n_kv]
            q_pos = blk[i + _HEADER + n_kv : i + _HEADER + n_kv + n_q]
            i += _HEADER + n_kv + n_q
            kv_slots.append(foreign_slots(foreign, key, kv_pos, device))
            if kv_pos:
                written.append((key, max(kv_pos) + 1))
            n_kv_total += n_kv
            n_q_total += n_q
            if n_q:  # one attention sequence: these queries over the request's keys here they can see
                slots, pos = foreign_sequence(foreign, key, max(q_pos) + 1, device)
                f_qo.append(f_qo[-1] + n_q)
                f_kv.append(f_kv[-1] + len(pos))
                f_kv_idx.append(slots)
                f_qpos.append(torch.tensor(q_pos, dtype=torch.int64, device=device))
                f_kvpos.append(pos)
        kv_recv_counts.append(n_kv_total)
        q_recv_counts.append(n_q_total)

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs) if xs else torch.empty(0, dtype=torch.int64, device=device)

    def idx(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([r for rs in rows for r in rs], dtype=torch.int64, device=device)

    return DCPPlan(
        kv_send_idx=idx(kv_rows),
        kv_send_counts=[len(r) for r in kv_rows],
        kv_recv_counts=kv_recv_counts,
        kv_recv_slots=cat(kv_slots),
        q_send_idx=idx(q_rows),
        q_send_counts=[len(r) for r in q_rows],
        q_recv_counts=q_recv_counts,
        f_qo_indptr=f_qo,
        f_kv_indptr=f_kv,
        f_kv_indices=cat(f_kv_idx),
        f_q_pos=cat(f_qpos),
        f_kv_pos=cat(f_kvpos),
        graph=graph,
        written=written,
    )


# ------------------------------------------------------------------- the eager executor
class EagerDCP(DCPExecutor):
    """The plan's exchanges at their exact sizes (A2AComm.all_to_all); the received queries'
    attention over foreign KV: with the Triton kernels (kernels None: on CUDA; True on the CPU
    needs Triton's interpreter, too slow for the CPU servers) decode steps (one query per
    sequence) run BalancedDecode, planned once per step from the shards' lengths (one program
    per head and query would walk a whole long shard alone), prefill chunks' queries the blocked
    prefill kernel; without, the torch reference (exact)."""

    def __init__(
        self,
        comm: A2AComm | None,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        kernels: bool | None = None,
    ) -> None:
        self.comm = comm
        self.heads = (num_qo_heads, num_kv_heads, head_dim)
        self.device = device
        self.kernels = device.type == "cuda" if kernels is None else kernels
        self.plan: DCPPlan | None = None
        self.meta: tuple | None = None  # the step's int32 device metadata (kernels only)
        self.balanced: BalancedDecode | None = None  # the step's, if it is a decode step

    def begin(self, plan: DCPPlan) -> None:
        self.plan, self.meta, self.balanced = plan, None, None
        if not self.kernels:
            return
        rows = len(plan.f_qo_indptr) - 1
        if rows > 0 and plan.f_qo_indptr[-1] == rows:  # decode: one query per sequence
            self.balanced = BalancedDecode(rows, *self.heads, self.device)
            self.balanced.plan(plan.f_kv_indptr)
        i32 = lambda t: torch.as_tensor(t, device=self.device).to(torch.int32)  # noqa: E731
        self.meta = (i32(plan.f_kv_indptr), i32(plan.f_kv_indices), i32(plan.f_q_pos), i32(plan.f_kv_pos))

    def attend(self, q, k, v, o_local, lse_local, k_buffer, v_buffer, scaling):
        st, a2a = self.plan, self.comm.all_to_all
        k_recv = a2a(k[st.kv_send_idx], st.kv_send_counts, st.kv_recv_counts)
        v_recv = a2a(v[st.kv_send_idx], st.kv_send_counts, st.kv_recv_counts)
        k_buffer[st.kv_recv_slots] = k_recv.to(k_buffer.dtype)
        v_buffer[st.kv_recv_slots] = v_recv.to(v_buffer.dtype)
        q_recv = a2a(q[st.q_send_idx], st.q_send_counts, st.q_recv_counts)
        o_f, lse_f = self.foreign_attention(q_recv, k_buffer, v_buffer, scaling)
        o_back = a2a(o_f, st.q_recv_counts, st.q_send_counts)
        lse_back = a2a(lse_f, st.q_recv_counts, st.q_send_counts)
        o, lse = o_local.clone(), lse_local.clone()
        off = 0
        for n in st.q_send_counts:  # a row goes to a peer at most once: merge peer by peer
            if n:
                rows = st.q_send_idx[off : off + n]
                parts_o = torch.stack([o[rows], o_back[off : off + n]])
                parts_lse = torch.stack([lse[rows], lse_back[off : off + n]])
                o[rows], lse[rows] = merge_states(parts_o, parts_lse, backend="torch")
            off += n
        return o

    def foreign_attention(
        self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Received queries over this instance's foreign KV (causal by absolute position)."""
        st = self.plan
        if self.meta is None:
            args = (st.f_qo_indptr, st.f_kv_indptr, st.f_kv_indices, st.f_q_pos, st.f_kv_pos)
            return paged_attention_ref(q, k_buffer, v_buffer, *args, scaling)
        kv_indptr, kv_indices, q_pos, kv_pos = self.meta
        if self.balanced is not None:
            return self.balanced.run(q, k_buffer, v_buffer, q_pos, kv_indices, kv_pos, scaling)
        from nanocp_kernels.attention import paged_prefill_attention

        max_q = max((b - a for a, b in zip(st.f_qo_indptr, st.f_qo_indptr[1:])), default=0)
        return paged_prefill_attention(
            q, k_buffer, v_buffer, st.f_qo_indptr, kv_indptr, kv_indices, q_pos, kv_pos, scaling,
            block_m=16 if max_q <= 16 else 64,
        )  # fmt: skip
