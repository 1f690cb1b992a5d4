"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from nanocp.models.qwen3 import Qwen3ForCausalLM
from nanocp.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def get_model_class(hf_config: Any) -> type[nn.Module]:
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"model architecture(s) {archs or '(none in config.json)'} not supported; "
        f"supported: {', '.join(MODEL_REGISTRY)}"
    )
