"""Fused Triton RMSNorm / RoPE / SiLU-and-mul (the CUDA path of the layers) against the torch
paths HF parity is proven on: CPU through the Triton interpreter (fp32), GPU in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

pytest.importorskip(
    "triton", reason="Triton kernels (skipped on a torch without triton)", exc_type=ImportError
)

from nanocp.layers.layernorm import RMSNorm  # noqa: E402
from nanocp.layers.rotary import RotaryEmbedding  # noqa: E402
from nanocp_kernels.elementwise import (  # noqa: E402
    fused_add_rmsnorm,
    qk_norm_rope,
    rmsnorm,
    rope_inplace,
    silu_and_mul,
    topk_softmax,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (3, 4, 128), (0, 64)])
def test_rmsnorm_matches_torch_path(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    norm = RMSNorm(shape[-1], eps=1e-6).to(DEVICE, dtype)
    norm.weight.data = torch.randn(shape[-1], generator=g).to(DEVICE, dtype)
    h = x.float()
    ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    torch.testing.assert_close(rmsnorm(x, norm.weight, 1e-6), ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "scaling", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}]
)
def test_rope_matches_torch_path(dtype, scaling):
    extra = {"rope_scaling": {**scaling, "rope_theta": 10000.0}} if scaling else {}
    cfg = AutoConfig.for_model("qwen3", head_dim=64, rope_theta=10000.0, max_position_embeddings=512, **extra)
    rope = RotaryEmbedding(cfg, 64).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 4, 64, generator=g).to(DEVICE, dtype)
    k = torch.randn(7, 2, 64, generator=g).to(DEVICE, dtype)
    pos = torch.tensor([0, 1, 5, 63, 64, 300, 511], device=DEVICE)
    # the torch path (what runs on CPU), written out: HF's rotate-half formula
    freqs = pos[:, None].float() * rope.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos = (emb.cos() * rope.attention_scaling)[:, None, :]
    sin = (emb.sin() * rope.attention_scaling)[:, None, :]

    def rot(x):
        x = x.float()
        return (x * cos + torch.cat((-x[..., 32:], x[..., :32]), -1) * sin).to(dtype)

    cache = rope._cache(torch.device(DEVICE))
    qq, kk = q.clone(), k.clone()
    rope_inplace(qq, pos, cache)
    rope_inplace(kk, pos, cache)
    torch.testing.assert_close(qq, rot(q), **tol(dtype))
    torch.testing.assert_close(kk, rot(k), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2 * 1500, generator=g).to(DEVICE, dtype)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :1500]) * x[:, 1500:], **tol(dtype))


@pytest.mark.parametrize("e, k, renorm", [(16, 4, True), (128, 8, True), (60, 2, False), (7, 1, True)])
def test_topk_softmax_matches_select_experts(e, k, renorm):
    g = torch.Generator().manual_seed(e + k)
    logits = (2 * torch.randn(9, e, generator=g)).to(DEVICE)
    probs = torch.softmax(logits.float(), -1)
    want_w, want_ids = probs.topk(k, dim=-1)
    if renorm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    w, ids = topk_softmax(logits, k, renorm)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    w16, _ = topk_softmax(logits, k, renorm, out_dtype=torch.bfloat16)  # rounded once, from float32
    assert w16.dtype == torch.bfloat16  # (the CPU interpreter truncates where the GPU rounds)
    torch.testing.assert_close(w16, want_w.to(torch.bfloat16), rtol=2**-7, atol=0)


def _norm_ref(x, w, eps=1e-6):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [5, 0])
def test_fused_add_rmsnorm_matches_torch_path(dtype, rows):
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(rows, 96, generator=g)).to(DEVICE, dtype)
    r = torch.randn(rows, 96, generator=g).to(DEVICE, dtype)
    w = torch.randn(96, generator=g).to(DEVICE, dtype)
    out, res = fused_add_rmsnorm(x, r, w, 1e-6)
    torch.testing.assert_close(res, x + r, rtol=0, atol=0)  # the residual add in the input dtype
    torch.testing.assert_close(out, _norm_ref(x + r, w), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_matches_torch_path(dtype):
    """Strided q / k views of a fused QKV row, as Qwen3Attention passes them."""
    cfg = AutoConfig.for_model("qwen3", head_dim=64, rope_theta=10000.0, max_position_embeddings=512)
    rope = RotaryEmbedding(cfg, 64).to(DEVICE)
    g = torch.Generator().manual_seed(4)
    t, hq, hkv, d = 7, 4, 2, 64
    qkv = (2 * torch.randn(t, (hq + 2 * hkv) * d, generator=g)).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    qw, kw = (torch.randn(d, generator=g).to(DEVICE, dtype) for _ in range(2))
    pos = torch.tensor([0, 1, 5, 63, 64, 300, 511], device=DEVICE)
    freqs = pos[:, None].float() * rope.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

    def ref(x, w):
        y = _norm_ref(x, w).float()
        return (y * cos + torch.cat((-y[..., 32:], y[..., :32]), -1) * sin).to(dtype)

    qo, ko = qk_norm_rope(q, k, qw, kw, 1e-6, pos, rope._cache(torch.device(DEVICE)))
    torch.testing.assert_close(qo, ref(q, qw), **tol(dtype))
    torch.testing.assert_close(ko, ref(k, kw), **tol(dtype))

    # with the KV store in the same launch: the cache holds exactly what store_kv(ko, v) writes
    from nanocp_kernels.elementwise import store_kv

    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    loc = torch.tensor([3, -1, 0, 11, -1, 7, 2], device=DEVICE)
    bufs = [torch.zeros(20, hkv, d, dtype=dtype, device=DEVICE) for _ in range(4)]
    qo2, ko2 = qk_norm_rope(
        q, k, qw, kw, 1e-6, pos, rope._cache(torch.device(DEVICE)), (v, loc, *bufs[:2], 19)
    )
    store_kv(ko, v, loc, bufs[2], bufs[3], 19)
    assert torch.equal(qo2, qo) and torch.equal(ko2, ko)
    # the pad slot takes several rows in any order: compared only as written
    assert torch.equal(bufs[0][:19], bufs[2][:19]) and torch.equal(bufs[1][:19], bufs[3][:19])
    assert bufs[0][19].abs().sum() > 0 and bufs[1][3].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_index_put(dtype):
    """One-launch K/V store (strided v view as from the fused QKV row); loc < 0 -> the pad slot."""
    from nanocp_kernels.elementwise import store_kv

    g = torch.Generator().manual_seed(5)
    t, h, d, slots, pad = 6, 2, 32, 20, 19
    qkv = torch.randn(t, 3 * h * d, generator=g).to(DEVICE, dtype)
    k = torch.randn(t, h, d, generator=g).to(DEVICE, dtype)
    v = qkv[:, 2 * h * d :].view(t, h, d)
    loc = torch.tensor([3, -1, 0, 11, -1, 7], device=DEVICE)
    kb, vb = (
        torch.zeros(slots, h, d, dtype=dtype, device=DEVICE),
        torch.zeros(slots, h, d, dtype=dtype, device=DEVICE),
    )
    store_kv(k, v, loc, kb, vb, pad)
    keep = loc >= 0
    want_k, want_v = torch.zeros_like(kb), torch.zeros_like(vb)
    want_k[loc[keep]], want_v[loc[keep]] = k[keep], v[keep]
    torch.testing.assert_close(kb[:pad], want_k[:pad], rtol=0, atol=0)
    torch.testing.assert_close(vb[:pad], want_v[:pad], rtol=0, atol=0)
    assert kb[pad].abs().sum() > 0  # the masked rows landed in the pad slot
