"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

# A CPU-friendly MoE big enough that attention and experts take measurable time.
BENCH_MODEL = dict(
    arch="qwen3_moe",
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=32768,
)


def pyplot():
    """matplotlib.pyplot with the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bench_model_path() -> str:
    """The benchmark model (random weights), created once in the cache dir."""
    from nanocp.testing.tiny_model import cached_tiny_model

    return cached_tiny_model("bench-tiny-moe-v2", **BENCH_MODEL)


def environment(device: str = "cpu") -> dict[str, Any]:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
