"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 with sparse MoE blocks on the layers that have them."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from nanocp.layers.layernorm import RMSNorm
from nanocp.layers.moe import FusedMoE
from nanocp.models.qwen3 import Qwen3ForCausalLM, Qwen3MLP

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: Any, ep_rank: int = 0, ep_size: int = 1) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedMoE(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(getattr(config, "norm_topk_prob", False)),
            ep_rank=ep_rank,
            ep_size=ep_size,
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts of norm(x + residual); returns (output, x + residual) (FusedMoE.route)."""
        return self.experts(x, self.gate.weight, residual, norm)


def is_moe_layer(config: Any, layer_id: int) -> bool:
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer_id not in mlp_only and config.num_experts > 0 and (layer_id + 1) % step == 0


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config: Any, ep_rank: int = 0, ep_size: int = 1, **_: Any) -> None:
        self.ep_rank, self.ep_size = ep_rank, ep_size
        super().__init__(config)

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        if is_moe_layer(config, layer_id):
            return Qwen3MoeSparseMoeBlock(config, self.ep_rank, self.ep_size)
        return Qwen3MLP(config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu"))

    def load_weight(self, name: str, tensor: torch.Tensor) -> list[str]:
        if m := _EXPERT.match(name):
            self.get_submodule(m.group(1)).load_expert(int(m.group(2)), m.group(3), tensor)
            return [f"{m.group(1)}.{m.group(2)}.{m.group(3)}"]
        if m := _STACKED_EXPERTS.match(name):  # transformers-v5 layout: all experts in one tensor
            self.get_submodule(m.group(1)).load_stacked(m.group(2), tensor)
            projs = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
            return [f"{m.group(1)}.{e}.{p}" for e in range(self.config.num_experts) for p in projs]
        return super().load_weight(name, tensor)

    def expected_weights(self) -> set[str]:
        # Every expert of the checkpoint is required, also those another EP rank owns (they are
        # read and skipped), so a truncated checkpoint is caught on every rank.
        out = set()
        for name in super().expected_weights():
            prefix, _, pname = name.rpartition(".")
            if pname in ("w13_weight", "w2_weight"):
                projs = ("gate_proj", "up_proj") if pname == "w13_weight" else ("down_proj",)
                out.update(f"{prefix}.{e}.{p}" for e in range(self.config.num_experts) for p in projs)
            else:
                out.add(name)
        return out
