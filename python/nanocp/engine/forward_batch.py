"""ForwardMode / ForwardBatch and the global forward context.

A ForwardBatch is everything one model forward needs besides the weights. Layers read it from
the forward context (``get_forward_batch()``) instead of having it threaded through every call.
Token-major tensors are laid out request by request: request i owns the next
``extend_seq_lens_cpu[i]`` rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, auto
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanocp.distributed.dcp import DCPStep
    from nanocp.distributed.dcp_graph import GraphDCP
    from nanocp.distributed.moe_comm import MoEComm
    from nanocp.engine.step_trace import StepTracer
    from nanocp.kvcache.pool import KVCachePool, ReqToTokenPool
    from nanocp.layers.attention.base import AttentionBackend


class ForwardMode(IntEnum):
    EXTEND = auto()  # prefill (possibly a chunk of it) for every request in the batch
    DECODE = auto()  # one new token for every request
    MIXED = auto()  # prefill chunks and decodes in one batch
    IDLE = auto()  # no work on this instance (keeps collective ops in lockstep)

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_idle(self) -> bool:
        return self == ForwardMode.IDLE


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    out_cache_loc: torch.Tensor  # [T] int64, KV slot each new token is written to
    req_pool_indices: torch.Tensor  # [B] int64, row in req_to_token
    seq_lens: torch.Tensor  # [B] int64, KV length after this step
    logits_indices: torch.Tensor  # [S] int64, rows whose next-token logits are needed
    # Host copies of the per-request lengths (used to build kernel metadata without syncs).
    seq_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    req_to_token_pool: ReqToTokenPool
    kv_pool: KVCachePool
    attn_backend: AttentionBackend
    moe_comm: MoEComm | None = None  # None: all experts are local
    global_num_tokens: list[int] | None = None  # every DP rank's token count this step
    tracer: StepTracer | None = None
    # per request: the [start, end) position ranges of its KV held here (None: all of it)
    kv_ranges_cpu: list[list[tuple[int, int]]] | None = None
    dcp: DCPStep | GraphDCP | None = None  # context-parallel routing of this step (None: nothing sharded)
    cp_work: list | None = None  # (req, row_offset, start, end) of requests with a placement
    cuda_graph: bool = False  # set when the step was replayed from a CUDA graph
    # set once this instance entered a collective of the step (MoE exchange, DCP routing, a graph
    # holding them): from then on its peers wait for it inside the step, so a fault cannot be
    # recovered by running the step again (Scheduler.run_batch)
    collectives_begun: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


_CURRENT: ForwardBatch | None = None


def get_forward_batch() -> ForwardBatch:
    if _CURRENT is None:
        raise RuntimeError("no forward batch is set: model layers run only inside forward_context()")
    return _CURRENT


def current_forward_batch() -> ForwardBatch | None:
    return _CURRENT


@contextlib.contextmanager
def forward_context(batch: ForwardBatch) -> Iterator[ForwardBatch]:
    global _CURRENT
    prev, _CURRENT = _CURRENT, batch
    try:
        yield batch
    finally:
        _CURRENT = prev
