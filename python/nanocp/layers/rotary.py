"""Rotary position embedding, including HF rope_scaling variants (linear, yarn, llama3, ...).

Inverse frequencies come from transformers' own RoPE init functions so that every scaling type
matches the reference implementation exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Types whose frequencies depend on the current sequence length; not supported by a paged engine
# that computes positions independently per token.
_UNSUPPORTED = {"dynamic", "longrope"}


def rope_parameters(hf_config: Any) -> dict:
    """rope_type + rope_theta + scaling parameters, for transformers v4 and v5 configs alike."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        out = dict(params)
    else:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        out["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    out["rope_type"] = out.get("rope_type", out.get("type", "default")) or "default"
    return out


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config: Any, head_dim: int) -> None:
        super().__init__()
        # the model runner raises this to --context-length when that is larger
        self.max_positions = int(getattr(hf_config, "max_position_embeddings", 32768))
        params = rope_parameters(hf_config)
        rope_type = params["rope_type"]
        if rope_type in _UNSUPPORTED:
            raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported by NanoCP")
        if rope_type == "default":
            exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponent), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise NotImplementedError(f"unknown rope_scaling type {rope_type!r}")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
        # HF builds the frequencies on the CPU; keep them where the model is being built.
        self.register_buffer("inv_freq", inv_freq.float().to(torch.get_default_device()), persistent=False)
        self.attention_scaling = float(scaling)
        self.cos_sin_cache: torch.Tensor | None = None  # [max_positions, head_dim] float32, CUDA path

    def _cache(self, device: torch.device) -> torch.Tensor:
        """cos | sin (scaled) of every position, built once on first use on a CUDA device."""
        if self.cos_sin_cache is None or self.cos_sin_cache.device != device:
            pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
            self.cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling
        return self.cos_sin_cache

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D]; positions: [T] (< max_positions)."""
        if q.is_cuda:  # one fused Triton launch per tensor, in place
            from nanocp_kernels.elementwise import rope_inplace

            cache = self._cache(q.device)
            q, k = q.contiguous(), k.contiguous()
            rope_inplace(q, positions, cache)
            rope_inplace(k, positions, cache)
            return q, k
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(q.dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
