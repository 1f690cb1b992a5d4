"""The demo model `launch_server` serves when no --model-path is given: a small random-weight
Qwen3-MoE with an offline-trained tokenizer, created once (deterministically) in the cache dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from nanocp import envs

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
    """Path of the demo checkpoint, creating it on first use (atomically: a half-written model is
    never left behind)."""
    path = envs.cache_dir() / DEMO_NAME
    if (path / "config.json").exists():
        return str(path)
    from nanocp.testing import make_tiny_model

    print(f"Creating the demo model (tokenizer + random weights) in {path}, first run only ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".demo-"))
    try:
        make_tiny_model(tmp, **DEMO_CONFIG)
        if not (path / "config.json").exists():
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
