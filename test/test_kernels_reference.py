"""The torch reference kernels against plain dense math, and split-KV + LSE merge == unsplit."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanocp_kernels import fused_moe_ref, merge_states_ref, paged_attention_ref


def _dense_causal(q, k, v, q_pos, kv_pos, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(kv_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v), torch.logsumexp(s, -1).T


@settings(max_examples=40, deadline=None)
@given(
    kv_len=st.integers(1, 40),
    q_len=st.integers(1, 8),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    num_splits=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_split_attention_merges_to_full(kv_len, q_len, heads, num_splits, seed):
    """Keys scattered over a paged pool, split into contiguous segments; each segment attended
    separately and merged by LSE equals attention over all keys."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = *heads, 8
    q_len = min(q_len, kv_len)
    num_slots = kv_len + 16
    k_cache, v_cache = (
        torch.randn(num_slots, hkv, d, generator=g),
        torch.randn(num_slots, hkv, d, generator=g),
    )
    slots = torch.randperm(num_slots, generator=g)[:kv_len]
    kv_pos = torch.arange(kv_len)
    q_pos = torch.arange(kv_len - q_len, kv_len)  # the last q_len tokens are the queries (extend)
    q = torch.randn(q_len, hq, d, generator=g)
    scale = 1 / math.sqrt(d)

    ref_o, ref_lse = _dense_causal(q, k_cache[slots], v_cache[slots], q_pos, kv_pos, scale)
    full_o, full_lse = paged_attention_ref(
        q, k_cache, v_cache, [0, q_len], [0, kv_len], slots, q_pos, kv_pos, scale
    )
    torch.testing.assert_close(full_o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_lse, ref_lse, rtol=1e-5, atol=1e-5)

    cuts = sorted(torch.randint(0, kv_len + 1, (num_splits - 1,), generator=g).tolist())
    bounds = [0, *cuts, kv_len]
    parts = [
        paged_attention_ref(
            q, k_cache, v_cache, [0, q_len], [0, e - s], slots[s:e], q_pos, kv_pos[s:e], scale
        )
        for s, e in zip(bounds, bounds[1:])
    ]
    o, lse = merge_states_ref([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_query_seeing_no_key_gives_minus_inf_lse():
    q = torch.randn(1, 2, 4)
    kv = torch.randn(3, 2, 4)
    o, lse = paged_attention_ref(
        q, kv, kv, [0, 1], [0, 2], torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([5, 6]), 0.5
    )
    assert torch.isneginf(lse).all() and (o == 0).all()


def test_fused_moe_ref_matches_transformers_experts():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=6, num_experts_per_tok=2)
    experts = Qwen3MoeExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g))
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g))
    x = torch.randn(10, 16, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(10)])
    w = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        ref = experts(x, ids, w)
        ours = fused_moe_ref(x, experts.gate_up_proj, experts.down_proj, w, ids)
        torch.testing.assert_close(ours, ref)
        # expert-parallel slices add up to the whole
        halves = sum(
            fused_moe_ref(
                x, experts.gate_up_proj[o : o + 3], experts.down_proj[o : o + 3], w, ids, expert_offset=o
            )
            for o in (0, 3)
        )
        torch.testing.assert_close(halves, ref, rtol=1e-5, atol=1e-5)
