"""All environment variables NanoCP reads, in one place (prefix ``NANOCP_``)."""

from __future__ import annotations

import os
from pathlib import Path


def _get(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(name: str) -> bool | None:
    """A boolean switch: unset or empty -> None (the caller's default), "0"/"false" -> False."""
    value = _get(name, "")
    return None if value == "" else value not in ("0", "false", "False")


def cpu_kv_cache_gb() -> float:
    """KV cache budget on CPU when --max-total-tokens is not given (GiB)."""
    return float(_get("NANOCP_CPU_KV_CACHE_GB", "1.0"))


def cache_dir() -> Path:
    """Where NanoCP keeps generated artefacts (demo model, test models)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanocp"
    return Path(_get("NANOCP_CACHE_DIR", str(default)))


def log_level() -> str:
    return _get("NANOCP_LOG_LEVEL", "info")


def startup_timeout_s() -> float:
    """How long launch_server waits for its instances to load."""
    return float(_get("NANOCP_STARTUP_TIMEOUT_S", "900"))


def routing_buffer_bytes() -> int:
    """Receive buffer per source rank of the CUDA-IPC routing backend (instances sharing GPUs)."""
    return int(float(_get("NANOCP_ROUTING_BUFFER_MB", "64")) * 2**20)


def mps_active() -> bool:
    """An MPS control daemon is running for this user (its pipe exists): CUDA processes sharing a
    GPU then run concurrently instead of in time slices."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return (Path(pipe_dir) / "control").exists()


def shared_gpu_sync() -> str:
    """How CUDA-IPC routing ranks that share one GPU synchronize an eager all-to-all: "host" (a
    gloo barrier) or "device" (flags, as across GPUs). Time-sliced processes make a device spin
    wait cost a ~2 ms slice, so unset means "device" under MPS and "host" otherwise."""
    value = _get("NANOCP_SHARED_GPU_SYNC", "")
    if value == "":
        return "device" if mps_active() else "host"
    if value not in ("host", "device"):
        raise ValueError(f"NANOCP_SHARED_GPU_SYNC must be 'host' or 'device', not {value!r}")
    return value


def flashinfer_decode_tensor_cores() -> bool | None:
    """FlashInfer decode on its tensor-core kernels: "1"/"0" force it, unset decides from the GQA
    group size (4+ query heads per KV head: tensor cores, as SGLang does)."""
    return _flag("NANOCP_FLASHINFER_DECODE_TENSOR_CORES")


def small_batch_kernels() -> bool:
    """Decode batches of a few tokens run the GEMV projections and the two-launch MoE
    (nanocp_kernels.gemv / small_moe) on CUDA; "0" keeps cuBLAS and the grouped-GEMM MoE."""
    return _flag("NANOCP_SMALL_BATCH_KERNELS") is not False


def pdl() -> bool | None:
    """The decode path's Triton kernels use programmatic dependent launch (each may start while
    its predecessor drains; nanocp_kernels.launch): "1"/"0" force it, unset: on from Hopper (sm90)."""
    return _flag("NANOCP_PDL")


def fault_inject() -> str:
    """Test-only fault injection (nanocp_router.faults): comma-separated faults, each
    "forward:INSTANCE:STEP" / "sample:INSTANCE:STEP" (raise in that instance's STEP-th non-idle
    forward, at its start / in sampling) or "LOOP:RID" with LOOP one of worker, router, tokenizer,
    detokenizer (raise while that process handles request RID) or transfer (a prefill instance
    writing the KV of the decode server's request RID). Unset: no faults."""
    return _get("NANOCP_FAULT_INJECT", "")


def max_request_body_bytes() -> int:
    """Largest HTTP request body the server reads (larger: 413)."""
    return int(float(_get("NANOCP_MAX_REQUEST_BODY_MB", "64")) * 2**20)


def disaggregation_timeout_s() -> float:
    """A decode server fails a request whose prefill and KV transfer take longer (HTTP 504)."""
    return float(_get("NANOCP_DISAGGREGATION_TIMEOUT_S", "600"))
