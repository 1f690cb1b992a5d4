"""Attention backend interface and registry.

Every backend returns (output, lse) of its queries over the KV held here, so that
context-parallel execution can merge partial results; ``forward`` is the path without lse.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from nanocp.engine.forward_batch import ForwardBatch
    from nanocp.kvcache.pool import KVCachePool, ReqToTokenPool


class AttentionLayer(Protocol):
    """What a backend reads of the layer it attends for (layers/attention/layer.Attention)."""

    layer_id: int
    scaling: float


class AttentionBackend(ABC):
    """Backends get the instance's KV pool and req->token table at construction (the keyword
    arguments of create_attention_backend) and declare what they can run:"""

    supports_cuda_graph = False  # decode steps replay from CUDA graphs
    supports_context_parallel = False  # steps with held_ranges (some KV held elsewhere) and lse
    supports_cp_cuda_graph = False  # ... also when replayed from CUDA graphs
    dtypes: tuple[str, ...] | None = None  # the --dtype values it runs (None: any)

    @classmethod
    def available(cls) -> bool:
        """Whether what it needs is installed (the "auto" choice skips it otherwise)."""
        return True

    def __init__(self, kv_pool: KVCachePool, req_to_token_pool: ReqToTokenPool, **_: object) -> None:
        self.kv_pool = kv_pool
        self.req_to_token_pool = req_to_token_pool

    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Build per-step metadata once; every layer of the step reuses it."""

    @abstractmethod
    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the KV cache, which already holds the new tokens' K/V (Attention.forward
        stores them first). q: [T, Hq, D]; returns o [T, Hq, D], lse [T, Hq]."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatch
    ) -> torch.Tensor:
        return self.forward_with_lse(q, k, v, layer, batch)[0]

    # CUDA graphs (nanocp.model_executor.cuda_graph_runner): metadata lives in static buffers.
    def init_cuda_graph_state(self, max_bs: int, num_slots: int) -> None:
        """Allocate the static metadata buffers of decode graphs up to max_bs requests."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in CUDA graphs")

    def init_forward_metadata_capture(self, batch: ForwardBatch) -> None:
        """Metadata of the static decode batch a graph is captured with."""
        raise NotImplementedError

    def init_forward_metadata_replay(self, batch: ForwardBatch) -> None:
        """Write a decode step's metadata into the static buffers (same addresses as at capture)."""
        raise NotImplementedError


def ragged_index(
    req_pool_indices: torch.Tensor, counts: torch.Tensor, total: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items 0 .. counts[i]-1 of every request i, flattened on the device without a host sync
    (total = sum(counts), known on the host): (inclusive cumulative counts, each item's
    req_to_token row, each item's index within its request)."""
    ends = torch.cumsum(counts, 0)
    rows = torch.repeat_interleave(req_pool_indices, counts, output_size=total)
    within = torch.arange(total, device=counts.device) - torch.repeat_interleave(
        ends - counts, counts, output_size=total
    )
    return ends, rows, within


def register_attention_backend(name: str) -> Callable:
    """Class decorator adding a backend to the registry (nanocp.registries) under `name`."""
    from nanocp.registries import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS.register(name)
