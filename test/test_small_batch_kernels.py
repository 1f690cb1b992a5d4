"""Decode-batch kernels (GEMV projections, two-launch MoE) against torch: on CPU through the
Triton interpreter in fp32, on GPU in bf16 with the Qwen3-30B-A3B shapes and inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip(
    "triton", reason="Triton kernels (skipped on a torch without triton)", exc_type=ImportError
)

from nanocp.layers.moe import select_experts  # noqa: E402
from nanocp_kernels.gemv import gemv, router_topk  # noqa: E402
from nanocp_kernels.reference import fused_moe_ref  # noqa: E402
from nanocp_kernels.small_moe import small_fused_moe  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton interpreter (conftest)


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k, bias", [(40, 24, False), (13, 300, True), (64, 2100, False)])
def test_gemv_matches_linear_fp32(m, n, k, bias):
    """Row counts that are not powers of 2 (padded rows neither read nor written), row lengths
    that are not multiples of the K block, and more than one K block."""
    x, w = _rand(m, k, seed=1), _rand(n, k, seed=2)
    b = _rand(n, seed=3) if bias else None
    torch.testing.assert_close(gemv(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)  # fp32 sum order


def test_gemv_strided_rows_and_too_many_rows():
    x = _rand(3, 50, seed=4)[:, :40]  # row stride 50
    w = _rand(16, 40, seed=5)
    torch.testing.assert_close(gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most 4 rows"):
        gemv(_rand(5, 40), w)


def _add_norm_ref(x, residual, weight, eps):
    """(rmsnorm(x + residual), x + residual) by the model's RMSNorm (torch path on CPU)."""
    from nanocp.layers.layernorm import RMSNorm

    norm = RMSNorm(x.shape[1], eps).to(x.device, x.dtype)
    norm.weight.data.copy_(weight)
    s = x if residual is None else x + residual
    return norm(s), s


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gemv_and_router_with_the_add_rmsnorm_before_them_fp32(m, with_residual):
    """norm=: the projection of rmsnorm(x + residual) and the residual stream, in one launch."""
    k = 300
    x, r = _rand(m, k, seed=21), _rand(m, k, seed=22) if with_residual else None
    nw, w, gate = _rand(k, seed=23), _rand(40, k, seed=24), _rand(16, k, seed=25)
    h, s = _add_norm_ref(x, r, nw, 1e-6)
    y, s_got = gemv(x, w, None, norm=(r, nw, 1e-6))
    torch.testing.assert_close(y, F.linear(h, w), rtol=1e-4, atol=1e-4)
    assert torch.equal(s_got, s)
    want_w, want_ids = select_experts(F.linear(h, gate), 4, True, x.dtype)
    wts, ids, h_got, s_got = router_topk(x, gate, 4, True, norm=(r, nw, 1e-6))
    assert torch.equal(ids, want_ids) and torch.equal(s_got, s)
    torch.testing.assert_close(h_got, h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wts, want_w, rtol=1e-5, atol=1e-5)


def _moe_case(t, e_global, e_local, h, inter, k, dtype=torch.float32, device=DEVICE, seed=0):
    x = _rand(t, h, seed=seed, dtype=dtype, device=device)
    w13 = _rand(e_local, 2 * inter, h, seed=seed + 1, scale=h**-0.5, dtype=dtype, device=device)
    w2 = _rand(e_local, h, inter, seed=seed + 2, scale=inter**-0.5, dtype=dtype, device=device)
    logits = _rand(t, e_global, seed=seed + 3, dtype=dtype, device=device)
    return x, w13, w2, logits


@pytest.mark.parametrize("m, e, k, renorm", [(1, 8, 2, True), (3, 40, 4, False), (4, 128, 8, True)])
def test_router_topk_matches_select_experts_fp32(m, e, k, renorm):
    """The gate projection and the top-k of the last program to finish, twice in a row (the
    ticket counter is left at 0 for the next launch)."""
    x, gate = _rand(m, 300, seed=11), _rand(e, 300, seed=12)
    want_w, want_ids = select_experts(F.linear(x, gate), k, renorm, x.dtype)
    for _ in range(2):
        w, ids = router_topk(x, gate, k, renorm)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, k, offset", [(1, 2, 0), (3, 4, 4), (1, 8, 0)])
def test_small_moe_matches_reference_fp32(t, k, offset):
    """With an expert offset too (the second of two EP ranks: the other rank's experts give 0)."""
    e_local = 8 if offset == 0 else 4
    x, w13, w2, logits = _moe_case(t, 8, e_local, 40, 24, k)
    w, ids = select_experts(logits, k, True, x.dtype)
    got = small_fused_moe(x, w13, w2, w, ids, offset)
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, w, ids, offset), rtol=1e-5, atol=1e-5)
    if offset:
        assert (ids - offset < 0).any(), "the case must route some pairs to the other rank"


@gpu
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n, k", [(5120, 2048), (2048, 4096), (128, 2048)])  # qkv, o, router
def test_gemv_qwen3_30b_shapes_bf16(m, n, k):
    x, w = _rand(m, k, seed=6, dtype=torch.bfloat16), _rand(n, k, seed=7, scale=k**-0.5, dtype=torch.bfloat16)
    torch.testing.assert_close(gemv(x, w).float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.parametrize("t", [1, 2, 4])
def test_router_topk_and_small_moe_qwen3_30b_shape_bf16(t):
    x, w13, w2, _ = _moe_case(t, 128, 128, 2048, 768, 8, torch.bfloat16, "cuda")
    gate = _rand(128, 2048, seed=9, scale=2048**-0.5, dtype=torch.bfloat16, device="cuda")
    w, ids = router_topk(x, gate, 8, True)
    want_w, want_ids = select_experts(F.linear(x, gate), 8, True, x.dtype)
    assert (ids == want_ids).float().mean() > 0.95  # bf16 logits may round differently near ties
    torch.testing.assert_close(
        w[ids == want_ids].float(), want_w[ids == want_ids].float(), rtol=2e-2, atol=2e-2
    )
    ref = fused_moe_ref(x.float(), w13.float(), w2.float(), w.float(), ids)
    out = small_fused_moe(x, w13, w2, w, ids)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@gpu
def test_small_kernels_captured_in_a_cuda_graph_equal_eager():
    x, w13, w2, logits = _moe_case(2, 128, 128, 2048, 768, 8, torch.bfloat16, "cuda")
    gate = _rand(128, 2048, seed=9, scale=2048**-0.5, dtype=torch.bfloat16, device="cuda")

    def step():
        return small_fused_moe(x, w13, w2, *router_topk(x, gate, 8, True))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(_moe_case(2, 128, 128, 2048, 768, 8, torch.bfloat16, "cuda", seed=5)[0])
    graph.replay()
    torch.testing.assert_close(out, step())


@gpu
@pytest.mark.parametrize("m", [1, 2])
def test_fused_norm_prologue_bf16_is_bitwise_the_separate_kernels(m):
    """In bf16 the norm inside the GEMV / router launch rounds exactly as fused_add_rmsnorm, and
    the projection sums in the same order: the fused launches equal the two-launch chain bit for bit."""
    from nanocp_kernels.elementwise import fused_add_rmsnorm, rmsnorm

    x, r = (
        _rand(m, 2048, seed=31, dtype=torch.bfloat16, device="cuda"),
        _rand(m, 2048, seed=32, dtype=torch.bfloat16, device="cuda"),
    )
    nw = _rand(2048, seed=33, dtype=torch.bfloat16, device="cuda")
    w = _rand(5120, 2048, seed=34, scale=2048**-0.5, dtype=torch.bfloat16, device="cuda")
    gate = _rand(128, 2048, seed=35, scale=2048**-0.5, dtype=torch.bfloat16, device="cuda")
    h, s = fused_add_rmsnorm(x, r, nw, 1e-6)
    y, s_got = gemv(x, w, None, norm=(r, nw, 1e-6))
    assert torch.equal(s_got, s) and torch.equal(y, gemv(h, w))
    y0, s0 = gemv(x, w, None, norm=(None, nw, 1e-6))  # the first layer: no residual yet
    assert torch.equal(s0, x) and torch.equal(y0, gemv(rmsnorm(x, nw, 1e-6), w))
    if m == 1:
        wts, ids, h_got, s_got = router_topk(x, gate, 8, True, norm=(r, nw, 1e-6))
        want_w, want_ids = router_topk(h, gate, 8, True)
        assert torch.equal(h_got, h) and torch.equal(s_got, s)
        assert torch.equal(ids, want_ids) and torch.equal(wts, want_w)
