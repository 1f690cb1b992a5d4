"""Linear layers whose weights may be stored as several checkpoint tensors (fused projections)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanocp import envs


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except decode batches of <= gemv.WINS_UP_TO rows on CUDA, which stream the weight
    through one GEMV launch (cuBLAS picks 64-row tiles and split-K there: ~2x the bytes' time)."""
    if x.is_cuda and x.dim() == 2 and envs.small_batch_kernels():
        from nanocp_kernels.gemv import WINS_UP_TO, gemv

        if x.shape[0] <= WINS_UP_TO:
            return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


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
