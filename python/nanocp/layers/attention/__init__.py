from nanocp.layers.attention import (
    flashinfer_backend,  # noqa: F401  (registers "flashinfer"; imports flashinfer only when used)
    torch_backend,  # noqa: F401  (registers "torch")
    triton_backend,  # noqa: F401  (registers "triton")
)
from nanocp.layers.attention.base import (
    AttentionBackend,
    create_attention_backend,
    register_attention_backend,
)
from nanocp.layers.attention.layer import Attention

__all__ = ["Attention", "AttentionBackend", "create_attention_backend", "register_attention_backend"]
