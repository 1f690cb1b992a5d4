"""ForwardMode / ForwardBatch: what changes from one model forward to the next.

The per-process services a forward uses (KV pool, attention backend, MoE exchange, DCP
executors) live on the Context (engine/context.py), set once; layers read both from it.
Token-major tensors are laid out request by request: request i owns the next
``extend_seq_lens_cpu[i]`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, auto
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanocp.distributed.dcp import DCPPlan


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
    out_cache_loc: torch.Tensor  # [T] int64, KV slot each new token is written to (-1: held elsewhere)
    req_pool_indices: torch.Tensor  # [B] int64, row in req_to_token
    seq_lens: torch.Tensor  # [B] int64, KV length after this step
    logits_indices: torch.Tensor  # [S] int64, rows whose next-token logits are needed
    # Host copies of the per-request lengths (used to build kernel metadata without syncs).
    seq_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    global_num_tokens: list[int] | None = None  # every DP rank's token count this step
    # per request: the [start, end) ranges of its KV held here (None: all of it)
    held_ranges: list[list[tuple[int, int]]] | None = None
    # context parallelism: this instance's requests whose KV is partly on holders, as
    # (req, row_offset, start, end), and the step's plan (None: nothing routed this step)
    cp_work: list | None = None
    dcp: DCPPlan | None = None
    cuda_graph: bool = False  # run inside a CUDA graph (captured, or the step was replayed)
    # set once this instance entered a collective of the step (MoE exchange, DCP routing, a graph
    # holding them): from then on its peers wait for it inside the step, so a fault cannot be
    # recovered by running the step again (Scheduler.run_batch)
    collectives_begun: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
