"""Decode from CUDA graphs captured ahead of time, one per batch-size bucket.

At start, a graph of one whole decode forward (embedding to logits) is captured for every bucket
up to --cuda-graph-max-bs. A decode step of bs requests replays the smallest bucket >= bs: its
inputs are copied into the graph's static buffers, the rows past bs are padding (a reserved KV
slot and req_to_token row, so they read and write nothing real), and the attention backend
writes the step's metadata (KV indices, lengths) into its own static buffers first. The plan of
a step is data, not shape, so any batch replays without re-capture.

Eager fallback: prefill / mixed steps, batches above the largest bucket, context-parallel steps
and expert-parallel MoE exchanges (their collectives are not captured yet), and traced steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from nanocp.engine.forward_batch import ForwardBatch, ForwardMode, forward_context
from nanocp.utils import get_logger

if TYPE_CHECKING:
    from nanocp.model_executor.model_runner import ModelRunner

logger = get_logger(__name__)


def graph_buckets(max_bs: int) -> list[int]:
    """Batch sizes captured: dense for small batches, every 16 above 32 (SGLang-like)."""
    small = [1, 2, 4, 8, 12, 16, 24, 32]
    return sorted({b for b in small if b <= max_bs} | set(range(48, max_bs + 1, 16)) | {max_bs})


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
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
        runner.attn_backend.init_cuda_graph_state(max_bs, runner.kv_pool.num_slots)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture()

    def _static_batch(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        r = self.runner
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_seq_lens=self.seq_lens[:bs] * 0 + 1,
            extend_prefix_lens=self.seq_lens[:bs] - 1,
            logits_indices=self.rows[:bs],
            seq_lens_cpu=seq_lens_cpu,
            extend_seq_lens_cpu=[1] * bs,
            req_to_token_pool=r.req_to_token_pool,
            kv_pool=r.kv_pool,
            attn_backend=r.attn_backend,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        with forward_context(batch):
            hidden = self.runner.model(batch.input_ids, batch.positions)
        return self.runner.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        backend = self.runner.attn_backend
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        for bs in tqdm(list(reversed(self.buckets)), desc="Capturing CUDA graphs", leave=False):
            batch = self._static_batch(bs, [1] * bs)
            backend.init_forward_metadata_capture(batch)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton / FlashInfer compile outside the capture
                    self._forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bs] = self._forward(batch)
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info("Captured %d CUDA graphs (batch sizes %s)", len(self.graphs), self.buckets)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.forward_mode.is_decode()
            and batch.batch_size <= self.max_bs
            and batch.dcp is None
            and batch.kv_ranges_cpu is None
            and batch.moe_comm is None
            and batch.tracer is None
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.batch_size
        bucket = next(b for b in self.buckets if b >= bs)
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
        static = self._static_batch(bucket, batch.seq_lens_cpu + [1] * (bucket - bs))
        self.runner.attn_backend.init_forward_metadata_replay(static)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:bs]
