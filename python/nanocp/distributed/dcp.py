"""Dynamic context parallelism in the workers: foreign KV segments and per-step q / KV / (o, lse)
routing between the instances.

A sharded request's home runs its tokens (embedding, QKV, MoE, sampling) and holds its own
segments (the tail of a new plan); other instances ("holders") hold the rest in pages reserved
for it (foreign segments: planned up front, or placed later when the request grew). A token's
K/V is computed on the home and stored by whoever holds its position. Each step, per layer:
  1. K/V of the home's tokens whose positions belong to a holder's segment go to that holder;
  2. queries of the home's tokens that can see keys of a holder's segment go to that holder;
  3. every instance attends its own tokens over local KV and the received queries over its
     foreign segments (causal by absolute position), each giving (o, lse);
  4. partials go back to the home, which merges them by log-sum-exp (exact).
All instances take part in every exchange of the step (lockstep), with empty blocks if idle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanocp.distributed.a2a import A2AComm
from nanocp.kvcache.pool import PageAllocator
from nanocp_kernels.balanced_attention import BalancedDecode
from nanocp_kernels.merge import merge_states
from nanocp_kernels.reference import paged_attention_ref

_HEADER = 3  # key, n_kv, n_q


@dataclass
class ForeignSegment:
    start: int
    end: int
    pages: list[int]
    slots: torch.Tensor  # slot of position start + i


class ForeignKV:
    """Pages this instance holds for other homes' requests: per request (cp_key) one or more
    segments (the planned one, and later ones placed here when the request grew)."""

    def __init__(self, allocator: PageAllocator, device: torch.device) -> None:
        self.allocator = allocator
        self.device = device
        self.segments: dict[int, list[ForeignSegment]] = {}

    def pages_for(self, start: int, end: int) -> int:
        return -(-(end - start) // self.allocator.page_size)

    def reserve(self, key: int, start: int, end: int) -> bool:
        segs = self.segments.get(key, [])
        if any(seg.start == start for seg in segs):
            return True
        pages = self.allocator.alloc(self.pages_for(start, end))
        if pages is None:
            return False
        p = self.allocator.page_size
        rel = torch.arange(end - start, device=self.device)
        ids = torch.tensor(pages, dtype=torch.int64, device=self.device)
        segs.append(ForeignSegment(start, end, pages, ids[rel // p] * p + rel % p))
        self.segments[key] = sorted(segs, key=lambda seg: seg.start)
        return True

    def release(self, key: int) -> None:
        for seg in self.segments.pop(key, []):
            self.allocator.free(seg.pages)

    def _segments(self, key: int, positions: torch.Tensor) -> list[ForeignSegment]:
        segs = self.segments.get(key)
        if segs is None or any(not any(seg.start <= p < seg.end for seg in segs) for p in positions.tolist()):
            raise RuntimeError(f"context-parallel request {key}: positions not reserved on this instance")
        return segs

    def slots(self, key: int, positions: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(positions)
        for seg in self._segments(key, positions):
            m = (positions >= seg.start) & (positions < seg.end)
            out[m] = seg.slots[positions[m] - seg.start]
        return out

    def sequence(self, key: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, positions) of the positions below `upto` held here for the request: the keys
        queries at positions < upto can see (reserved positions beyond are not written yet and
        would only be masked out, at full cost)."""
        segs = [seg for seg in self._segments(key, torch.empty(0, dtype=torch.int64)) if seg.start < upto]
        slots = torch.cat([seg.slots[: min(seg.end, upto) - seg.start] for seg in segs])
        pos = torch.cat([torch.arange(seg.start, min(seg.end, upto), device=self.device) for seg in segs])
        return slots, pos


@dataclass
class DCPStep:
    comm: A2AComm
    kv_send_idx: torch.Tensor  # own rows whose K/V go to holders, grouped by peer
    kv_send_counts: list[int]
    kv_recv_counts: list[int]
    kv_recv_slots: torch.Tensor  # where received K/V rows are written here
    q_send_idx: torch.Tensor  # own rows whose queries go to holders, grouped by peer
    q_send_counts: list[int]
    q_recv_counts: list[int]
    f_qo_indptr: list[int]  # received queries as attention sequences over foreign segments
    f_kv_indptr: list[int]
    f_kv_indices: torch.Tensor
    f_q_pos: torch.Tensor
    f_kv_pos: torch.Tensor
    device_meta: tuple | None = None  # int32 copies for the CUDA kernel, made at the first layer
    graph: bool = False  # every instance replays this step from its context-parallel CUDA graphs

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
        """Steps 1-4 of the module docstring for one layer; returns this instance's merged output."""
        a2a = self.comm.all_to_all
        k_recv = a2a(k[self.kv_send_idx], self.kv_send_counts, self.kv_recv_counts)
        v_recv = a2a(v[self.kv_send_idx], self.kv_send_counts, self.kv_recv_counts)
        k_buffer[self.kv_recv_slots] = k_recv.to(k_buffer.dtype)
        v_buffer[self.kv_recv_slots] = v_recv.to(v_buffer.dtype)
        q_recv = a2a(q[self.q_send_idx], self.q_send_counts, self.q_recv_counts)
        o_f, lse_f = foreign_attention(q_recv, k_buffer, v_buffer, scaling, self)
        o_back = a2a(o_f, self.q_recv_counts, self.q_send_counts)
        lse_back = a2a(lse_f, self.q_recv_counts, self.q_send_counts)
        o, lse = o_local.clone(), lse_local.clone()
        off = 0
        for n in self.q_send_counts:  # a row goes to a peer at most once: merge peer by peer
            if n:
                rows = self.q_send_idx[off : off + n]
                parts_o = torch.stack([o[rows], o_back[off : off + n]])
                parts_lse = torch.stack([lse[rows], lse_back[off : off + n]])
                o[rows], lse[rows] = merge_states(parts_o, parts_lse, backend="torch")
            off += n
        return o


def _exchange_ints(blocks: list[list[int]], group, device) -> list[list[int]]:
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


def build_dcp_step(
    work: list[tuple],
    rank: int,
    world: int,
    foreign: ForeignKV,
    comm: A2AComm,
    cpu_group,
    device: torch.device,
) -> DCPStep:
    """work: (req, row_offset, start, end) of this instance's batch. Collective: every instance
    calls it in the step (an idle one with no work)."""
    blocks: list[list[int]] = [[] for _ in range(world)]
    kv_rows: list[list[int]] = [[] for _ in range(world)]
    q_rows: list[list[int]] = [[] for _ in range(world)]
    for req, row0, start, end in work:
        held: dict[int, list[tuple[int, int]]] = {}  # holder -> its segments of this request
        for inst, s, e in req.placement:
            if inst != rank:
                held.setdefault(inst, []).append((s, e))
        for inst, segs in held.items():
            kv_pos = [p for s, e in segs for p in range(max(start, s), min(end, e))]
            # tokens at or after the holder's first position see some of its keys
            q_pos = list(range(max(start, min(s for s, _ in segs)), end))
            if not kv_pos and not q_pos:
                continue
            blocks[inst] += [req.cp_key, len(kv_pos), len(q_pos), *kv_pos, *q_pos]
            kv_rows[inst] += [row0 + p - start for p in kv_pos]
            q_rows[inst] += [row0 + p - start for p in q_pos]
    received = _exchange_ints(blocks, cpu_group, device)
    kv_recv_counts, q_recv_counts, kv_slots = [], [], []
    f_qo, f_kv, f_kv_idx, f_qpos, f_kvpos = [0], [0], [], [], []
    for blk in received:
        n_kv_total = n_q_total = 0
        i = 0
        while i < len(blk):
            key, n_kv, n_q = blk[i : i + _HEADER]
            body = torch.tensor(blk[i + _HEADER : i + _HEADER + n_kv + n_q], dtype=torch.int64, device=device)
            kv_pos, q_pos = body[:n_kv], body[n_kv:]
            i += _HEADER + n_kv + n_q
            kv_slots.append(foreign.slots(key, kv_pos))
            n_kv_total += n_kv
            n_q_total += n_q
            if n_q:  # one attention sequence: these queries over the request's keys here they can see
                last_q = max(blk[i - n_q : i])  # host ints: no device sync
                slots, pos = foreign.sequence(key, last_q + 1)
                f_qo.append(f_qo[-1] + n_q)
                f_kv.append(f_kv[-1] + len(pos))
                f_kv_idx.append(slots)
                f_qpos.append(q_pos)
                f_kvpos.append(pos)
        kv_recv_counts.append(n_kv_total)
        q_recv_counts.append(n_q_total)

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs) if xs else torch.empty(0, dtype=torch.int64, device=device)

    def idx(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([r for rs in rows for r in rs], dtype=torch.int64, device=device)

    return DCPStep(
        comm=comm,
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
    )


def foreign_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    scaling: float,
    st: DCPStep,
    kernels: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Received queries over this instance's foreign segments (causal by absolute position).
    With the Triton kernels (kernels None: on CUDA; True on the CPU needs Triton's interpreter,
    too slow for the CPU servers): decode steps (one query per sequence) run BalancedDecode,
    planned once per step from the segments' lengths (one program per head and query would
    walk a whole long shard alone); queries of prefill chunks the blocked prefill kernel.
    Without: the torch reference (exact). Device metadata is built at the step's first layer."""
    args = (st.f_qo_indptr, st.f_kv_indptr, st.f_kv_indices, st.f_q_pos, st.f_kv_pos)
    if not (q.is_cuda if kernels is None else kernels):
        return paged_attention_ref(q, k_buffer, v_buffer, *args, scaling)
    rows = len(st.f_qo_indptr) - 1
    decode = rows > 0 and st.f_qo_indptr[-1] == rows
    if st.device_meta is None:
        i32 = lambda t: torch.as_tensor(t, device=q.device).to(torch.int32)  # noqa: E731
        balanced = None
        if decode:
            balanced = BalancedDecode(rows, q.shape[1], k_buffer.shape[1], q.shape[2], q.device)
            balanced.plan(st.f_kv_indptr)
        st.device_meta = (
            i32(st.f_kv_indptr),
            i32(st.f_kv_indices),
            i32(st.f_q_pos),
            i32(st.f_kv_pos),
            balanced,
        )
    kv_indptr, kv_indices, q_pos, kv_pos, balanced = st.device_meta
    if balanced is not None:
        return balanced.run(q, k_buffer, v_buffer, q_pos, kv_indices, kv_pos, scaling)
    from nanocp_kernels.attention import paged_prefill_attention

    max_q = max((b - a for a, b in zip(st.f_qo_indptr, st.f_qo_indptr[1:])), default=0)
    return paged_prefill_attention(
        q, k_buffer, v_buffer, st.f_qo_indptr, kv_indptr, kv_indices, q_pos, kv_pos, scaling,
        block_m=16 if max_q <= 16 else 64,
    )  # fmt: skip
