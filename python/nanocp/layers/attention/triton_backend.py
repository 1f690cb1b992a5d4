"""Triton attention backend: the torch backend's metadata, one Triton kernel per layer."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from nanocp.layers.attention.base import register_attention_backend
from nanocp.layers.attention.torch_backend import TorchAttnBackend
from nanocp_kernels.attention import paged_attention

if TYPE_CHECKING:
    from nanocp.engine.forward_batch import ForwardBatch
    from nanocp.layers.attention.layer import Attention


@register_attention_backend("triton")
class TritonAttnBackend(TorchAttnBackend):
    def __init__(self, device: torch.device | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if (
            device is not None
            and torch.device(device).type != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"
        ):
            raise ValueError(
                "--attention-backend triton needs a CUDA device (on CPU only under TRITON_INTERPRET=1, for tests); "
                "use --attention-backend torch"
            )

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        super().init_forward_metadata(batch)
        qo_indptr, kv_indptr, kv_indices, kv_pos = self.meta
        device = kv_indices.device
        counts = torch.tensor([b - a for a, b in zip(qo_indptr, qo_indptr[1:])], device=device)
        q_seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts).to(torch.int32)
        self.triton_meta = (
            q_seq,
            torch.tensor(kv_indptr, dtype=torch.int32, device=device),
            kv_indices.to(torch.int32),
            kv_pos.to(torch.int32),
        )

    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v, masked=batch.dcp is not None)

        q_seq, kv_indptr, kv_indices, kv_pos = self.triton_meta
        return paged_attention(
            q.contiguous(),
            batch.kv_pool.k_buffer[layer.layer_id],
            batch.kv_pool.v_buffer[layer.layer_id],
            q_seq,
            kv_indptr,
            kv_indices,
            batch.positions.to(torch.int32),
            kv_pos,
            layer.scaling,
        )
