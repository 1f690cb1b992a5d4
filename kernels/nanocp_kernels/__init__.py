"""NanoCP kernels: torch references first; Triton / FlashInfer versions are checked against them."""

import importlib
import os

from nanocp_kernels.reference import expert_ffn_ref, fused_moe_ref, merge_states_ref, paged_attention_ref

__all__ = [
    "expert_ffn_ref",
    "fused_moe_ref",
    "merge_states_ref",
    "paged_attention_ref",
    "has_triton",
    "triton_runs_on",
]


def has_triton() -> bool:
    """Whether triton imports (a CPU-only torch wheel, macOS, ... ship none)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_runs_on(device) -> bool:
    """Whether the Triton kernels can run on `device` (a torch.device): triton is installed and the
    device is CUDA, or the CPU under Triton's interpreter (TRITON_INTERPRET=1, which tests set
    before any kernel is imported)."""
    return has_triton() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
