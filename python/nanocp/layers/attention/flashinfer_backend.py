"""FlashInfer attention backend (CUDA): batch prefill/append + decode over the paged KV cache
with one BatchPrefillWithPagedKVCacheWrapper plan per step, returning (o, lse).

Covers the standard causal case (a request's KV all local, queries at its end). Context-parallel
splits (some KV held elsewhere) use the torch / triton backends for now.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from nanocp.layers.attention.base import AttentionBackend, register_attention_backend

if TYPE_CHECKING:
    from nanocp.engine.forward_batch import ForwardBatch
    from nanocp.layers.attention.layer import Attention

WORKSPACE_BYTES = 256 * 1024 * 1024


@register_attention_backend("flashinfer")
class FlashInferAttnBackend(AttentionBackend):
    def __init__(
        self,
        device: torch.device,
        page_size: int,
        dtype: torch.dtype,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        **_: object,
    ) -> None:
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError(
                "--attention-backend flashinfer needs flashinfer-python (pip install nanocp[gpu])"
            ) from e
        if torch.device(device).type != "cuda":
            raise ValueError(
                "--attention-backend flashinfer needs a CUDA device; use --attention-backend torch"
            )
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"--attention-backend flashinfer needs --dtype bfloat16 or float16, got {dtype}")
        self.page_size = page_size
        self.dtype = dtype
        self.heads = (num_qo_heads, num_kv_heads, head_dim)
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")
        self.empty = False

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.kv_ranges_cpu or batch.dcp is not None:
            raise NotImplementedError("context-parallel steps need --attention-backend torch or triton")
        self.empty = batch.batch_size == 0
        if self.empty:
            return
        p = self.page_size
        table = batch.req_to_token_pool.req_to_token
        device = table.device
        pages, num_pages, last = [], [], []
        for i, seq_len in enumerate(batch.seq_lens_cpu):
            n = -(-seq_len // p)
            pages.append(table[batch.req_pool_indices[i], 0 : (n - 1) * p + 1 : p] // p)
            num_pages.append(n)
            last.append(seq_len - (n - 1) * p)
        qo = [0]
        for n in batch.extend_seq_lens_cpu:
            qo.append(qo[-1] + n)
        kv = [0]
        for n in num_pages:
            kv.append(kv[-1] + n)

        def i32(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int32, device=device)

        hq, hkv, d = self.heads
        self.wrapper.plan(
            i32(qo),
            i32(kv),
            torch.cat(pages).to(torch.int32),
            i32(last),
            hq,
            hkv,
            d,
            p,
            causal=True,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        if self.empty:
            return q.new_zeros(q.shape), torch.full(q.shape[:2], float("-inf"), device=q.device)
        _, hkv, d = self.heads
        kc = batch.kv_pool.k_buffer[layer.layer_id].view(-1, self.page_size, hkv, d)
        vc = batch.kv_pool.v_buffer[layer.layer_id].view(-1, self.page_size, hkv, d)
        # plan() used FlashInfer's default scale 1/sqrt(head_dim), which is the models' scaling
        o, lse2 = self.wrapper.run(q.contiguous(), (kc, vc), return_lse=True)
        return o, lse2.float() * math.log(2)  # FlashInfer's LSE is base 2
