"""Reference attention backend: plain torch over the paged KV cache; runs on CPU and GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanocp.layers.attention.base import AttentionBackend
from nanocp_kernels.reference import paged_attention_ref

if TYPE_CHECKING:
    from nanocp.engine.forward_batch import ForwardBatch
    from nanocp.layers.attention.base import AttentionLayer


class TorchAttnBackend(AttentionBackend):
    supports_context_parallel = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.meta: tuple | None = None

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        table = self.req_to_token_pool.req_to_token
        qo_indptr, kv_indptr, rows, kv_pos = [0], [0], [], []
        for i, (seq_len, ext_len) in enumerate(zip(batch.seq_lens_cpu, batch.extend_seq_lens_cpu)):
            # context parallelism: positions outside these ranges are held by other instances
            ranges = batch.held_ranges[i] if batch.held_ranges else [(0, seq_len)]
            qo_indptr.append(qo_indptr[-1] + ext_len)
            kv_indptr.append(kv_indptr[-1] + sum(e - s for s, e in ranges))
            for s, e in ranges:
                rows.append(table[batch.req_pool_indices[i], s:e])
                kv_pos.append(torch.arange(s, e, device=table.device))
        if rows:
            kv_indices, kv_positions = torch.cat(rows), torch.cat(kv_pos)
        else:
            kv_indices = kv_positions = torch.empty(0, dtype=torch.int64, device=table.device)
        self.meta = (qo_indptr, kv_indptr, kv_indices, kv_positions)

    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.meta is not None, "init_forward_metadata was not called"
        qo_indptr, kv_indptr, kv_indices, kv_pos = self.meta
        return paged_attention_ref(
            q,
            self.kv_pool.k_buffer[layer.layer_id],
            self.kv_pool.v_buffer[layer.layer_id],
            qo_indptr,
            kv_indptr,
            kv_indices,
            batch.positions,
            kv_pos,
            layer.scaling,
        )
