"""The per-process services of model forwards, set once (ModelRunner), and the step running.

Layers call ``get_context()`` for both: the services (KV pool, attention backend, MoE exchange,
DCP executors) and ``ctx.batch``, the ForwardBatch of the forward in progress. A process may
hold several runners (tests, benchmarks); each forward makes its runner's context current.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanocp.distributed.dcp import DCPExecutor
    from nanocp.distributed.moe_comm import MoEComm
    from nanocp.engine.forward_batch import ForwardBatch
    from nanocp.kvcache.pool import KVCachePool
    from nanocp.layers.attention.base import AttentionBackend


@dataclass
class Context:
    kv_pool: KVCachePool
    attn_backend: AttentionBackend
    moe_comm: MoEComm | None = None  # None: all experts are local
    dcp: DCPExecutor | None = None  # eager context-parallel routing (None: no CP)
    dcp_graph: DCPExecutor | None = None  # the same inside CUDA graphs (None: CP steps run eagerly)
    batch: ForwardBatch | None = None  # the forward in progress

    def dcp_executor(self, batch: ForwardBatch) -> DCPExecutor:
        """The executor of a step with a DCPPlan: the graph one inside CUDA graphs."""
        executor = self.dcp_graph if batch.cuda_graph else self.dcp
        if executor is None:
            raise RuntimeError("a context-parallel step on an instance without context parallelism")
        return executor

    @contextlib.contextmanager
    def forward(self, batch: ForwardBatch) -> Iterator[ForwardBatch]:
        """Make this context current, running `batch`, for one model forward."""
        global _CURRENT
        prev, _CURRENT = _CURRENT, self
        prev_batch, self.batch = self.batch, batch
        try:
            yield batch
        finally:
            self.batch, _CURRENT = prev_batch, prev


_CURRENT: Context | None = None


def get_context() -> Context:
    if _CURRENT is None or _CURRENT.batch is None:
        raise RuntimeError("no forward is running: model layers run only inside Context.forward()")
    return _CURRENT
