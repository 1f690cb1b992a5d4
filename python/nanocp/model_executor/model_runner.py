"""ModelRunner: owns the model weights, the KV cache and the attention backend of one instance."""

from __future__ import annotations

import torch

from nanocp import envs
from nanocp.distributed.dcp import EagerDCP
from nanocp.distributed.dcp_graph import GraphDCP
from nanocp.distributed.moe_comm import create_moe_comm
from nanocp.distributed.parallel_state import (
    ParallelState,
    destroy_parallel_state,
    init_parallel_state,
    instance_device,
)
from nanocp.engine.context import Context
from nanocp.engine.forward_batch import ForwardBatch
from nanocp.kvcache.pool import KVCachePool, PageAllocator, ReqToTokenPool
from nanocp.layers.attention import create_attention_backend
from nanocp.layers.moe import FusedMoE
from nanocp.layers.rotary import RotaryEmbedding
from nanocp.layers.sampler import Sampler
from nanocp.model_executor.cuda_graph_runner import CudaGraphRunner
from nanocp.models.config import load_hf_config
from nanocp.models.loader import load_model
from nanocp.models.qwen3 import head_dim_of
from nanocp.server_args import ServerArgs
from nanocp.utils import get_logger, resolve_dtype
from nanocp_router.faults import step_fault

logger = get_logger(__name__)


class ModelRunner:
    def __init__(self, server_args: ServerArgs, parallel: ParallelState | None = None) -> None:
        self.server_args = args = server_args
        parallel = parallel or ParallelState()
        if args.moe_a2a_backend == "deepep" and parallel.group is None and args.device == "cuda":
            from nanocp_router.ipc import free_tcp_port

            parallel = init_parallel_state(
                0, 1, 1, torch.device("cuda:0"), f"tcp://127.0.0.1:{free_tcp_port()}", force_group=True
            )
            self._owns_group = True
        self.parallel = parallel

        self.device = parallel.device or instance_device(parallel.rank, args.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            from nanocp_kernels.launch import set_pdl

            set_pdl(envs.pdl(), self.device)  # the decode kernels' dependent launches
        self.hf_config = load_hf_config(args.model_path, args.trust_remote_code)
        self.dtype = resolve_dtype(args.dtype, self.hf_config, args.device)
        self.context_length = args.context_length or self.hf_config.max_position_embeddings
        self.vocab_size = self.hf_config.vocab_size
        torch.manual_seed(args.random_seed)
        logger.info("Loading %s (%s, %s) on %s", args.model_path, args.load_format, self.dtype, self.device)
        self.model = load_model(
            args.model_path,
            self.hf_config,
            args.load_format,
            self.dtype,
            str(self.device),
            seed=args.random_seed,
            ep_rank=parallel.ep_rank,
            ep_size=parallel.ep_size,
        )
        for module in self.model.modules():
            if isinstance(module, FusedMoE):
                module.runner_backend = args.moe_runner_backend
            elif isinstance(module, RotaryEmbedding):
                module.max_positions = max(module.max_positions, self.context_length)
        self.moe_comm = create_moe_comm(
            args.moe_a2a_backend,
            parallel,
            hidden_size=self.hf_config.hidden_size,
            num_experts=getattr(self.hf_config, "num_experts", 0) or 0,
            max_tokens_per_rank=min(args.cuda_graph_max_bs, 256),
            top_k=getattr(self.hf_config, "num_experts_per_tok", 1) or 1,
            deepep_mode=args.deepep_mode,
            deepep_fp8_dispatch=args.deepep_fp8_dispatch,
            dtype=self.dtype,
        )
        self._init_kv_cache()
        cfg = self.hf_config
        self.attn_backend = create_attention_backend(
            args.attention_backend,
            device=self.device,
            page_size=args.page_size,
            dtype=self.dtype,
            num_qo_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim_of(cfg),
            kv_pool=self.kv_pool,
            req_to_token_pool=self.req_to_token_pool,
        )
        heads = (cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg))
        cp = args.cp_policy != "none" and parallel.world_size > 1
        self.ctx = Context(
            self.kv_pool,
            self.attn_backend,
            self.moe_comm,
            dcp=EagerDCP(parallel.a2a, *heads, self.device) if cp else None,
        )

        self.sampler = Sampler()
        self.forward_steps = 0  # non-idle forwards run (fault injection counts steps by it)
        self.graph_runner: CudaGraphRunner | None = None
        if self.device.type == "cuda" and not args.disable_cuda_graph:
            if not self.attn_backend.supports_cuda_graph:
                logger.info(
                    "CUDA graphs off: --attention-backend %s cannot be captured", args.attention_backend
                )
            elif self.moe_comm is not None and not self.moe_comm.graph_capturable:
                logger.info(
                    "CUDA graphs off: --moe-a2a-backend %s synchronises with the host every layer "
                    "(ipc, or deepep with --deepep-mode auto or low_latency, run inside graphs)",
                    args.moe_a2a_backend,
                )
            else:
                max_bs = min(args.cuda_graph_max_bs, args.max_running_requests)
                if self.moe_comm is not None:
                    max_bs = min(max_bs, self.moe_comm.max_tokens)
                self.ctx.dcp_graph = self._graph_dcp(max_bs) if cp else None
                self.graph_runner = CudaGraphRunner(self, max_bs)
                if parallel.shared_gpu and not envs.mps_active():
                    logger.warning(
                        "Instances share a GPU without MPS: each exchange inside a CUDA graph spins "
                        "through a ~2 ms time slice. Start `nvidia-cuda-mps-control -d` before the "
                        "server, or pass --disable-cuda-graph"
                    )

    def _graph_dcp(self, max_bs: int) -> GraphDCP | None:
        """Fixed routing buffers for context-parallel decode steps inside CUDA graphs."""
        p, cfg = self.parallel, self.hf_config
        if not self.attn_backend.supports_cp_cuda_graph:
            logger.info("Context-parallel steps run eagerly: --attention-backend cannot replay them")
            return None
        return GraphDCP(
            p.rank,
            p.world_size,
            p.cpu_group,
            self.device,
            max_bs,
            self.kv_pool.num_slots,
            self.pad_slot,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            head_dim_of(cfg),
            self.dtype,
        )

    def _init_kv_cache(self) -> None:
        cfg, args = self.hf_config, self.server_args
        num_layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim_of(cfg)
        per_token = KVCachePool.bytes_per_token(num_layers, kv_heads, head_dim, self.dtype)
        if args.max_total_tokens is not None:
            max_tokens = args.max_total_tokens
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * args.mem_fraction_static - (total - free)
            if budget <= 0:
                raise RuntimeError(
                    f"no GPU memory left for the KV cache (weights use {(total - free) / 2**30:.1f} GiB of "
                    f"{total / 2**30:.1f} GiB); raise --mem-fraction-static or set --max-total-tokens"
                )
            max_tokens = int(budget // per_token)
        else:
            max_tokens = int(envs.cpu_kv_cache_gb() * 2**30 // per_token)
        page = args.page_size
        num_pages = max_tokens // page
        if num_pages < 1:
            raise RuntimeError("the KV cache budget is smaller than one page")
        self.max_total_num_tokens = num_pages * page
        # one page past the allocator's: padding tokens of CUDA-graph batches write there
        self.pad_slot = num_pages * page
        self.kv_pool = KVCachePool(
            num_layers, (num_pages + 1) * page, kv_heads, head_dim, self.dtype, self.device, self.pad_slot
        )
        self.page_allocator = PageAllocator(num_pages, page)
        self.req_to_token_pool = ReqToTokenPool(args.max_running_requests, self.context_length, self.device)
        self.req_to_token_pool.req_to_token[self.req_to_token_pool.pad_row, 0] = self.pad_slot
        logger.info(
            "KV cache: %d tokens in %d pages of %d (%.2f GiB)",
            self.max_total_num_tokens,
            num_pages,
            page,
            self.max_total_num_tokens * per_token / 2**30,
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Runs the model; returns float32 logits for the rows in batch.logits_indices."""
        if not batch.forward_mode.is_idle():
            self.forward_steps += 1
            step_fault("forward", self.parallel.rank, self.forward_steps)  # tests only (envs.fault_inject)
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            batch.collectives_begun = self.parallel.world_size > 1  # the exchanges are inside the graphs
            return self.graph_runner.replay(batch)
        self.attn_backend.init_forward_metadata(batch)
        if batch.dcp is not None:
            self.ctx.dcp_executor(batch).begin(batch.dcp)
        with self.ctx.forward(batch):
            hidden = self.model(batch.input_ids, batch.positions)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def shutdown(self) -> None:
        """Release what this runner created beyond its tensors (the one-rank group DeepEP needs)."""
        self.moe_comm = self.ctx.moe_comm = None
        if getattr(self, "_owns_group", False):
            destroy_parallel_state()
            self._owns_group = False
