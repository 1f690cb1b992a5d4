"""Qwen3 dense decoder (Qwen3ForCausalLM). The MoE variant in qwen3_moe.py reuses all of it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanocp.layers.attention import Attention
from nanocp.layers.layernorm import RMSNorm
from nanocp.layers.linear import Linear, MergedLinear, norm_linear
from nanocp.layers.rotary import RotaryEmbedding


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Qwen3Attention(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention (use_sliding_window=true) is not supported")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = MergedLinear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, self.head_dim)
        self.attn = Attention(layer_id, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over norm(x + residual); returns (output, x + residual) (norm_linear)."""
        qkv, residual = norm_linear(x, residual, norm, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        kv_store = None  # with the fused kernel, the new K/V are stored in its launch
        if x.is_cuda and self.head_dim & (self.head_dim - 1) == 0:  # q/k norms, RoPE, KV store: one launch
            from nanocp_kernels.elementwise import qk_norm_rope

            v = v.view(-1, self.num_kv_heads, self.head_dim)
            kv_store = self.attn.kv_store(v)
            q, k = qk_norm_rope(
                q,
                k,
                self.q_norm.weight,
                self.k_norm.weight,
                self.q_norm.eps,
                positions,
                self.rotary_emb._cache(x.device),
                kv_store,
            )
        else:
            q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, kv_stored=kv_store is not None)), residual


class Qwen3MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        if hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {hidden_act!r} is not supported (only silu)")
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size])
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP of norm(x + residual); returns (output, x + residual) (norm_linear)."""
        gate_up, residual = norm_linear(x, residual, norm, self.gate_up_proj.weight)
        if gate_up.is_cuda:
            from nanocp_kernels.elementwise import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up)), residual
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up), residual


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_id)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, not yet added to the residual stream (SGLang's
        layout: each residual add is fused into the norm that follows it, and for decode batches
        that norm into the projection after it)."""
        x, residual = self.self_attn(positions, x, residual, self.input_layernorm)
        return self.mlp(x, residual, self.post_attention_layernorm)


class Qwen3Model(nn.Module):
    def __init__(self, config: Any, make_mlp) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Qwen3DecoderLayer(config, i, make_mlp(config, i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm.add_norm(x, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    # (fused parameter, checkpoint name, shard index)
    stacked_params = [
        ("qkv_proj", "q_proj", 0),
        ("qkv_proj", "k_proj", 1),
        ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config: Any, **_: Any) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, self.make_mlp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        return Qwen3MLP(config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu"))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ------------------------------------------------------------------ weights
    def load_weight(self, name: str, tensor: torch.Tensor) -> list[str]:
        """Load one checkpoint tensor; returns the keys (see expected_weights) it filled."""
        if "rotary_emb.inv_freq" in name:
            return []
        if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            return []
        for fused, part, shard in self.stacked_params:
            if f".{part}." in name:
                module_name, _, param_name = name.replace(part, fused).rpartition(".")
                self.get_submodule(module_name).load_shard(param_name, shard, tensor)
                return [f"{module_name}.{param_name}#{shard}"]
        param = self.get_parameter(name)
        if param.shape != tensor.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
        return [name]

    def expected_weights(self) -> set[str]:
        """The keys a complete checkpoint fills (a fused parameter has one key per shard)."""
        out = set()
        for name, _ in self.named_parameters():
            module = self.get_submodule(name.rpartition(".")[0])
            if isinstance(module, MergedLinear):
                out.update(f"{name}#{i}" for i in range(len(module.output_sizes)))
            else:
                out.add(name)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        loaded: set[str] = set()
        for name, tensor in weights:
            loaded.update(self.load_weight(name, tensor))
        missing = self.expected_weights() - loaded
        if missing:
            shown = ", ".join(sorted(missing)[:8])
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {shown}")
