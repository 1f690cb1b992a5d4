"""The attention layer models call; the actual work goes to the step's attention backend, and
for context-parallel steps to the DCP executor (distributed/dcp.py)."""

from __future__ import annotations

import torch
from torch import nn

from nanocp.engine.context import get_context
from nanocp.engine.step_trace import trace_section


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling

    def kv_store(self, v: torch.Tensor) -> tuple | None:
        """Where a fused kernel before attention may store the step's new K/V itself
        (elementwise.qk_norm_rope's kv_store), or None: then forward stores them."""
        ctx = get_context()
        pool, loc = ctx.kv_pool, ctx.batch.out_cache_loc
        if not loc.is_cuda or pool.pad_slot is None:
            return None
        return v, loc, pool.k_buffer[self.layer_id], pool.v_buffer[self.layer_id], pool.pad_slot

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_stored: bool = False
    ) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hkv*D] -> [T, Hq*D]. Stores the new K/V in the cache unless the
        caller did (kv_stored, through kv_store), then attends."""
        ctx = get_context()
        batch, pool = ctx.batch, ctx.kv_pool
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if not kv_stored:  # rows with loc < 0 are held by another instance (context parallelism)
            pool.set_kv(self.layer_id, batch.out_cache_loc, k, v, masked=batch.dcp is not None)
        with trace_section("attention"):
            if batch.dcp is None:
                out = ctx.attn_backend.forward(q, k, v, self, batch)
            else:
                o_local, lse_local = ctx.attn_backend.forward_with_lse(q, k, v, self, batch)
                batch.collectives_begun = True
                kv_cache = (pool.k_buffer[self.layer_id], pool.v_buffer[self.layer_id])
                out = ctx.dcp_executor(batch).attend(q, k, v, o_local, lse_local, *kv_cache, self.scaling)
            return out.reshape(q.shape[0], self.num_heads * self.head_dim)  # T may be 0 (idle batch)
