"""Build a model from config.json and fill its weights (HF safetensors, or random for dummy)."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nanocp.models.registry import get_model_class
from nanocp.utils import get_logger

logger = get_logger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def safetensors_weights(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every *.safetensors file (single file or sharded with an index)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {model_path!r} (use --load-format dummy for random weights)"
        )
    for path in tqdm(files, desc="Loading safetensors shards", disable=len(files) < 2, leave=False):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights (normal, std 0.02; norms at 1), reproducible from the seed."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if param.device not in gens:
            gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.normal_(0.0, 0.02, generator=gens[param.device])


def load_model(
    model_path: str,
    hf_config: Any,
    load_format: str,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    ep_rank: int = 0,
    ep_size: int = 1,
) -> nn.Module:
    cls = get_model_class(hf_config)
    with _default_dtype(dtype), torch.device(device):
        model = cls(hf_config, ep_rank=ep_rank, ep_size=ep_size)
    if load_format == "dummy":
        logger.info("Initializing random (dummy) weights")
        init_dummy_weights(model, seed)
    else:
        model.load_weights(safetensors_weights(model_path))
    return model.eval()
