"""Attention: the layer models call, the backend interface and the registry of backends (the
only list of --attention-backend names: importing this package registers the built-in ones)."""

from nanocp.layers.attention import (
    flashinfer_backend,  # noqa: F401  (registers "flashinfer"; imports flashinfer only when used)
    torch_backend,  # noqa: F401  (registers "torch")
    triton_backend,  # noqa: F401  (registers "triton")
)
from nanocp.layers.attention.base import _REGISTRY, AttentionBackend, register_attention_backend
from nanocp.layers.attention.layer import Attention


def attention_backends() -> dict[str, type[AttentionBackend]]:
    """Every registered backend by name."""
    return dict(_REGISTRY)


def create_attention_backend(name: str, **kwargs) -> AttentionBackend:
    if name not in _REGISTRY:
        raise ValueError(
            f"--attention-backend {name!r} is not available here (available: {', '.join(_REGISTRY)})"
        )
    return _REGISTRY[name](**kwargs)


__all__ = [
    "Attention",
    "AttentionBackend",
    "attention_backends",
    "create_attention_backend",
    "register_attention_backend",
]
