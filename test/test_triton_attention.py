"""Triton paged attention (and the triton backend) against the torch reference / HF."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip(
    "triton", reason="Triton kernels (skipped on a torch without triton)", exc_type=ImportError
)

from conftest import greedy_params, random_prompts  # noqa: E402
from nanocp_kernels.attention import paged_attention  # noqa: E402
from nanocp_kernels.reference import paged_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("block_n", [16, 64])  # 64: rows of <= 64 keys per split step 32 keys
def test_paged_attention_matches_reference(heads, dtype, splits, block_n):
    g = torch.Generator().manual_seed(sum(heads))
    hq, hkv, d = *heads, 32
    # (queries, keys): decode, extend, empty; at block_n 64 both step sizes of the decode kernel
    seqs = [(1, 1), (3, 40), (1, 70), (5, 5), (2, 0), (4, 33), (1, 130)]
    num_slots = sum(k for _, k in seqs) + 10
    k_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(num_slots, generator=g)
    qo, kvp, idx, kpos, qpos, used = [0], [0], [], [], [], 0
    for nq, nk in seqs:
        qo.append(qo[-1] + nq)
        kvp.append(kvp[-1] + nk)
        idx.append(perm[used : used + nk])
        used += nk
        kpos.append(torch.arange(nk))
        qpos.append(torch.arange(max(nk - nq, 0), max(nk - nq, 0) + nq))  # the last nq positions
    idx, kpos, qpos = torch.cat(idx), torch.cat(kpos), torch.cat(qpos)
    q = torch.randn(qo[-1], hq, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    ref_o, ref_lse = paged_attention_ref(
        q.float(), k_cache.float(), v_cache.float(), qo, kvp, idx, qpos, kpos, scale
    )
    counts = torch.tensor([b - a for a, b in zip(qo, qo[1:])])
    q_seq = torch.repeat_interleave(torch.arange(len(seqs)), counts).to(torch.int32)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    o, lse = paged_attention(
        dev(q),
        dev(k_cache),
        dev(v_cache),
        dev(q_seq),
        dev(torch.tensor(kvp, dtype=torch.int32)),
        dev(idx.to(torch.int32)),
        dev(qpos.to(torch.int32)),
        dev(kpos.to(torch.int32)),
        scale,
        block_n=block_n,
        num_splits=splits,  # 4: some rows' splits are empty (a row of 1 key), merged as -inf
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float().cpu(), ref_o, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_paged_prefill_attention_matches_reference(heads, dtype):
    """Blocked kernel, many queries per sequence; key positions with gaps (a holder's segments)
    and queries inside, between and after them, so each visibility pattern occurs."""
    from nanocp_kernels.attention import paged_prefill_attention

    g = torch.Generator().manual_seed(7)
    hq, hkv, d = *heads, 32
    # (key positions, query positions) per sequence
    seqs = [
        (list(range(0, 48)) + list(range(80, 100)), list(range(40, 90))),  # inside, gap, inside
        (list(range(16, 32)), [100]),  # decode: all keys visible
        (list(range(0, 20)), list(range(0, 20))),  # plain causal
        ([], list(range(5))),  # no keys here
        (list(range(0, 70)), list(range(70, 75))),  # after every key
    ]
    num_slots = sum(len(k) for k, _ in seqs) + 9
    k_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(num_slots, generator=g)
    qo, kvp, used = [0], [0], 0
    idx, kpos, qpos = [], [], []
    for keys, queries in seqs:
        qo.append(qo[-1] + len(queries))
        kvp.append(kvp[-1] + len(keys))
        idx.append(perm[used : used + len(keys)])
        used += len(keys)
        kpos += keys
        qpos += queries
    idx, kpos, qpos = torch.cat(idx), torch.tensor(kpos), torch.tensor(qpos)
    q = torch.randn(qo[-1], hq, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    ref_o, ref_lse = paged_attention_ref(
        q.float(), k_cache.float(), v_cache.float(), qo, kvp, idx, qpos, kpos, scale
    )
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    o, lse = paged_prefill_attention(
        dev(q), dev(k_cache), dev(v_cache), qo, dev(torch.tensor(kvp, dtype=torch.int32)),
        dev(idx.to(torch.int32)), dev(qpos.to(torch.int32)), dev(kpos.to(torch.int32)), scale,
        block_m=16, block_n=16,
    )  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float().cpu(), ref_o, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=tol, atol=tol)


def test_triton_backend_engine_matches_transformers(moe_model, hf_oracle):
    from nanocp import Engine

    prompts = random_prompts([1, 9, 40], vocab=500, seed=4)
    expected = [hf_oracle(moe_model).greedy(p, 5) for p in prompts]
    with Engine(
        model_path=moe_model,
        attention_backend="triton",
        page_size=16,
        chunked_prefill_size=32,
        max_total_tokens=1024,
    ) as engine:
        got = [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=greedy_params(5))]
    assert got == expected


@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "kv-ranges"])
def test_graph_replay_metadata_equals_eager(sharded):
    """The decode metadata a CUDA-graph replay builds on the device (static buffers) lists the
    same KV slots and positions as the eager path, also for context-parallel requests whose
    home holds only some position ranges (held_ranges); the attention of both (BalancedDecode,
    planned from those lengths) equals the torch backend's."""
    from types import SimpleNamespace

    from nanocp.engine.forward_batch import ForwardBatch, ForwardMode
    from nanocp.kvcache.pool import ReqToTokenPool
    from nanocp.layers.attention.torch_backend import TorchAttnBackend
    from nanocp.layers.attention.triton_backend import TritonAttnBackend

    pool = ReqToTokenPool(4, 64, DEVICE)
    g = torch.Generator().manual_seed(3)
    pool.req_to_token[:4] = torch.randperm(4 * 64, generator=g).view(4, 64)
    seq_lens, rows = [40, 7, 25], [2, 0, 3]
    ranges = [[(0, 10), (30, 40)], [(0, 7)], [(20, 25)]] if sharded else None
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEVICE)  # noqa: E731
    batch = ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=3, input_ids=t([1, 2, 3]),
        positions=t([n - 1 for n in seq_lens]), out_cache_loc=t([0, 0, 0]), req_pool_indices=t(rows),
        seq_lens=t(seq_lens),
        logits_indices=t([0, 1, 2]), seq_lens_cpu=seq_lens, extend_seq_lens_cpu=[1, 1, 1],
        held_ranges=ranges,
    )  # fmt: skip
    hq, hkv, d = 4, 2, 16
    kv_pool = SimpleNamespace(
        k_buffer=[torch.randn(4 * 64, hkv, d, generator=g).to(DEVICE)],
        v_buffer=[torch.randn(4 * 64, hkv, d, generator=g).to(DEVICE)],
    )
    layer = SimpleNamespace(layer_id=0, scaling=d**-0.5)
    q = torch.randn(3, hq, d, generator=g).to(DEVICE)
    backend = TritonAttnBackend(
        device=torch.device(DEVICE), num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, kv_pool=kv_pool,
        req_to_token_pool=pool,
    )  # fmt: skip
    backend.init_forward_metadata(batch)
    o_ref, lse_ref = TorchAttnBackend.forward_with_lse(backend, q, None, None, layer, batch)
    backend.eager_balanced.block_n = 16  # chunks of 16 keys: rows this short are cut too
    backend.init_forward_metadata(batch)
    _, kv_indptr, kv_indices, kv_pos = backend.triton_meta
    assert backend.step_balanced is backend.eager_balanced and int(backend.eager_balanced.n_items) > 3
    o_eager, lse_eager = backend.forward_with_lse(q, None, None, layer, batch)
    backend.init_cuda_graph_state(8, 4 * 64)
    backend.balanced.block_n = 16
    backend.init_forward_metadata_replay(batch)
    assert backend.step_balanced is backend.balanced and int(backend.balanced.n_items) > 3
    o_graph, lse_graph = backend.forward_with_lse(q, None, None, layer, batch)
    for o, lse in ((o_eager, lse_eager), (o_graph, lse_graph)):
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
    _, g_indptr, g_indices, g_pos = backend.triton_meta
    total = int(kv_indptr[-1])
    assert g_indptr.tolist() == kv_indptr.tolist()
    assert g_indices[:total].tolist() == kv_indices.tolist()
    assert g_pos[:total].tolist() == kv_pos.tolist()
    if sharded:
        assert total == 20 + 7 + 5


@settings(max_examples=200, deadline=None)
@given(
    lens=st.lists(st.integers(0, 5000), min_size=1, max_size=40),
    kv_heads=st.sampled_from([1, 4, 8]),
    target=st.integers(1, 600),
)
def test_balanced_plan_covers_every_key_once_within_its_bound(lens, kv_heads, target):
    """Each row's items tile its key range in order, in whole blocks but the last, and the item
    count stays within the bound the scratch is sized by (target / kv_heads + rows)."""
    from nanocp_kernels.balanced_attention import plan_items

    block_n = 64
    kv_indptr = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0) + 7  # keys from slot 7 on
    starts = kv_indptr[:-1]
    row, lo, hi, base, per_row = plan_items(kv_indptr, kv_heads, target, block_n)
    assert row.numel() <= target // kv_heads + len(lens)
    for r, n in enumerate(lens):
        b, c = int(base[r]), int(per_row[r])
        assert (row[b : b + c] == r).all()
        edges = [int(starts[r])] + hi[b : b + c].tolist()
        assert lo[b : b + c].tolist() == edges[:-1] and edges[-1] == int(starts[r]) + n
        sizes = (hi[b : b + c] - lo[b : b + c]).tolist()
        assert all(size % block_n == 0 for size in sizes[:-1])


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_balanced_decode_matches_reference_across_plans(dtype):
    """BalancedDecode vs the torch reference: mostly empty rows, one long row cut into many items,
    keys hidden by position; then a second plan on the same buffers (a later graph replay) with
    fewer items, so stale items of the first must not leak into it."""
    from nanocp_kernels.balanced_attention import BalancedDecode

    g = torch.Generator().manual_seed(3)
    hq, hkv, d, rows = 8, 2, 32, 12
    num_slots = 2000
    k_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    bd = BalancedDecode(rows, hq, hkv, d, torch.device(DEVICE))
    for lens in ([0, 0, 900, 0, 1, 0, 0, 70, 0, 0, 0, 130], [0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0]):
        kv_indptr = [0, *torch.tensor(lens).cumsum(0).tolist()]
        idx = torch.randperm(num_slots, generator=g)[: sum(lens)]
        kpos = torch.cat([torch.arange(n) for n in lens])
        qpos = torch.tensor([max(n - 3, 0) for n in lens])  # the last two keys of a row are hidden
        q = torch.randn(rows, hq, d, generator=g).to(dtype)
        scale = d**-0.5
        ref_o, ref_lse = paged_attention_ref(
            q.float(), k_cache.float(), v_cache.float(), list(range(rows + 1)), kv_indptr,
            idx, qpos, kpos, scale,
        )  # fmt: skip
        bd.plan(kv_indptr)
        n_items = int(bd.n_items)
        if lens[2]:  # first plan: the 900-key row is cut
            assert n_items > sum(1 for n in lens if n)
            first = n_items
        else:
            assert n_items < first
        dev = lambda x: x.to(DEVICE)  # noqa: E731
        i32 = [x.to(DEVICE, torch.int32) for x in (qpos, idx, kpos)]
        o, lse = bd.run(dev(q), dev(k_cache), dev(v_cache), *i32, scale)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(o.float().cpu(), ref_o, rtol=tol, atol=tol)
        torch.testing.assert_close(lse.cpu(), ref_lse, rtol=tol, atol=tol)
