"""Torch reference kernels (the oracles for every optimized kernel).

Attention is defined over an arbitrary split of queries and keys: each "sequence" i pairs a ragged
range of queries with a list of KV slots, and a key is visible to a query iff
``kv_pos <= q_pos``. Partial results over disjoint key sets merge exactly by log-sum-exp, which is
what sharded (context-parallel) attention relies on. LSE here is natural-log based.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: list[int],
    kv_indptr: list[int],
    kv_indices: torch.Tensor,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ragged queries over paged KV.

    q: [Tq, Hq, D]; k_cache/v_cache: [num_slots, Hkv, D]; kv_indices: [Tk] slots;
    q_pos: [Tq], kv_pos: [Tk] absolute positions. Returns o [Tq, Hq, D] (q.dtype) and
    lse [Tq, Hq] (float32, -inf for a query that sees no key; its o is 0).
    """
    num_q_heads = q.shape[1]
    group = num_q_heads // k_cache.shape[1]
    out = torch.zeros(q.shape[0], num_q_heads, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(len(qo_indptr) - 1):
        qs, qe, ks, ke = qo_indptr[i], qo_indptr[i + 1], kv_indptr[i], kv_indptr[i + 1]
        if qe == qs or ke == ks:
            continue
        idx = kv_indices[ks:ke]
        qi = q[qs:qe].float()
        ki = k_cache[idx].float().repeat_interleave(group, dim=1)
        vi = v_cache[idx].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("mhd,nhd->hmn", qi, ki) * sm_scale
        visible = kv_pos[ks:ke][None, :] <= q_pos[qs:qe][:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        lse_i = torch.logsumexp(scores, dim=-1)  # [H, m]
        probs = torch.exp(scores - lse_i[..., None]).nan_to_num(0.0)
        out[qs:qe] = torch.einsum("hmn,nhd->mhd", probs, vi).to(q.dtype)
        lse[qs:qe] = lse_i.transpose(0, 1)
    return out, lse


def merge_states_ref(
    outputs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results over disjoint key sets.

    o = sum_i exp(lse_i - lse) * o_i, lse = log sum_i exp(lse_i); shards with lse = -inf
    (no visible key) contribute nothing. Shapes: o_i [T, H, D], lse_i [T, H].
    """
    lse_all = torch.stack([x.float() for x in lses])  # [N, T, H]
    lse = torch.logsumexp(lse_all, dim=0)
    weights = torch.exp(lse_all - lse[None]).nan_to_num(0.0)  # -inf - -inf -> nan -> 0
    o = sum(w[..., None] * o_i.float() for w, o_i in zip(weights, outputs))
    return o.to(outputs[0].dtype), lse


def expert_ffn_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_ids: torch.Tensor
) -> torch.Tensor:
    """Row r of x through expert expert_ids[r] (SwiGLU, unweighted). Rows whose id is outside
    [0, E_local) give 0. x: [R, H]; w13: [E_local, 2I, H]; w2: [E_local, H, I]."""
    out = x.new_zeros(x.shape)
    for e in torch.unique(expert_ids).tolist():
        if e < 0 or e >= w13.shape[0]:
            continue
        rows = torch.where(expert_ids == e)[0]
        gate, up = torch.nn.functional.linear(x[rows], w13[e]).chunk(2, dim=-1)
        out[rows] = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])
    return out


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """SwiGLU experts: y = sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)) over the token's top-k experts.

    x: [T, H]; w13: [E_local, 2I, H] (gate rows then up rows); w2: [E_local, H, I];
    topk_ids are global expert ids; experts outside [expert_offset, expert_offset + E_local)
    contribute nothing (they live on another expert-parallel rank). Experts are visited in
    increasing id order and accumulated with index_add_, as HF transformers does.
    """
    out = torch.zeros_like(x)
    num_local = w13.shape[0]
    local_ids = topk_ids - expert_offset
    for e in torch.unique(local_ids).tolist():
        if e < 0 or e >= num_local:
            continue
        token_idx, k_idx = torch.where(local_ids == e)
        gate, up = torch.nn.functional.linear(x[token_idx], w13[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])
        out.index_add_(0, token_idx, y * topk_weights[token_idx, k_idx, None].to(y.dtype))
    return out


def moe_align_ref(
    local_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of fused_moe.moe_align: group pair ids (flattened [T, k]) by expert (stable
    order), each expert's run padded to block_m rows. Ids outside [0, num_experts) are dropped. Returns (sorted_ids [capacity] with padding =
    num_pairs, block_expert [capacity // block_m] with -1 for unused blocks). No host sync."""
    flat = local_ids.reshape(-1)
    n, dev = flat.numel(), flat.device
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts  # first sorted index of each key
    order = torch.argsort(key, stable=True)
    skey = key[order]
    capacity = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    starts_ext = torch.cat([starts, starts.new_full((1,), capacity)])  # dropped pairs go past the end
    dest = starts_ext[skey] + torch.arange(n, device=dev) - first[skey]
    dest = torch.where(skey < num_experts, dest, capacity)
    sorted_ids = torch.full((capacity + 1,), n, dtype=torch.int64, device=dev)
    sorted_ids.scatter_(0, dest, order)
    block_start = torch.arange(capacity // block_m, device=dev) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_ids[:capacity], block_expert
