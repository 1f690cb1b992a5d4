"""Small fused Triton kernels of the decoder layer: RMSNorm (alone or fused with the residual
add), Qwen3's per-head q/k norm fused with the rotary embedding, RoPE, SiLU-and-mul, router top-k.

Each replaces a chain of torch ops (one kernel launch per op) with one launch; on GPU decode
those launches, not the bytes, dominate a layer. Semantics follow HF Qwen3 (see the torch paths
in nanocp.layers): RMSNorm normalizes in float32, casts to the input dtype, then scales; RoPE
rotates the two halves of each head (neox style) with cos/sin from a float32 cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp_kernels.launch import pdl_args, pdl_wait


@triton.jit
def rms_inv(s, D, eps):
    """1 / RMS of a row (float32; padding lanes must be 0)."""
    h = s.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)


@triton.jit
def rms_scale(s, inv, w, dtype: tl.constexpr):
    """weight * (s * inv) as HF's RMSNorm: normalized in float32, cast to dtype, scaled in dtype.
    Every fused RMSNorm (here and in the GEMV prologue) goes through it, so all agree bit for bit."""
    return w.to(dtype) * (s.to(tl.float32) * inv).to(dtype)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, w_ptr, o_ptr, D, stride_x, stride_o, eps, BLOCK_D: tl.constexpr, PDL: tl.constexpr
):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(
        o_ptr + row * stride_o + offs, rms_scale(x, rms_inv(x, D, eps), w, o_ptr.dtype.element_ty), mask=mask
    )


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Over the last dim of x (any leading shape)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        d = shape[-1]
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, weight, out, d, x2.stride(0), out.stride(0), eps, BLOCK_D=triton.next_power_of_2(d),
            **pdl_args(x2),
        )  # fmt: skip
    return out.view(shape)


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, ro_ptr, D, stride_x, stride_r, stride_o, stride_ro, eps,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
    s = x + r  # in the input dtype, as HF's residual add
    tl.store(ro_ptr + row * stride_ro + offs, s, mask=mask)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(
        o_ptr + row * stride_o + offs, rms_scale(s, rms_inv(s, D, eps), w, o_ptr.dtype.element_ty), mask=mask
    )


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in one launch; x, residual: [T, D]."""
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        d = x2.shape[1]
        _add_rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res, d, x2.stride(0), r2.stride(0), out.stride(0), res.stride(0), eps,
            BLOCK_D=triton.next_power_of_2(d), **pdl_args(x2),
        )  # fmt: skip
    return out.view(x.shape), res.view(x.shape)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr, HQ, HKV, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh, loc_ptr, kb_ptr, vb_ptr,
    pad_slot, HALF: tl.constexpr, STORE: tl.constexpr, RELEASE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (token, head) of q then k (then v with STORE): per-head RMSNorm (float32,
    cast, scaled in the input dtype, as HF's q_norm / k_norm), then neox RoPE from the float32
    cos|sin cache. STORE: the new k and v also go to their KV-cache slot (as store_kv: loc < 0
    writes to pad_slot), which saves the store launch. RELEASE: the successor may launch before
    this kernel ends (see QK_RELEASE_EARLY)."""
    pdl_wait(PDL, RELEASE)
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF)
    if STORE:
        slot = tl.load(loc_ptr + t)
        slot = tl.where(slot >= 0, slot, pad_slot).to(tl.int64)
        if h >= HQ + HKV:  # v: a copy into the cache
            hv = h - HQ - HKV
            d = tl.arange(0, 2 * HALF)
            v = tl.load(v_ptr + t * stride_vt + hv * stride_vh + d)
            tl.store(vb_ptr + (slot * HKV + hv) * 2 * HALF + d, v.to(vb_ptr.dtype.element_ty))
            return
    if h < HQ:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = qo_ptr + (t * HQ + h) * 2 * HALF
        w_ptr = qw_ptr
    else:
        hk = h - HQ
        src = k_ptr + t * stride_kt + hk * stride_kh
        dst = ko_ptr + (t * HKV + hk) * 2 * HALF
        w_ptr = kw_ptr
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + HALF + offs).to(tl.float32)
    inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
    dt = qo_ptr.dtype.element_ty
    y1 = rms_scale(x1, inv, tl.load(w_ptr + offs), dt).to(tl.float32)
    y2 = rms_scale(x2, inv, tl.load(w_ptr + HALF + offs), dt).to(tl.float32)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cache_ptr + pos * 2 * HALF + offs)
    sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + offs)
    o1 = (y1 * cos - y2 * sin).to(dt)
    o2 = (y2 * cos + y1 * sin).to(dt)
    tl.store(dst + offs, o1)
    tl.store(dst + HALF + offs, o2)
    if STORE:
        if h >= HQ:
            kdst = kb_ptr + (slot * HKV + h - HQ) * 2 * HALF
            tl.store(kdst + offs, o1.to(kb_ptr.dtype.element_ty))
            tl.store(kdst + HALF + offs, o2.to(kb_ptr.dtype.element_ty))


# Whether qk_norm_rope lets its successor, the attention, launch early (PDL). Off: the attention
# is one wave of ~512 programs that, at long contexts, streams the KV for 0.1 ms; launched early,
# its programs are placed while qk_norm_rope's still hold SMs, so some SMs get more of them and
# the wave ends later (H200, batch 4 x 128k: 9% slower per step, batch 8 x 32k 6%). Batch 1 at
# 1k loses 0.7% by waiting (benchmark/results/decode_variants_release_h200).
QK_RELEASE_EARLY = False

# (v [T, Hkv, D], loc [T], k_buffer, v_buffer [slots, Hkv, D], pad_slot): where qk_norm_rope also
# stores the new tokens' K/V (KVCachePool.set_kv's arguments)
KVStore = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_store: KVStore | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's q_norm / k_norm then RoPE of q [T, Hq, D] and k [T, Hkv, D] (strided views of the
    fused QKV output are fine; the last dim must be contiguous) in one launch; new q, k.
    kv_store: the new k and v are also written to the KV cache (as store_kv) in that launch."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qo = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((t, hkv, d), dtype=k.dtype, device=k.device)
    if t:
        if q.stride(-1) != 1 or k.stride(-1) != 1 or d & (d - 1):
            raise ValueError("qk_norm_rope: head dim must be contiguous and a power of two")
        v, loc, kb, vb, pad = kv_store if kv_store is not None else (k, positions, k, k, 0)
        if v.stride(-1) != 1:
            raise ValueError("qk_norm_rope: v's head dim must be contiguous")
        _qk_norm_rope_kernel[(t, hq + hkv * (2 if kv_store is not None else 1))](
            q, k, q_weight, k_weight, qo, ko, positions, cos_sin_cache, hq, hkv, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), loc, kb, vb, pad,
            HALF=d // 2, STORE=kv_store is not None, RELEASE=QK_RELEASE_EARLY, **pdl_args(q),
        )  # fmt: skip
    return qo, ko


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cache_ptr, H, stride_t, stride_h, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    offs = tl.arange(0, HALF)
    cos = tl.load(cache_ptr + pos * 2 * HALF + offs)
    sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + offs)
    heads = tl.arange(0, BLOCK_H)
    hmask = heads[:, None] < H
    base = x_ptr + t * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(base, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=hmask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(base, o1.to(x_ptr.dtype.element_ty), mask=hmask)
    tl.store(base + HALF, o2.to(x_ptr.dtype.element_ty), mask=hmask)


def rope_inplace(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """x: [T, H, D] (rotated in place); cos_sin_cache: [max_pos, D] float32 = cos | sin halves."""
    t, h, d = x.shape
    if t:
        _rope_kernel[(t,)](
            x,
            positions,
            cos_sin_cache,
            h,
            x.stride(0),
            x.stride(1),
            HALF=d // 2,
            BLOCK_H=triton.next_power_of_2(h),
        )


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, loc_ptr, kb_ptr, vb_ptr, N, stride_k, stride_v, pad_slot,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    slot = tl.load(loc_ptr + t)
    slot = tl.where(slot >= 0, slot, pad_slot).to(tl.int64)
    k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
    tl.store(kb_ptr + slot * N + offs, k.to(kb_ptr.dtype.element_ty), mask=mask)
    tl.store(vb_ptr + slot * N + offs, v.to(vb_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    loc: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    pad_slot: int,
) -> None:
    """k_buffer[loc[t]] = k[t] and v_buffer[loc[t]] = v[t] in one launch; loc < 0 (positions
    held by another instance) writes to pad_slot. k, v: [T, H, D] with contiguous rows of H * D."""
    t = k.shape[0]
    n = k_buffer.shape[1] * k_buffer.shape[2]
    k2, v2 = k.reshape(t, n), v.reshape(t, n)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _store_kv_kernel[(t, triton.cdiv(n, block))](
            k2, v2, loc, k_buffer, v_buffer, n, k2.stride(0), v2.stride(0), pad_slot, BLOCK=block,
            **pdl_args(k2),
        )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(x_ptr, o_ptr, N, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + row * stride_o + offs, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :N]) * x[..., N:] for x [..., 2N]."""
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            x2, out, n, x2.stride(0), out.stride(0), BLOCK=block, **pdl_args(x2)
        )
    return out.view(*x.shape[:-1], n)


@triton.jit
def softmax_topk(
    row_ptr, E, K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, CACHE: tl.constexpr
):
    """One router row: softmax over its E logits in float32, the top K (lowest index among ties),
    optionally renormalised. Returns (weights [K] float32, ids [K] int64). BLOCK_E >= 32.
    CACHE: the logits' load cache modifier ("", or ".cg" where other programs just wrote them).
    Each logit's rank (how many come before it) is counted against all others at once, so the
    top-k costs a few reductions, not K rounds of arg-max (each a CTA-wide reduction)."""
    offs = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, K)
    x = tl.load(row_ptr + offs, mask=offs < E, other=float("-inf"), cache_modifier=CACHE).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    rank = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for j0 in tl.static_range(0, BLOCK_E, 32):  # softmax keeps the order: compare logits
        offs_j = j0 + tl.arange(0, 32)
        xj = tl.load(row_ptr + offs_j, mask=offs_j < E, other=float("-inf"), cache_modifier=CACHE)
        xj = xj.to(tl.float32)[None, :]
        ahead = (xj > x[:, None]) | ((xj == x[:, None]) & (offs_j[None, :] < offs[:, None]))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    pick = rank[None, :] == ks[:, None]  # [K, BLOCK_E]: the logit of rank k
    w = tl.sum(tl.where(pick, p[None, :], 0.0), axis=1)
    ids = tl.sum(tl.where(pick, offs[None, :], 0), axis=1).to(tl.int64)
    if RENORM:
        w = w / tl.sum(w, axis=0)
    return w, ids


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, E, stride_l, K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(PDL)
    row = tl.program_id(0)
    ks = tl.arange(0, K)
    w, ids = softmax_topk(logits_ptr + row * stride_l, E, K, RENORM, BLOCK_E, "")
    tl.store(w_ptr + row * K + ks, w.to(w_ptr.dtype.element_ty))  # float32 math, one rounding
    tl.store(ids_ptr + row * K + ks, ids)


def topk_softmax(
    logits: torch.Tensor, k: int, renormalize: bool, out_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: softmax over experts in float32, the top-k (weights [T, k] in out_dtype, ids int64)."""
    t, e = logits.shape
    w = torch.empty((t, k), dtype=out_dtype, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    if t:
        _topk_softmax_kernel[(t,)](
            logits, w, ids, e, logits.stride(0), K=k, RENORM=renormalize,
            BLOCK_E=max(32, triton.next_power_of_2(e)), **pdl_args(logits),
        )  # fmt: skip
    return w, ids
