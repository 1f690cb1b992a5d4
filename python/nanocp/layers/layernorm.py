from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, then scaled in the input dtype (as HF Qwen3)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with residual: (norm(x + residual), x + residual), the add in x's dtype (HF's
        residual stream), fused into the norm's launch on CUDA."""
        if residual is not None:
            if x.is_cuda:
                from nanocp_kernels.elementwise import fused_add_rmsnorm

                return fused_add_rmsnorm(x, residual, self.weight, self.eps)
            x = x + residual
            return self.forward(x), x
        if x.is_cuda:  # one fused Triton launch instead of six torch ops
            from nanocp_kernels.elementwise import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None (first layer): (norm(x), x)."""
        return self(x, residual) if residual is not None else (self(x), x)
