"""Linear layers whose weights may be stored as several checkpoint tensors (fused projections)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanocp import envs
from nanocp.layers.layernorm import RMSNorm


def small_rows(x: torch.Tensor, up_to: int) -> bool:
    """x is a decode batch of <= up_to rows on CUDA, for the decode-batch kernels (nanocp_kernels.gemv)."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] <= up_to and envs.small_batch_kernels()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except decode batches of <= gemv.WINS_UP_TO rows on CUDA, which stream the weight
    through one GEMV launch (cuBLAS picks 64-row tiles and split-K there: ~2x the bytes' time)."""
    if x.is_cuda:  # (the kernels need triton: imported only for CUDA tensors)
        from nanocp_kernels.gemv import WINS_UP_TO, gemv

        if small_rows(x, WINS_UP_TO):
            return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, weight: torch.Tensor, bias=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x + residual)), x + residual); residual None: (linear(norm(x)), x). SGLang's
    layout, where each residual add is fused into the norm after it; for a decode batch of one token
    the norm also runs inside the projection's GEMV launch."""
    if x.is_cuda:
        from nanocp_kernels.gemv import NORM_WINS_UP_TO, gemv

        if small_rows(x, NORM_WINS_UP_TO):
            return gemv(x, weight, bias, norm=(residual, norm.weight, norm.eps))
    h, residual = norm.add_norm(x, residual)
    return linear(h, weight, bias), residual


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedLinear(nn.Module):
    """One matmul for several projections of the same input (q/k/v, gate/up).

    Output columns are the concatenation of ``output_sizes``; checkpoint tensors are loaded into
    their slice with ``load_shard``.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), input_size))
        self.bias = nn.Parameter(torch.empty(sum(output_sizes))) if bias else None

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        param = self.weight if param_name == "weight" else self.bias
        start, size = self.offsets[shard], self.output_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(
                f"shard {shard} of {param_name}: expected {size} rows, got {tuple(tensor.shape)}"
            )
        param.data[start : start + size].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
