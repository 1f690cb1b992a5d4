"""FlashInfer attention backend (CUDA): batch prefill/append + decode over the paged KV cache
with one BatchPrefillWithPagedKVCacheWrapper plan per step, returning (o, lse).

Covers the standard causal case (a request's KV all local, queries at its end). Context-parallel
splits (some KV held elsewhere) use the torch / triton backends for now.
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING

import torch

from nanocp import envs
from nanocp.layers.attention.base import AttentionBackend, ragged_index

if TYPE_CHECKING:
    from nanocp.engine.forward_batch import ForwardBatch
    from nanocp.layers.attention.base import AttentionLayer

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferAttnBackend(AttentionBackend):
    supports_cuda_graph = True  # context-parallel steps (held ranges) it cannot run: torch / triton do
    dtypes = ("bfloat16", "float16")

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("flashinfer") is not None

    def __init__(
        self,
        device: torch.device,
        page_size: int,
        dtype: torch.dtype,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError(
                "--attention-backend flashinfer needs flashinfer-python (pip install nanocp[gpu])"
            ) from e
        if torch.device(device).type != "cuda":
            raise ValueError(
                "--attention-backend flashinfer needs a CUDA device; use --attention-backend torch"
            )
        if str(dtype).removeprefix("torch.") not in self.dtypes:
            raise ValueError(f"--attention-backend flashinfer needs --dtype bfloat16 or float16, got {dtype}")
        self.page_size = page_size
        self.dtype = dtype
        self.heads = (num_qo_heads, num_kv_heads, head_dim)
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")
        self.empty = False
        self.decode_wrappers: dict[int, object] = {}  # CUDA-graph decode, one per captured batch size
        self.active_decode = None  # the decode wrapper of this step (graph replay), else None
        self.device = device
        # GQA groups of 4+ run faster on the tensor-core (prefill) kernels, as SGLang does
        forced = envs.flashinfer_decode_tensor_cores()
        self.use_tensor_cores = num_qo_heads // num_kv_heads >= 4 if forced is None else forced

    def init_cuda_graph_state(self, max_bs: int, num_slots: int) -> None:
        dev = self.device
        self.g_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_indices = torch.zeros(-(-num_slots // self.page_size), dtype=torch.int32, device=dev)
        self.g_last = torch.zeros(max_bs, dtype=torch.int32, device=dev)

    def init_forward_metadata_capture(self, batch: ForwardBatch) -> None:
        import flashinfer

        bs = batch.batch_size
        self.decode_wrappers[bs] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self.use_tensor_cores,
            paged_kv_indptr_buffer=self.g_indptr[: bs + 1],
            paged_kv_indices_buffer=self.g_indices,
            paged_kv_last_page_len_buffer=self.g_last[:bs],
        )
        self.init_forward_metadata_replay(batch)

    def init_forward_metadata_replay(self, batch: ForwardBatch) -> None:
        w = self.decode_wrappers[batch.batch_size]
        indptr, indices, last = self._paged_layout(batch)
        hq, hkv, d = self.heads
        w.plan(
            indptr, indices, last, hq, hkv, d, self.page_size, q_data_type=self.dtype, kv_data_type=self.dtype
        )
        self.active_decode, self.empty = w, False

    def _paged_layout(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlashInfer's paged-KV description of the batch (page indptr, page ids, last-page
        lengths), gathered from req_to_token on the device."""
        p = self.page_size
        table = self.req_to_token_pool.req_to_token
        dev = table.device
        num_pages = [-(-n // p) for n in batch.seq_lens_cpu]
        total = sum(num_pages)
        counts = torch.tensor(num_pages, dtype=torch.int64, device=dev)
        indptr, rows, page_no = ragged_index(batch.req_pool_indices, counts, total)
        indices = table[rows, page_no * p] // p
        last = [n - (k - 1) * p for n, k in zip(batch.seq_lens_cpu, num_pages)]
        indptr = torch.cat([indptr.new_zeros(1), indptr]).to(torch.int32)
        return indptr, indices.to(torch.int32), torch.tensor(last, dtype=torch.int32, device=dev)

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.held_ranges or batch.dcp is not None:
            raise NotImplementedError("context-parallel steps need --attention-backend torch or triton")
        self.active_decode = None
        self.empty = batch.batch_size == 0
        if self.empty:
            return
        indptr, indices, last = self._paged_layout(batch)
        qo = [0]
        for n in batch.extend_seq_lens_cpu:
            qo.append(qo[-1] + n)
        hq, hkv, d = self.heads
        self.wrapper.plan(
            torch.tensor(qo, dtype=torch.int32, device=indptr.device),
            indptr,
            indices,
            last,
            hq,
            hkv,
            d,
            self.page_size,
            causal=True,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def _run(self, q: torch.Tensor, k, v, layer: AttentionLayer, batch: ForwardBatch, return_lse: bool):
        """Attend (the layer stored the new K/V); None for an empty batch (nothing to attend)."""
        if self.empty:
            return None
        _, hkv, d = self.heads
        kc = self.kv_pool.k_buffer[layer.layer_id].view(-1, self.page_size, hkv, d)
        vc = self.kv_pool.v_buffer[layer.layer_id].view(-1, self.page_size, hkv, d)
        # plan() used FlashInfer's default scale 1/sqrt(head_dim), which is the models' scaling
        wrapper = self.active_decode or self.wrapper
        return wrapper.run(q.contiguous(), (kc, vc), return_lse=return_lse)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatch
    ) -> torch.Tensor:
        o = self._run(q, k, v, layer, batch, return_lse=False)  # no LSE to write or rescale
        return q.new_zeros(q.shape) if o is None else o

    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        res = self._run(q, k, v, layer, batch, return_lse=True)
        if res is None:
            return q.new_zeros(q.shape), torch.full(q.shape[:2], float("-inf"), device=q.device)
        o, lse2 = res
        return o, lse2.float() * math.log(2)  # FlashInfer's LSE is base 2
