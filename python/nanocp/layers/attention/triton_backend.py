"""Triton attention backend: the torch backend's metadata, one Triton kernel per layer.

Decode steps (one query per request; eager or replayed from CUDA graphs) run BalancedDecode:
`paged_attention` gives every row the same split count (for graphs, fixed at capture by the
batch size), which leaves a long row among short ones (a 128k request in a batch of 2k ones) on
a handful of programs; the balanced kernels' work is cut from the step's lengths."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from nanocp.layers.attention.base import ragged_index
from nanocp.layers.attention.torch_backend import TorchAttnBackend
from nanocp_kernels import triton_runs_on
from nanocp_kernels.attention import paged_attention, paged_prefill_attention
from nanocp_kernels.balanced_attention import BalancedDecode

if TYPE_CHECKING:
    from nanocp.engine.forward_batch import ForwardBatch
    from nanocp.layers.attention.base import AttentionLayer


class TritonAttnBackend(TorchAttnBackend):
    supports_cuda_graph = True
    supports_cp_cuda_graph = True  # replays decode batches of context-parallel requests too

    def __init__(
        self,
        device: torch.device | None = None,
        num_qo_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.device = device
        self.heads = (num_qo_heads, num_kv_heads, head_dim) if num_qo_heads else None
        self.balanced: BalancedDecode | None = None  # decode graphs (init_cuda_graph_state)
        self.eager_balanced: BalancedDecode | None = None  # eager decode steps (grown as needed)
        self.step_balanced: BalancedDecode | None = None  # this step's, if it is a decode step
        if device is not None and not triton_runs_on(torch.device(device)):
            raise ValueError(
                "--attention-backend triton needs a CUDA device (on CPU only under TRITON_INTERPRET=1, for tests); "
                "use --attention-backend torch"
            )

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        super().init_forward_metadata(batch)
        qo_indptr, kv_indptr, kv_indices, kv_pos = self.meta
        device = kv_indices.device
        counts = torch.tensor(
            [b - a for a, b in zip(qo_indptr, qo_indptr[1:])], dtype=torch.int64, device=device
        )
        q_seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts).to(torch.int32)
        # extend / prefill chunks: blocks of queries share key loads (tensor-core kernel)
        self.prefill_qo = qo_indptr if max(counts.tolist(), default=0) > 16 else None
        self.q_pos = batch.positions.to(torch.int32)  # once per step, not per layer
        self.step_balanced = None
        if self.heads is not None and qo_indptr[-1] == len(qo_indptr) - 1 > 0:  # decode
            rows = len(qo_indptr) - 1
            if self.eager_balanced is None or self.eager_balanced.rows < rows:
                self.eager_balanced = BalancedDecode(max(rows, 64), *self.heads, device)
            self.step_balanced = self.eager_balanced
            self.step_balanced.plan(kv_indptr)
        self.triton_meta = (
            q_seq,
            torch.tensor(kv_indptr, dtype=torch.int32, device=device),
            kv_indices.to(torch.int32),
            kv_pos.to(torch.int32),
        )

    def init_cuda_graph_state(self, max_bs: int, num_slots: int) -> None:
        dev = self.device
        self.g_q_seq = torch.arange(max_bs, dtype=torch.int32, device=dev)
        self.g_kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_kv_indices = torch.zeros(num_slots, dtype=torch.int32, device=dev)
        self.g_kv_pos = torch.zeros(num_slots, dtype=torch.int32, device=dev)
        self.g_q_pos = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        if self.heads is not None:
            self.balanced = BalancedDecode(max_bs, *self.heads, torch.device(dev))

    def init_forward_metadata_capture(self, batch: ForwardBatch) -> None:
        self.init_forward_metadata_replay(batch)

    def init_forward_metadata_replay(self, batch: ForwardBatch) -> None:
        """Decode: every request's KV row [0, seq_len) from req_to_token, built on the device;
        for context-parallel requests only their held ranges."""
        bs = batch.batch_size
        if batch.held_ranges is None:
            held = batch.seq_lens_cpu
            total = sum(held)
            ends, rows, pos = ragged_index(batch.req_pool_indices, batch.seq_lens, total)
        else:
            segs = [(i, s, e - s) for i, rs in enumerate(batch.held_ranges) for s, e in rs if e > s]
            held = [sum(e - s for s, e in rs) for rs in batch.held_ranges]
            total = sum(held)
            seg = torch.tensor(segs, dtype=torch.int64).reshape(-1, 3).T.to(self.device, non_blocking=True)
            _, rows, within = ragged_index(batch.req_pool_indices[seg[0]], seg[2], total)
            pos = torch.repeat_interleave(seg[1], seg[2], output_size=total) + within
            ends = torch.tensor(held, dtype=torch.int64).cumsum(0).to(self.device, non_blocking=True)
        self.g_kv_indptr[1 : bs + 1].copy_(ends)
        self.g_kv_indices[:total].copy_(self.req_to_token_pool.req_to_token[rows, pos])
        self.g_kv_pos[:total].copy_(pos)
        self.prefill_qo = None
        self.g_q_pos[:bs].copy_(batch.positions)  # the graph's static positions, already written
        self.q_pos = self.g_q_pos[:bs]
        self.triton_meta = (self.g_q_seq[:bs], self.g_kv_indptr[: bs + 1], self.g_kv_indices, self.g_kv_pos)
        self.step_balanced = self.balanced
        if self.balanced is not None:  # rows' keys are consecutive in g_kv_indices, as above
            self.balanced.plan([0, *itertools.accumulate(held)])

    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_seq, kv_indptr, kv_indices, kv_pos = self.triton_meta
        q = q.contiguous()
        cache = (self.kv_pool.k_buffer[layer.layer_id], self.kv_pool.v_buffer[layer.layer_id])
        if self.prefill_qo is not None:
            meta = (self.prefill_qo, kv_indptr, kv_indices, self.q_pos, kv_pos)
            return paged_prefill_attention(q, *cache, *meta, layer.scaling)
        if self.step_balanced is not None:
            return self.step_balanced.run(q, *cache, self.q_pos, kv_indices, kv_pos, layer.scaling)
        return paged_attention(q, *cache, q_seq, kv_indptr, kv_indices, self.q_pos, kv_pos, layer.scaling)
