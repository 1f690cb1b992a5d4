"""ServerArgs: the one configuration object of NanoCP, also its command-line parser.

Flag names follow SGLang's so that its users can reuse their launch commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Any

from nanocp.registries import ATTENTION_BACKENDS, KV_TRANSFER_BACKENDS, MOE_A2A_BACKENDS
from nanocp_router.layout import LayoutError, NodeLayout
from nanocp_router.planner import POLICIES as CP_POLICIES
from nanocp_router.policy import POLICIES

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cuda", "cpu")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
LOAD_BALANCE_METHODS = tuple(POLICIES)
MOE_RUNNER_BACKENDS = ("auto", "torch", "triton")
DEEPEP_MODES = ("auto", "low_latency", "normal")
SCHEDULE_POLICIES = ("fcfs", "slo")  # scheduler/core.py
DISAGGREGATION_MODES = ("null", "prefill", "decode")


class ServerArgsError(ValueError):
    """A bad configuration value; the message names the offending flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    device: str | None = None  # default: cuda when available, else cpu
    load_format: str = "auto"
    context_length: int | None = None
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    # Memory and scheduling
    page_size: int = 1
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.85
    chunked_prefill_size: int = 8192
    max_running_requests: int = 256
    max_queued_requests: int | None = None  # per instance and in the router's queue; past it: 503
    # scales the KV reserved for running requests' future outputs at admission (SGLang's flag):
    # < 1 admits more (and retracts more often), > 1 admits fewer
    schedule_conservativeness: float = 1.0
    # admission order (SGLang's flag): fcfs, or slo (least remaining slack against the SLOs below;
    # scheduler/core.py)
    schedule_policy: str = "fcfs"
    slo_ttft_ms: float = 5000.0
    slo_tpot_ms: float = 100.0
    # one request's prompt tokens per step while others want prefill (scheduler/core.py); None:
    # --chunked-prefill-size / 4 on a prefill server, else 0 (off)
    long_prefill_token_threshold: int | None = None
    random_seed: int = 0
    # the per-instance radix prefix cache (kvcache/radix_cache.py); prefill servers run without it
    disable_radix_cache: bool = False
    # Kernels
    attention_backend: str = "auto"  # cuda: flashinfer (installed, no CP) or triton; cpu: torch
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 256
    # HTTP server
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None  # default: the model path
    # Parallelism (--dp-size N without DP attention: N independent replicas behind the router)
    dp_size: int = 1
    ep_size: int = 1
    enable_dp_attention: bool = False  # accepted for SGLang compatibility: attention is always DP here
    tp_size: int | None = None  # SGLang's --tp with DP attention = the GPUs in all; no TP inside a rank
    moe_a2a_backend: str = "all_to_all"
    moe_runner_backend: str = "auto"  # expert GEMMs: auto = triton on CUDA, torch elsewhere
    deepep_mode: str = "auto"  # --moe-a2a-backend deepep: which DeepEP kernels
    deepep_fp8_dispatch: bool = False  # low-latency dispatch sends FP8 (+ scales), experts stay bf16
    load_balance_method: str = "round_robin"
    step_trace_file: str | None = None
    # Multi-node (SGLang's flags; every node gets the same ones but --node-rank; server/layout.py)
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of node 0, where every socket of the server is
    nproc_per_node: int | None = None  # instances per node (default: --dp-size / instance nodes)
    router_only: bool = False  # node 0 runs the HTTP server, tokenizer and router, no instances
    worker_only: bool = False  # this node only runs instances (states --node-rank > 0)
    dry_run: bool = False  # print the layout (which instance runs where, the ports) and exit
    # Context parallelism (router planner): none = static DP, uniform = every request over
    # --cp-size instances, dynamic = degree sized to the request's KV footprint
    cp_policy: str | None = None  # default: dynamic when --dp-size > 1, else none
    cp_size: int = 2
    cp_max_degree: int = 8
    cp_min_shard_tokens: int = 4096
    # Prefill/decode disaggregation (SGLang's flags; nanocp/disaggregation): null (colocated),
    # prefill (runs prompts for decode servers), decode (the front door; prefill elsewhere)
    disaggregation_mode: str = "null"
    disaggregation_prefill_url: str | None = None  # decode: the prefill servers, URL[,URL...]
    disaggregation_transfer_backend: str = "nixl"
    disaggregation_bootstrap_port: int = 8998  # prefill: where decode servers reach its router
    # Logging
    log_level: str = "info"

    def __post_init__(self) -> None:
        # three passes: every flag alone; "auto" and defaults resolved (probing the hardware);
        # then the flags together, against what the chosen backends declare they can do
        self._validate_fields()
        self._resolve()
        self._validate()

    # -------------------------------------------------------------- validate alone
    def _validate_fields(self) -> None:
        self._check_choice("dtype", DTYPES)
        self._check_choice("device", DEVICES, optional=True)
        self._check_choice("load_format", LOAD_FORMATS)
        self._check_choice("attention_backend", ("auto", *ATTENTION_BACKENDS.names()))
        self._check_choice("moe_a2a_backend", MOE_A2A_BACKENDS.names())
        self._check_choice("moe_runner_backend", MOE_RUNNER_BACKENDS)
        self._check_choice("deepep_mode", DEEPEP_MODES)
        self._check_choice("cp_policy", tuple(CP_POLICIES), optional=True)
        self._check_choice("load_balance_method", LOAD_BALANCE_METHODS)
        self._check_choice("schedule_policy", SCHEDULE_POLICIES)
        self._check_choice("disaggregation_mode", DISAGGREGATION_MODES)
        self._check_choice("disaggregation_transfer_backend", KV_TRANSFER_BACKENDS.names())
        self._check_int("disaggregation_bootstrap_port", minimum=1)
        if self.disaggregation_bootstrap_port > 65535:
            raise ServerArgsError(
                f"--disaggregation-bootstrap-port must be <= 65535, got {self.disaggregation_bootstrap_port}"
            )
        self._prefill_urls = self._check_prefill_urls()
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ServerArgsError(f"{_flag(name)} must be a number > 0, got {value!r}")
        for name in ("page_size", "chunked_prefill_size", "max_running_requests", "cuda_graph_max_bs"):
            self._check_int(name, minimum=1)
        self._check_int("long_prefill_token_threshold", minimum=0, optional=True)
        for name in ("max_queued_requests", "max_total_tokens", "context_length"):
            self._check_int(name, minimum=1, optional=True)
        self._check_int("random_seed", minimum=0)
        self._check_int("port", minimum=1)
        if self.port > 65535:
            raise ServerArgsError(f"--port must be <= 65535, got {self.port}")
        for name in ("dp_size", "ep_size", "cp_size", "cp_max_degree", "cp_min_shard_tokens", "nnodes"):
            self._check_int(name, minimum=1)
        self._check_int("tp_size", minimum=1, optional=True)
        self._check_int("nproc_per_node", minimum=1, optional=True)
        self._check_int("node_rank", minimum=0)
        if (
            isinstance(self.schedule_conservativeness, bool)
            or not isinstance(self.schedule_conservativeness, (int, float))
            or self.schedule_conservativeness < 0
        ):
            raise ServerArgsError(
                f"--schedule-conservativeness must be a number >= 0, got {self.schedule_conservativeness!r}"
            )
        if not isinstance(self.mem_fraction_static, (int, float)) or not 0 < self.mem_fraction_static < 1:
            raise ServerArgsError(
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static!r}"
            )
        try:
            self._layout = NodeLayout.create(
                self.nnodes,
                self.node_rank,
                self.dp_size,
                self.dist_init_addr,
                self.router_only,
                self.nproc_per_node,
            )
        except LayoutError as e:
            raise ServerArgsError(str(e)) from None
        if self.model_path is not None and not os.path.exists(self.model_path):
            raise ServerArgsError(
                f"--model-path {self.model_path!r} does not exist (NanoCP never downloads from a model hub; "
                "pass a local checkpoint directory, or use --load-format dummy with a directory holding config.json)"
            )

    # --------------------------------------------------------------------- resolve
    def _resolve(self) -> None:
        """Defaults that depend on other flags, "auto" values, and the GPUs there are."""
        self._num_gpus = 0
        runs_instances = len(self._layout.local_instances) > 0  # a router-only node: none
        if self.device is None:
            self.device = _default_device() if runs_instances else "cpu"
        if self.device == "cuda" and runs_instances:
            import torch

            if not torch.cuda.is_available():
                raise ServerArgsError("--device cuda was requested but no CUDA device is available")
            self._num_gpus = torch.cuda.device_count()
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path
        if self.moe_runner_backend == "auto":
            self.moe_runner_backend = "triton" if self.device == "cuda" else "torch"
        if self.long_prefill_token_threshold is None:
            prefill = self.disaggregation_mode == "prefill"
            self.long_prefill_token_threshold = max(1, self.chunked_prefill_size // 4) if prefill else 0
        if self.cp_policy is None:  # a prefill server's instances never decode: no placements
            dynamic = self.dp_size > 1 and self.disaggregation_mode != "prefill"
            self.cp_policy = "dynamic" if dynamic else "none"
        if self.attention_backend == "auto" and runs_instances:
            self.attention_backend = self._auto_attention_backend()

    @property
    def radix_cache(self) -> bool:
        """Whether instances keep a prefix cache: on by default; a prefill server's instances run
        without one (its transfers send each step's positions, not a cached prefix)."""
        return not self.disable_radix_cache and self.disaggregation_mode != "prefill"

    def _auto_attention_backend(self) -> str:
        """cpu: torch; cuda: flashinfer where it is installed and can run the configuration (its
        kernels are half-precision, without context parallelism), else triton."""
        if self.device != "cuda":
            return "torch"
        dtype = self._checkpoint_dtype()
        for name in ("flashinfer", "triton"):
            cls = ATTENTION_BACKENDS.get(name)
            if self.cp_policy != "none" and not cls.supports_context_parallel:
                continue
            if cls.dtypes is not None and dtype not in ("auto", *cls.dtypes):
                continue
            if cls.available():
                return name
        return "triton"

    def _checkpoint_dtype(self) -> str:
        """--dtype, with auto read from a local checkpoint's config.json as the model runner
        resolves it (utils.resolve_dtype: a float32 checkpoint runs in float32); auto when unknown."""
        if self.dtype != "auto":
            return self.dtype
        try:
            with open(os.path.join(self.model_path, "config.json")) as f:
                cfg = json.load(f)
        except (OSError, ValueError, TypeError):
            return "auto"
        found = cfg.get("dtype") or cfg.get("torch_dtype")
        return found if found in ("float32", "bfloat16", "float16") else "auto"

    # ---------------------------------------------------------- validate together
    def _validate(self) -> None:
        dp, ep = self.dp_size, self.ep_size
        runs_instances = len(self._layout.local_instances) > 0
        if self.worker_only and self.node_rank == 0:
            raise ServerArgsError(
                "--worker-only: node 0 runs the HTTP server and router; pass --node-rank >= 1"
            )
        if self.tp_size is not None and self.tp_size not in (1, dp):
            raise ServerArgsError(
                f"--tp-size {self.tp_size}: NanoCP runs attention data-parallel and experts expert-parallel, "
                f"without tensor parallelism inside an instance; pass --tp-size equal to --dp-size "
                f"({dp}, SGLang's DP-attention layout) or leave it out"
            )
        if ep not in (1, dp):
            raise ServerArgsError(
                f"--ep-size must be 1 (every instance holds all experts) or equal to --dp-size ({dp}); got {ep}"
            )
        if self.deepep_fp8_dispatch and (self.moe_a2a_backend != "deepep" or self.deepep_mode == "normal"):
            raise ServerArgsError(
                "--deepep-fp8-dispatch applies to DeepEP's low-latency dispatch: it needs --moe-a2a-backend deepep "
                f"with --deepep-mode auto or low_latency (got --moe-a2a-backend {self.moe_a2a_backend}, "
                f"--deepep-mode {self.deepep_mode})"
            )
        if self.cp_policy != "none" and dp == 1:
            raise ServerArgsError(
                f"--cp-policy {self.cp_policy} needs --dp-size > 1 (instances to shard over)"
            )
        if self.cp_size > dp and self.cp_policy == "uniform":
            raise ServerArgsError(f"--cp-size ({self.cp_size}) must be <= --dp-size ({dp})")
        mode = self.disaggregation_mode
        if mode == "decode" and not self._prefill_urls:
            raise ServerArgsError(
                "--disaggregation-mode decode needs --disaggregation-prefill-url URL[,URL...] (the prefill servers)"
            )
        if mode != "decode" and self._prefill_urls:
            raise ServerArgsError(
                f"--disaggregation-prefill-url applies to --disaggregation-mode decode (got {mode})"
            )
        if mode == "prefill" and self.cp_policy != "none":
            raise ServerArgsError(
                f"--cp-policy {self.cp_policy} applies to decode servers: a prefill server's instances run "
                "whole prompts (leave --cp-policy out, or pass none)"
            )
        if mode == "prefill" and self.disaggregation_bootstrap_port == self.port:
            raise ServerArgsError(
                f"--disaggregation-bootstrap-port ({self.disaggregation_bootstrap_port}) must differ from --port"
            )
        if runs_instances:  # what the backends declare (their classes import torch): where they run
            self._validate_backends()
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ServerArgsError(
                f"--max-total-tokens ({self.max_total_tokens}) must be at least --page-size ({self.page_size})"
            )

    def _check_prefill_urls(self) -> list[str]:
        from urllib.parse import urlsplit

        if self.disaggregation_prefill_url is None:
            return []
        urls = [u.strip().rstrip("/") for u in str(self.disaggregation_prefill_url).split(",") if u.strip()]
        for url in urls:
            parts = urlsplit(url)
            try:
                port = parts.port
            except ValueError:
                port = None
            if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
                raise ServerArgsError(
                    f"--disaggregation-prefill-url: {url!r} is not an http://HOST:PORT URL of a prefill server"
                )
        if not urls:
            raise ServerArgsError("--disaggregation-prefill-url is empty")
        return urls

    @property
    def prefill_urls(self) -> list[str]:
        """--disaggregation-prefill-url, split (decode servers)."""
        return list(self._prefill_urls)

    def _validate_backends(self) -> None:
        dp, ep = self.dp_size, self.ep_size
        if self.disaggregation_mode != "null":
            kv = KV_TRANSFER_BACKENDS.get(self.disaggregation_transfer_backend)
            if self.device not in kv.mem_types or not kv.available():
                raise ServerArgsError(
                    f"--disaggregation-transfer-backend {self.disaggregation_transfer_backend} cannot run here "
                    f"(installed: {kv.available()}; pools on {', '.join(kv.mem_types)}; this server: --device "
                    f"{self.device})"
                )
        moe = MOE_A2A_BACKENDS.get(self.moe_a2a_backend)
        try:
            moe.check_config(ep, self.deepep_mode)
        except ValueError as e:
            raise ServerArgsError(str(e)) from None
        if moe.needs_cuda and self.device != "cuda":
            raise ServerArgsError(
                f"--moe-a2a-backend {self.moe_a2a_backend} needs --device cuda; use all_to_all or allgather"
            )
        attn = ATTENTION_BACKENDS.get(self.attention_backend)
        if self.cp_policy != "none" and not attn.supports_context_parallel:
            capable = ", ".join(
                n for n, c in ATTENTION_BACKENDS.classes().items() if c.supports_context_parallel
            )
            raise ServerArgsError(
                f"--cp-policy {self.cp_policy} needs an attention backend that attends over sharded KV "
                f"(--attention-backend {capable}; {self.attention_backend} cannot yet); or use --cp-policy none"
            )
        local = len(self._layout.local_instances)
        if self.device == "cuda" and local > 1 and self._num_gpus < local:
            # instances share GPUs (testing several instances on few GPUs)
            where = f"--dp-size {dp}" + (f" ({local} on this node)" if self._layout.multinode else "")
            if self.max_total_tokens is None:
                raise ServerArgsError(
                    f"{where} on {self._num_gpus} GPU(s): instances share GPUs, so give each its KV "
                    "budget with --max-total-tokens (--mem-fraction-static is per GPU)"
                )
            if not moe.shares_gpus:
                sharing = ", ".join(n for n, c in MOE_A2A_BACKENDS.classes().items() if c.shares_gpus)
                raise ServerArgsError(
                    f"--moe-a2a-backend {self.moe_a2a_backend} needs one GPU per instance "
                    f"({where}, {self._num_gpus} GPU(s)); use {sharing}"
                )

    @property
    def layout(self) -> NodeLayout:
        """Which node runs what, and the ports between them (server/layout.py)."""
        return self._layout

    def disagg_config(self) -> dict[str, Any] | None:
        """The router's disaggregation settings (nanocp_router.pd, prefill_router); a decode
        server's launcher adds the prefill servers' addresses before the router starts."""
        from nanocp import envs

        mode = self.disaggregation_mode
        if mode == "null":
            return None
        if mode == "prefill":
            return {"mode": mode, "bootstrap_port": self.disaggregation_bootstrap_port}
        return {"mode": mode, "timeout_s": envs.disaggregation_timeout_s(), "servers": []}

    def cp_config(self) -> dict[str, Any]:
        """The context-parallel settings, as the router's planner takes them (planner.cp_policy_from)."""
        return {
            "policy": self.cp_policy,
            "prefix_cache": self.radix_cache,  # the router's homes are cache-aware
            "page_size": self.page_size,
            "cp_size": self.cp_size,
            "cp_max_degree": self.cp_max_degree,
            "cp_min_shard_tokens": self.cp_min_shard_tokens,
        }

    def _check_choice(self, name: str, choices: tuple[str, ...], optional: bool = False) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        if value not in choices:
            raise ServerArgsError(f"{_flag(name)} must be one of {', '.join(choices)}; got {value!r}")

    def _check_int(self, name: str, minimum: int, optional: bool = False) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ServerArgsError(f"{_flag(name)} must be an integer, got {value!r}")
        if value < minimum:
            raise ServerArgsError(f"{_flag(name)} must be >= {minimum}, got {value}")

    # --------------------------------------------------------------------- CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        a = parser.add_argument
        a("--model-path", type=str, help="Local HF checkpoint directory (config.json + safetensors).")
        a("--tokenizer-path", type=str, help="Tokenizer directory (default: --model-path).")
        a("--dtype", type=str, default=ServerArgs.dtype, choices=DTYPES)
        a("--device", type=str, choices=DEVICES, help="Default: cuda when available, else cpu.")
        a(
            "--load-format",
            type=str,
            default=ServerArgs.load_format,
            choices=LOAD_FORMATS,
            help="'dummy' makes random weights from config.json alone (real-size runs without checkpoints).",
        )
        a("--context-length", type=int, help="Max tokens per request (default: the model's).")
        a("--trust-remote-code", action="store_true")
        a(
            "--skip-tokenizer-init",
            action="store_true",
            help="No tokenizer: requests must give input_ids, outputs carry no text.",
        )
        a("--page-size", type=int, default=ServerArgs.page_size, help="Tokens per KV cache page.")
        a("--max-total-tokens", type=int, help="KV cache capacity in tokens (default: from memory).")
        a(
            "--mem-fraction-static",
            type=float,
            default=ServerArgs.mem_fraction_static,
            help="Fraction of GPU memory for weights + KV cache.",
        )
        a(
            "--chunked-prefill-size",
            type=int,
            default=ServerArgs.chunked_prefill_size,
            help="Max tokens of one forward step (prefill chunks + decodes).",
        )
        a("--max-running-requests", type=int, default=ServerArgs.max_running_requests)
        a(
            "--max-queued-requests",
            type=int,
            default=ServerArgs.max_queued_requests,
            help="Requests waiting on one instance (or in the router's placement queue) beyond which a new "
            "request is refused with 503 and Retry-After (default: no limit)",
        )
        a(
            "--schedule-conservativeness",
            type=float,
            default=ServerArgs.schedule_conservativeness,
            help="Scales the KV reserved for running requests' future outputs when admitting (lower: more "
            "requests admitted, more retractions).",
        )
        a(
            "--schedule-policy",
            type=str,
            default=ServerArgs.schedule_policy,
            choices=SCHEDULE_POLICIES,
            help="Admission order of waiting requests: fcfs, or slo (least remaining slack against "
            "--slo-ttft-ms / --slo-tpot-ms; requests that can no longer meet them go last).",
        )
        a(
            "--slo-ttft-ms",
            type=float,
            default=ServerArgs.slo_ttft_ms,
            help="TTFT target of --schedule-policy slo.",
        )
        a(
            "--slo-tpot-ms",
            type=float,
            default=ServerArgs.slo_tpot_ms,
            help="TPOT target of --schedule-policy slo.",
        )
        a(
            "--long-prefill-token-threshold",
            type=int,
            help="While other prompts wait or prefill, one request runs at most this many prompt tokens per "
            "step (chunks of several requests interleave: no head-of-line blocking behind a long prompt); "
            "0: off. Default: --chunked-prefill-size / 4 on a prefill server, else 0.",
        )
        a("--random-seed", type=int, default=ServerArgs.random_seed)
        a(
            "--attention-backend",
            type=str,
            default=ServerArgs.attention_backend,
            choices=("auto", *ATTENTION_BACKENDS.names()),
        )
        a("--disable-cuda-graph", action="store_true")
        a("--disable-radix-cache", action="store_true", help="Recompute every prompt (no prefix cache).")
        a("--cuda-graph-max-bs", type=int, default=ServerArgs.cuda_graph_max_bs)
        a("--host", type=str, default=ServerArgs.host)
        a("--port", type=int, default=ServerArgs.port)
        a("--served-model-name", type=str, help="Model name in the OpenAI API (default: --model-path).")
        a(
            "--dp-size",
            "--attn-dp-size",
            "--data-parallel-size",
            dest="dp_size",
            type=int,
            default=ServerArgs.dp_size,
            help="Number of instances (data-parallel attention ranks).",
        )
        a(
            "--ep-size",
            "--expert-parallel-size",
            dest="ep_size",
            type=int,
            default=ServerArgs.ep_size,
            help="Expert parallelism: 1 (replicas) or --dp-size (experts sharded over the instances).",
        )
        a("--enable-dp-attention", action="store_true", help="Accepted for SGLang compatibility (always on).")
        a(
            "--tp-size",
            "--tp",
            "--tensor-parallel-size",
            dest="tp_size",
            type=int,
            help="Accepted for SGLang compatibility: must equal --dp-size (or 1); no TP inside an instance.",
        )
        a(
            "--moe-a2a-backend",
            type=str,
            default=ServerArgs.moe_a2a_backend,
            choices=MOE_A2A_BACKENDS.names(),
            help="MoE token exchange between expert-parallel instances: allgather (reference), all_to_all "
            "(NCCL, or CUDA IPC when instances share GPUs), ipc (CUDA-IPC routing backend, no host sync, "
            "graph-capturable), deepep (DeepEP low-latency kernels).",
        )
        a(
            "--deepep-mode",
            type=str,
            default=ServerArgs.deepep_mode,
            choices=DEEPEP_MODES,
            help="With --moe-a2a-backend deepep: auto (low-latency kernels for decode, inside CUDA graphs; "
            "normal kernels for steps larger than the low-latency buffer), low_latency (every step, big ones "
            "chunked), normal (high-throughput kernels every step, no CUDA graphs; 2, 4 or 8 EP ranks).",
        )
        a(
            "--deepep-fp8-dispatch",
            action="store_true",
            help="DeepEP low-latency dispatch sends tokens as FP8 with a scale per 128 channels (half the bytes); "
            "they are dequantized to bf16 on arrival for the experts. Combine stays bf16.",
        )
        a(
            "--moe-runner-backend",
            type=str,
            default=ServerArgs.moe_runner_backend,
            choices=MOE_RUNNER_BACKENDS,
            help="Expert computation: triton (fused grouped GEMM) or torch (per-expert loop, the reference); "
            "auto: triton on CUDA.",
        )
        a(
            "--cp-policy",
            type=str,
            choices=tuple(CP_POLICIES),
            help="Context parallelism: none (static DP), uniform (--cp-size), dynamic (sized per request; "
            "the default when --dp-size > 1).",
        )
        a(
            "--cp-size",
            type=int,
            default=ServerArgs.cp_size,
            help="Instances per request for --cp-policy uniform.",
        )
        a("--cp-max-degree", type=int, default=ServerArgs.cp_max_degree)
        a(
            "--cp-min-shard-tokens",
            type=int,
            default=ServerArgs.cp_min_shard_tokens,
            help="Dynamic CP: requests shorter than this stay on one instance; also the output tokens "
            "a plan covers before the router places the request's next ones (growth).",
        )
        a(
            "--step-trace-file",
            type=str,
            help="Write per-step timings of every instance (JSON lines; instance i appends .i).",
        )

        a(
            "--load-balance-method",
            type=str,
            default=ServerArgs.load_balance_method,
            choices=LOAD_BALANCE_METHODS,
        )
        a("--log-level", type=str, default=ServerArgs.log_level)
        a(
            "--nnodes",
            type=int,
            default=ServerArgs.nnodes,
            help="Nodes of the server (multi-node: see README).",
        )
        a("--node-rank", type=int, default=ServerArgs.node_rank, help="This node's rank; node 0 serves HTTP.")
        a(
            "--dist-init-addr",
            type=str,
            help="HOST:PORT of node 0: the server uses ports PORT..PORT+4 and PORT+10+i for instance i there.",
        )
        a(
            "--nproc-per-node",
            type=int,
            help="Instances per node (default and only value: --dp-size / the nodes that run instances).",
        )
        a(
            "--router-only",
            action="store_true",
            help="Node 0 runs the HTTP server, tokenizer, router and detokenizer only; instances run on "
            "nodes 1..N-1 (give it on every node).",
        )
        a(
            "--worker-only",
            action="store_true",
            help="This node runs instances only (needs --node-rank >= 1).",
        )
        a("--dry-run", action="store_true", help="Check the flags, print which node runs what, and exit.")
        a(
            "--disaggregation-mode",
            type=str,
            default=ServerArgs.disaggregation_mode,
            choices=DISAGGREGATION_MODES,
            help="Prefill/decode disaggregation: null (prefill and decode on the same instances), prefill "
            "(this server only runs prompts, for decode servers), decode (the front door: prompts run on "
            "--disaggregation-prefill-url servers, which write their KV into this server's instances).",
        )
        a(
            "--disaggregation-prefill-url",
            type=str,
            help="Decode servers: the prefill servers' URLs, comma-separated (started first).",
        )
        a(
            "--disaggregation-transfer-backend",
            type=str,
            default=ServerArgs.disaggregation_transfer_backend,
            choices=KV_TRANSFER_BACKENDS.names(),
            help="How KV moves from prefill to decode instances: nixl (UCX; DRAM on CPU, GPU memory on GPU), "
            "torch (torch.distributed's TCPStore, through the hosts: the portable fallback).",
        )
        a(
            "--disaggregation-bootstrap-port",
            type=int,
            default=ServerArgs.disaggregation_bootstrap_port,
            help="Prefill servers: the TCP port decode servers send prompts to.",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ServerArgs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    @classmethod
    def parse(cls, argv: list[str] | None = None, prog: str | None = None) -> ServerArgs:
        """Parse a command line; a bad value exits with a message naming the flag."""
        parser = argparse.ArgumentParser(prog=prog)
        cls.add_cli_args(parser)
        args = parser.parse_args(argv)
        try:
            return cls.from_cli_args(args)
        except ServerArgsError as e:
            parser.error(str(e))
            raise  # unreachable: parser.error exits

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
