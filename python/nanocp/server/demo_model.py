"""The demo model `launch_server` serves when no --model-path is given: a small random-weight
Qwen3-MoE with an offline-trained tokenizer, created once (deterministically) in the cache dir."""

from __future__ import annotations

DEMO_NAME = "nanocp-demo-qwen3-moe"
DEMO_CONFIG = dict(
    arch="qwen3_moe",
    seed=0,
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=8192,
)


def demo_model_path() -> str:
    """Path of the demo checkpoint, created on first use."""
    from nanocp.testing.tiny_model import cached_tiny_model

    return cached_tiny_model(DEMO_NAME, **DEMO_CONFIG)
