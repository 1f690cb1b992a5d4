"""Mixture-of-experts layer: top-k softmax router + SwiGLU experts stored as stacked tensors.

Experts are held as w13 [E_local, 2I, H] and w2 [E_local, H, I] so that expert-parallel ranks
own a contiguous slice of them and fused kernels see one tensor per projection.
"""

from __future__ import annotations

import torch
from torch import nn

from nanocp import envs
from nanocp.engine.context import get_context
from nanocp.engine.step_trace import trace_section
from nanocp.layers.layernorm import RMSNorm
from nanocp.layers.linear import linear, small_rows
from nanocp_kernels.reference import expert_ffn_ref, fused_moe_ref


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float32 over all experts, keep the top-k (optionally renormalised)."""
    if router_logits.is_cuda and top_k & (top_k - 1) == 0:  # one fused launch (power-of-2 k)
        from nanocp_kernels.elementwise import topk_softmax

        return topk_softmax(router_logits, top_k, renormalize, out_dtype=dtype)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        ep_rank: int = 0,
        ep_size: int = 1,
    ) -> None:
        super().__init__()
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by --ep-size ({ep_size})")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.intermediate_size = intermediate_size
        self.num_local_experts = num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local_experts
        self.w13_weight = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * intermediate_size, hidden_size)
        )
        self.w2_weight = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, intermediate_size))
        self.runner_backend = "torch"  # --moe-runner-backend (set by the model runner)

    def run_experts(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_offset: int
    ) -> torch.Tensor:
        """Weighted sum over each token's top-k local experts (others give 0)."""
        if self.runner_backend == "triton":
            from nanocp_kernels.fused_moe import fused_moe
            from nanocp_kernels.small_moe import SMALL_PAIRS, small_fused_moe

            k = topk_ids.shape[1]
            small = topk_ids.numel() <= SMALL_PAIRS and k & (k - 1) == 0
            if small and x.is_cuda and envs.small_batch_kernels():
                return small_fused_moe(
                    x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, expert_offset
                )
            all_local = self.num_local_experts == self.num_experts
            return fused_moe(
                x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, expert_offset, all_local
            )
        return fused_moe_ref(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, expert_offset)

    def run_expert_rows(
        self,
        x: torch.Tensor,
        local_ids: torch.Tensor,
        out: torch.Tensor | None = None,
        max_rows: int | None = None,
        fill_unused: bool = True,
    ) -> torch.Tensor:
        """Row r through local expert local_ids[r], unweighted (rows dispatched to this rank);
        rows with id -1 give 0, or are left undefined with fill_unused=False (the caller never
        reads them). out: write the result there (same shape as x). max_rows: at most this many
        ids are not -1 (fixed-capacity receive buffers: the work is sized by it)."""
        if self.runner_backend == "triton":
            from nanocp_kernels.fused_moe import fused_moe

            return fused_moe(
                x, self.w13_weight, self.w2_weight, None, local_ids[:, None], out=out, max_rows=max_rows,
                fill_unrouted=fill_unused,
            )  # fmt: skip
        y = expert_ffn_ref(x, self.w13_weight, self.w2_weight, local_ids)
        return y if out is None else out.copy_(y)

    def load_expert(self, expert_id: int, proj: str, tensor: torch.Tensor) -> bool:
        """Load one checkpoint tensor (gate_proj/up_proj/down_proj of one expert); False if not local."""
        e = expert_id - self.expert_offset
        if not 0 <= e < self.num_local_experts:
            return False
        size = self.intermediate_size
        if proj == "gate_proj":
            self.w13_weight.data[e, :size].copy_(tensor)
        elif proj == "up_proj":
            self.w13_weight.data[e, size:].copy_(tensor)
        elif proj == "down_proj":
            self.w2_weight.data[e].copy_(tensor)
        else:
            raise ValueError(f"unknown expert projection {proj!r}")
        return True

    def load_stacked(self, name: str, tensor: torch.Tensor) -> None:
        """Load transformers-v5 style stacked experts (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
        sl = slice(self.expert_offset, self.expert_offset + self.num_local_experts)
        target = self.w13_weight if name == "gate_up_proj" else self.w2_weight
        target.data.copy_(tensor[sl])

    def route(
        self,
        x: torch.Tensor,
        gate_weight: torch.Tensor,
        residual: torch.Tensor | None = None,
        norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router: (weights [T, top_k] in x's dtype, global expert ids [T, top_k], h, s). With
        norm: h, s = norm(x + residual), x + residual (residual None: norm(x), x) first, in the
        router's launch for one decode token; without: h = s = x."""
        if x.is_cuda and self.top_k & (self.top_k - 1) == 0:
            from nanocp_kernels.gemv import ROUTER_WINS_UP_TO, router_topk

            if small_rows(x, ROUTER_WINS_UP_TO):  # (norm,) gate projection and top-k in one launch
                if norm is None:
                    return *router_topk(x, gate_weight, self.top_k, self.renormalize), x, x
                norm_args = (residual, norm.weight, norm.eps)
                return router_topk(x, gate_weight, self.top_k, self.renormalize, norm_args)
        h, s = (x, x) if norm is None else norm.add_norm(x, residual)
        return *select_experts(linear(h, gate_weight), self.top_k, self.renormalize, x.dtype), h, s

    def forward(
        self,
        x: torch.Tensor,
        gate_weight: torch.Tensor,
        residual: torch.Tensor | None = None,
        norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts(h), s) with h, s as in `route` (gate_weight [num_experts, hidden])."""
        weights, ids, h, s = self.route(x, gate_weight, residual, norm)
        ctx = get_context()
        if ctx.moe_comm is None:
            with trace_section("moe_compute"):
                return self.run_experts(h, weights, ids, self.expert_offset), s
        ctx.batch.collectives_begun = True
        return ctx.moe_comm.forward(h, weights, ids, self, ctx.batch.global_num_tokens), s
