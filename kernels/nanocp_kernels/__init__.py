"""NanoCP kernels: torch references first; Triton / FlashInfer versions are checked against them."""

from nanocp_kernels.reference import expert_ffn_ref, fused_moe_ref, merge_states_ref, paged_attention_ref

__all__ = ["expert_ffn_ref", "fused_moe_ref", "merge_states_ref", "paged_attention_ref"]
