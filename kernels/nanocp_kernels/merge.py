"""N-way merge of partial attention results by log-sum-exp (context-parallel attention).

Given partial outputs over disjoint key sets, v: [N, T, H, D] and their LSEs s: [N, T, H]:
    lse = log sum_i exp(s_i),  o = sum_i exp(s_i - lse) * v_i
Shards that saw no key have s_i = -inf and contribute nothing; if all do, o = 0, lse = -inf.
`base2=True` takes and returns log2-based LSEs (FlashInfer's convention).

Backends: "triton" (one program per (token, head); also runs on CPU under TRITON_INTERPRET=1),
"flashinfer" (merge_states, CUDA, base-2), "torch" (the reference in reference.py).
"""

from __future__ import annotations

import math

import torch

from nanocp_kernels import triton_runs_on
from nanocp_kernels.reference import merge_states_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _merge_states_kernel(
        v_ptr,
        s_ptr,
        o_ptr,
        lse_ptr,
        N,
        TH,
        D,
        BLOCK_D: tl.constexpr,
        BASE2: tl.constexpr,
    ):
        th = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        dmask = offs < D
        m = tl.load(s_ptr + th).to(tl.float32)
        for i in range(1, N):
            m = tl.maximum(m, tl.load(s_ptr + i * TH + th).to(tl.float32))
        finite = m > float("-inf")
        m_safe = tl.where(finite, m, 0.0)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        denom = 0.0
        for i in range(N):
            s = tl.load(s_ptr + i * TH + th).to(tl.float32)
            if BASE2:
                w = tl.exp2(s - m_safe)
            else:
                w = tl.exp(s - m_safe)
            w = tl.where(s > float("-inf"), w, 0.0)
            v = tl.load(v_ptr + (i * TH + th) * D + offs, mask=dmask, other=0.0).to(tl.float32)
            acc += w * v
            denom += w
        safe = tl.where(denom > 0, denom, 1.0)
        o = tl.where(denom > 0, acc / safe, 0.0)
        if BASE2:
            lse = m_safe + tl.log2(safe)
        else:
            lse = m_safe + tl.log(safe)
        lse = tl.where(denom > 0, lse, float("-inf"))
        tl.store(o_ptr + th * D + offs, o.to(o_ptr.dtype.element_ty), mask=dmask)
        tl.store(lse_ptr + th, lse)


def _merge_triton(v: torch.Tensor, s: torch.Tensor, base2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, t, h, d = v.shape
    v, s = v.contiguous(), s.contiguous().float()
    o = torch.empty((t, h, d), dtype=v.dtype, device=v.device)
    lse = torch.empty((t, h), dtype=torch.float32, device=v.device)
    if t * h:
        _merge_states_kernel[(t * h,)](
            v, s, o, lse, n, t * h, d, BLOCK_D=triton.next_power_of_2(d), BASE2=base2
        )
    return o, lse


def _merge_flashinfer(v: torch.Tensor, s: torch.Tensor, base2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import flashinfer

    s2 = s.float() if base2 else s.float() / math.log(2)  # FlashInfer works in base 2
    o, lse = flashinfer.merge_states(v.permute(1, 0, 2, 3).contiguous(), s2.permute(1, 0, 2).contiguous())
    return o, (lse if base2 else lse * math.log(2))


def _merge_torch(v: torch.Tensor, s: torch.Tensor, base2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = math.log(2) if base2 else 1.0
    o, lse = merge_states_ref(list(v), [x.float() * scale for x in s])
    return o, lse / scale


def default_backend(device: torch.device) -> str:
    if triton is not None and triton_runs_on(device):
        return "triton"
    return "torch"


def merge_states(
    v: torch.Tensor, s: torch.Tensor, base2: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """v: [N, T, H, D], s: [N, T, H] -> (o [T, H, D] in v's dtype, lse [T, H] float32)."""
    if v.dim() != 4 or s.shape != v.shape[:3]:
        raise ValueError(
            f"merge_states: v must be [N, T, H, D] and s [N, T, H]; got {tuple(v.shape)}, {tuple(s.shape)}"
        )
    backend = backend or default_backend(v.device)
    impl = {"triton": _merge_triton, "flashinfer": _merge_flashinfer, "torch": _merge_torch}.get(backend)
    if impl is None:
        raise ValueError(f"unknown merge backend {backend!r} (triton, flashinfer, torch)")
    return impl(v, s, base2)
