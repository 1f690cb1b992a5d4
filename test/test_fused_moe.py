"""Triton fused MoE (grouped GEMM over expert-sorted pairs) against the torch reference: on CPU
through the Triton interpreter (fp32), on GPU in bf16 with the Qwen3-30B-A3B expert shape."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "triton", reason="Triton kernels (skipped on a torch without triton)", exc_type=ImportError
)

from nanocp_kernels.fused_moe import fused_moe, moe_align, moe_sum  # noqa: E402
from nanocp_kernels.reference import expert_ffn_ref, fused_moe_ref, moe_align_ref  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton interpreter (conftest)


def _case(t, e_global, e_local, h, inter, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    w13 = (torch.randn(e_local, 2 * inter, h, generator=g) / h**0.5).to(device, dtype)
    w2 = (torch.randn(e_local, h, inter, generator=g) / inter**0.5).to(device, dtype)
    logits = torch.randn(t, e_global, generator=g)
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return x, w13, w2, w.to(device, dtype), ids.to(device)


@pytest.fixture(params=["one_launch", "three_launches"])
def align_path(request, monkeypatch):
    """moe_align's single-program path (decode sizes) and its multi-program path."""
    import nanocp_kernels.fused_moe as fm

    if request.param == "three_launches":
        monkeypatch.setattr(fm, "SMALL_ALIGN", 0)
    return request.param


@pytest.mark.parametrize("align", [moe_align_ref, moe_align])
@pytest.mark.parametrize("num_experts, block_m", [(4, 16), (16, 16), (3, 32), (128, 16)])
def test_moe_align_groups_every_local_pair_once(num_experts, block_m, align, align_path):
    g = torch.Generator().manual_seed(num_experts)
    ids = torch.randint(-2, num_experts + 2, (37, 3), generator=g).to(DEVICE)  # some not local
    sorted_ids, block_expert = align(ids, num_experts, block_m)
    flat = ids.reshape(-1)
    n = flat.numel()
    assert sorted_ids.numel() % block_m == 0 and block_expert.numel() == sorted_ids.numel() // block_m
    real = sorted_ids[sorted_ids < n]
    local = torch.nonzero((flat >= 0) & (flat < num_experts)).flatten()
    assert sorted(real.tolist()) == local.tolist()
    assert sorted_ids.numel() == moe_align_ref(ids, num_experts, block_m)[0].numel()
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        rows = rows[rows < n]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows] == e).all()


@pytest.mark.parametrize("t, k, offset", [(1, 2, 0), (7, 2, 4), (33, 3, 0)])
def test_fused_moe_matches_reference_fp32(t, k, offset):
    # 8 experts in all, 4 local (expert_offset 4 = the second EP rank); sizes not multiples of the blocks
    e_local = 8 if offset == 0 else 4
    x, w13, w2, w, ids = _case(t, 8, e_local, 40, 24, k, torch.float32, DEVICE)
    out = fused_moe(x, w13, w2, w, ids, offset, all_local=offset == 0)
    ref = fused_moe_ref(x, w13, w2, w, ids, offset)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_expert_rows_match_reference_fp32():
    x, w13, w2, _, _ = _case(19, 4, 4, 40, 24, 1, torch.float32, DEVICE)
    rows = torch.tensor([0, 3, -1, 2, 2, 1, -1, 0, 3, 3, 1, 0, 2, -1, 1, 1, 0, 3, 2], device=DEVICE)
    out = fused_moe(x, w13, w2, None, rows[:, None])
    torch.testing.assert_close(out, expert_ffn_ref(x, w13, w2, rows), rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("t", [1, 16, 256, 1000])
def test_fused_moe_qwen3_30b_shape_bf16(t):
    x, w13, w2, w, ids = _case(t, 128, 128, 2048, 768, 8, torch.bfloat16, "cuda")
    out = fused_moe(x, w13, w2, w, ids)
    ref = fused_moe_ref(x.float(), w13.float(), w2.float(), w.float(), ids)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@gpu
def test_fused_moe_captured_in_a_cuda_graph_equals_eager():
    x, w13, w2, w, ids = _case(8, 128, 128, 2048, 768, 8, torch.bfloat16, "cuda")
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_moe(x, w13, w2, w, ids)  # warm up (Triton compiles outside the capture)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, w, ids)
    x2, _, _, w_2, ids2 = _case(8, 128, 128, 2048, 768, 8, torch.bfloat16, "cuda", seed=1)
    x.copy_(x2), w.copy_(w_2), ids.copy_(ids2)
    graph.replay()
    torch.testing.assert_close(out, fused_moe(x, w13, w2, w, ids))


def test_expert_rows_strided_input_into_out():
    """Rows read in place from a receive block (row stride > hidden) and written into `out`, as
    the IPC MoE backend does; rows with id -1 come out 0 whatever `out` held."""
    x, w13, w2, _, _ = _case(11, 4, 4, 40, 24, 1, torch.float32, DEVICE)
    block = torch.randn(11, 40 + 3, device=DEVICE)
    block[:, :40] = x
    rows = torch.tensor([0, 3, -1, 2, 2, 1, -1, 0, 3, 3, 1], device=DEVICE)
    out = torch.full((11, 40), float("nan"), device=DEVICE)
    got = fused_moe(block[:, :40], w13, w2, None, rows[:, None], out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expert_ffn_ref(x, w13, w2, rows), rtol=1e-5, atol=1e-5)


def test_moe_align_offset_and_repeated_calls_match_reference(align_path):
    """The local expert is id - offset (no separate subtraction launch), and the per-expert
    counters left zeroed by each call give the same grouping on the next call."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 16, (29, 4), generator=g).to(DEVICE)
    want_sorted, want_blocks = moe_align_ref(ids - 8, 8, 16)
    for _ in range(3):
        got_sorted, got_blocks = moe_align(ids, 8, 16, offset=8)
        assert torch.equal(got_blocks, want_blocks)
        for b in range(got_blocks.numel()):  # same pairs per block (order within a run may differ)
            rows = slice(b * 16, (b + 1) * 16)
            assert sorted(got_sorted[rows].tolist()) == sorted(want_sorted[rows].tolist())


def test_expert_rows_of_a_fixed_capacity_buffer():
    """As the fixed-capacity EP backends call it: most rows unused (id -1), the grid sized by
    max_rows, unused rows left untouched (fill_unrouted=False), used rows exact."""
    x, w13, w2, _, _ = _case(64, 4, 4, 40, 24, 1, torch.float32, DEVICE)
    rows = torch.full((64,), -1, device=DEVICE)
    used = torch.tensor([0, 5, 6, 17, 40, 63], device=DEVICE)
    rows[used] = torch.tensor([2, 0, 2, 3, 1, 2], device=DEVICE)
    out = torch.full((64, 40), float("nan"), device=DEVICE)
    fused_moe(x, w13, w2, None, rows[:, None], out=out, max_rows=used.numel(), fill_unrouted=False)
    ref = expert_ffn_ref(x, w13, w2, rows)
    torch.testing.assert_close(out[used], ref[used], rtol=1e-5, atol=1e-5)
    unused = torch.ones(64, dtype=torch.bool, device=DEVICE)
    unused[used] = False
    assert out[unused].isnan().all()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_moe_sum_matches_torch(k):
    y = torch.randn(5, k, 300, device=DEVICE)
    torch.testing.assert_close(moe_sum(y), y.sum(dim=1), rtol=1e-6, atol=1e-5)
