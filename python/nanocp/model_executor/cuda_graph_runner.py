"""Decode from CUDA graphs captured ahead of time, one per batch-size bucket.

At start, a graph of one whole decode forward (embedding to logits) is captured for every bucket
up to --cuda-graph-max-bs. A decode step of bs requests replays the smallest bucket >= bs: its
inputs are copied into the graph's static buffers, the rows past bs are padding (a reserved KV
slot and req_to_token row, so they read and write nothing real), and the attention backend
writes the step's metadata (KV indices, lengths) into its own static buffers first. The plan of
a step is data, not shape, so any batch replays without re-capture.

Expert parallelism: with a graph-capturable MoE exchange (--moe-a2a-backend ipc or deepep:
fixed-capacity buffers, device-side counts) the exchanges are inside the graph. Every rank calls
them once per layer per step whether it replays or runs eagerly, so ranks may mix the two in one
step; an idle rank replays the smallest bucket with padding rows only. A step in which some rank
has more tokens than the exchange holds runs eagerly everywhere (chunked exchanges).

Context parallelism: a second set of graphs has the DCP routing inside (GraphDCP: fixed blocks,
device-side counts); the host loads each step's plan into its buffers before the replay. The
worker decides for all instances at once (all decode or idle, within the largest bucket), since
eager and graph steps route through different channels.

Eager fallback: prefill / mixed steps, batches above the largest bucket, context-parallel steps,
host-synchronised MoE exchanges (all_to_all, allgather). Traced steps (--step-trace-file) replay
too: the trace then has the step's time but no per-section split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from tqdm import tqdm

from nanocp.distributed.dcp import DCPPlan
from nanocp.engine.forward_batch import ForwardBatch, ForwardMode
from nanocp.utils import get_logger

if TYPE_CHECKING:
    from nanocp.engine.context import Context
    from nanocp.kvcache.pool import KVCachePool, ReqToTokenPool


class GraphHost(Protocol):
    """What the graph runner uses of its model runner (model_runner.ModelRunner); ctx.dcp_graph:
    the context-parallel executor captured in the second set of graphs (None: no such graphs)."""

    device: torch.device
    pad_slot: int
    model: torch.nn.Module
    ctx: Context
    kv_pool: KVCachePool
    req_to_token_pool: ReqToTokenPool


logger = get_logger(__name__)


def graph_buckets(max_bs: int) -> list[int]:
    """Batch sizes captured: dense for small batches, every 16 above 32 (SGLang-like)."""
    small = [1, 2, 4, 8, 12, 16, 24, 32]
    return sorted({b for b in small if b <= max_bs} | set(range(48, max_bs + 1, 16)) | {max_bs})


class CudaGraphRunner:
    def __init__(self, runner: GraphHost, max_bs: int) -> None:
        self.runner = runner
        self.max_bs = max_bs
        self.buckets = graph_buckets(max_bs)
        dev = runner.device
        self.pad_slot = runner.pad_slot
        self.pad_row = runner.req_to_token_pool.pad_row
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.full((max_bs,), self.pad_slot, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.full((max_bs,), self.pad_row, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=dev)
        self.rows = torch.arange(max_bs, device=dev)
        self.backend = runner.ctx.attn_backend
        self.moe_comm = runner.ctx.moe_comm  # None or graph-capturable (ModelRunner checks)
        self.backend.init_cuda_graph_state(max_bs, runner.kv_pool.num_slots)
        self.dcp = runner.ctx.dcp_graph  # set when context-parallel decode steps are captured too
        self.idle_plan = DCPPlan.idle(1, dev)  # what those graphs are captured with
        self._dcp_replayed = False
        # (with DCP routing, batch size) -> graph and its logits
        self.graphs: dict[tuple[bool, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[bool, int], torch.Tensor] = {}
        self.capture()

    def _static_batch(
        self, bs: int, seq_lens_cpu: list[int], dcp: DCPPlan | None = None, held: list | None = None
    ) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            logits_indices=self.rows[:bs],
            seq_lens_cpu=seq_lens_cpu,
            extend_seq_lens_cpu=[1] * bs,
            global_num_tokens=[bs],  # one exchange per layer (bs <= the exchange's capacity)
            held_ranges=held,
            dcp=dcp,
            cuda_graph=True,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        with self.runner.ctx.forward(batch):
            hidden = self.runner.model(batch.input_ids, batch.positions)
        return self.runner.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        backend = self.backend
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        variants = [(False, bs) for bs in reversed(self.buckets)]
        variants += [(True, bs) for bs in reversed(self.buckets)] if self.dcp is not None else []
        for key in tqdm(variants, desc="Capturing CUDA graphs", leave=False):
            dcp, bs = key
            batch = self._static_batch(bs, [1] * bs, self.idle_plan if dcp else None)
            backend.init_forward_metadata_capture(batch)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton / FlashInfer compile outside the capture
                    self._forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[key] = self._forward(batch)
            self.graphs[key] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info(
            "Captured %d CUDA graphs (batch sizes %s%s)",
            len(self.graphs),
            self.buckets,
            ", with and without context-parallel routing" if self.dcp is not None else "",
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        if batch.dcp is not None:  # the worker decided for every instance (can_run_dcp)
            return batch.dcp.graph
        if batch.held_ranges is not None and not self.backend.supports_cp_cuda_graph:
            return False
        if self.moe_comm is not None and max(batch.global_num_tokens or [0]) > self.moe_comm.max_tokens:
            return False  # some rank exchanges more than one buffer's worth: chunked, eager
        mode = batch.forward_mode
        if mode.is_idle():
            return self.moe_comm is not None
        return mode.is_decode() and batch.batch_size <= self.max_bs

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.batch_size
        bucket = next(b for b in self.buckets if b >= max(bs, 1))
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        if bucket > bs:  # padding rows: one token at position 0 in the reserved slot
            self.input_ids[bs:bucket].zero_()
            self.positions[bs:bucket].zero_()
            self.out_cache_loc[bs:bucket].fill_(self.pad_slot)
            self.req_pool_indices[bs:bucket].fill_(self.pad_row)
            self.seq_lens[bs:bucket].fill_(1)
        pad = bucket - bs
        held = batch.held_ranges + [[(0, 1)]] * pad if batch.held_ranges is not None else None
        dcp = batch.dcp is not None
        static = self._static_batch(bucket, batch.seq_lens_cpu + [1] * pad, batch.dcp, held)
        self.backend.init_forward_metadata_replay(static)
        if dcp:
            self.dcp.begin(batch.dcp)
            if not self._dcp_replayed:
                self._dcp_replayed = True
                logger.info("Context-parallel decode steps replay from CUDA graphs")
        if self.moe_comm is not None:
            self.moe_comm.prepare_replay()
        self.graphs[dcp, bucket].replay()
        batch.cuda_graph = True
        return self.outputs[dcp, bucket][:bs]

    def can_run_dcp(self, modes: list[int], counts: list[int]) -> bool:
        """Whether every instance replays this context-parallel step (same answer everywhere:
        the arguments are the step's all-gathered modes and token counts)."""
        ok = (int(ForwardMode.DECODE), int(ForwardMode.IDLE), 0)
        return self.dcp is not None and all(m in ok for m in modes) and max(counts) <= self.max_bs
