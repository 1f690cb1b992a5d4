"""NanoCP: MoE serving with DP attention + EP and request-level Dynamic Context Parallelism."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanocp.version import __version__

if TYPE_CHECKING:
    from nanocp.engine.engine import Engine
    from nanocp.sampling.sampling_params import SamplingParams
    from nanocp.server_args import ServerArgs

__all__ = ["Engine", "SamplingParams", "ServerArgs", "__version__"]


def __getattr__(name: str):
    # Lazy: `import nanocp` stays cheap (no torch) for tools that only need the CLI or router.
    if name == "Engine":
        from nanocp.engine.engine import Engine

        return Engine
    if name == "SamplingParams":
        from nanocp.sampling.sampling_params import SamplingParams

        return SamplingParams
    if name == "ServerArgs":
        from nanocp.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)
