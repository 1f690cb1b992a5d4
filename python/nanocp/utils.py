"""Small shared helpers: logging setup, dtype resolution."""

from __future__ import annotations

import logging
import sys

import torch

from nanocp import envs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("nanocp")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        if root.level == logging.NOTSET:  # a process's --log-level (child_process_setup) wins
            root.setLevel(envs.log_level().upper())
        root.propagate = False
    return logging.getLogger(name if name.startswith("nanocp") else f"nanocp.{name}")


def set_log_level(level: str) -> None:
    get_logger("nanocp").setLevel(level.upper())


def resolve_dtype(dtype: str, hf_config, device: str) -> torch.dtype:
    """--dtype auto: the checkpoint's dtype; float32 checkpoints stay float32 (tests rely on it)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = _DTYPES.get(cfg)
    if isinstance(cfg, torch.dtype) and cfg in _DTYPES.values():
        return cfg
    return torch.bfloat16 if device == "cuda" else torch.float32
