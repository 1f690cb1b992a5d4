"""Attention: the layer models call, the backend interface, and the registered backends
(nanocp.registries.ATTENTION_BACKENDS, imported when asked for)."""

from nanocp.layers.attention.base import AttentionBackend, register_attention_backend
from nanocp.layers.attention.layer import Attention
from nanocp.registries import ATTENTION_BACKENDS


def attention_backends() -> dict[str, type[AttentionBackend]]:
    """Every registered backend's class by name."""
    return ATTENTION_BACKENDS.classes()


def create_attention_backend(name: str, **kwargs) -> AttentionBackend:
    return ATTENTION_BACKENDS.get(name)(**kwargs)


__all__ = [
    "Attention",
    "AttentionBackend",
    "attention_backends",
    "create_attention_backend",
    "register_attention_backend",
]
