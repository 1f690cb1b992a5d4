"""How MoE tokens reach the experts of other expert-parallel ranks (--moe-a2a-backend).

Every backend computes, for the tokens of this rank, sum_k w_k * expert_{id_k}(x), where the
experts are spread over the EP ranks (rank r holds experts [r*E/N, (r+1)*E/N)). All ranks call
the backend the same number of times per step (an idle rank with 0 tokens too), so collectives
never deadlock. `global_num_tokens` (every rank's token count this step) comes from the
scheduler's per-step all-gather.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanocp.distributed.parallel_state import ParallelState
from nanocp.engine.step_trace import trace_section

if TYPE_CHECKING:
    from nanocp.layers.moe import FusedMoE


class MoEComm(ABC):
    name = ""

    def __init__(self, state: ParallelState, **_: object) -> None:
        self.state = state

    @abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: FusedMoE,
        global_num_tokens: list[int] | None,
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[[ParallelState], MoEComm]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def create_moe_comm(name: str, state: ParallelState, **kwargs) -> MoEComm | None:
    """None when there is no expert parallelism (every expert is local); DeepEP is used even on
    one rank when asked for (it then dispatches to itself, which is how it is tested on one GPU)."""
    if name not in _REGISTRY:
        raise ValueError(f"--moe-a2a-backend must be one of {', '.join(sorted(_REGISTRY))}; got {name!r}")
    if state.ep_size == 1 and name != "deepep":
        return None
    return _REGISTRY[name](state, **kwargs)


@register("allgather")
class AllGatherMoE(MoEComm):
    """Reference: gather every rank's tokens, apply the local experts to all of them, sum the
    partial results over ranks, keep this rank's rows. Simple and obviously right; moves N x
    the data of all_to_all."""

    def __init__(self, state: ParallelState, **kwargs: object) -> None:
        super().__init__(state)
        if state.group is None:
            raise RuntimeError(
                "--moe-a2a-backend allgather needs one GPU per instance (instances share GPUs here); "
                "use --moe-a2a-backend all_to_all"
            )

    def forward(self, x, topk_weights, topk_ids, experts, global_num_tokens):
        st = self.state
        counts = global_num_tokens or [x.shape[0]] * st.ep_size
        pad = max(counts)

        def gather(t: torch.Tensor, fill: float) -> torch.Tensor:
            padded = torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            padded[: t.shape[0]] = t
            out = [torch.empty_like(padded) for _ in range(st.ep_size)]
            dist.all_gather(out, padded, group=st.group)
            return torch.cat(out)

        with trace_section("moe_comm"):
            gx, gw, gids = gather(x, 0.0), gather(topk_weights, 0.0), gather(topk_ids, -1)
        with trace_section("moe_compute"):
            partial = experts.run_experts(gx, gw, gids, experts.expert_offset)
        with trace_section("moe_comm"):
            dist.all_reduce(partial, group=st.group)
        start = st.ep_rank * pad
        return partial[start : start + x.shape[0]]


@register("all_to_all")
class AllToAllMoE(MoEComm):
    """Send each (token, expert) pair to the expert's rank, run it there, send the result back,
    and combine on the home rank in increasing expert order (the order HF transformers sums in)."""

    def forward(self, x, topk_weights, topk_ids, experts, global_num_tokens):
        st = self.state
        num_tokens, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        dest = torch.div(flat_ids, experts.num_local_experts, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=st.ep_size).to(torch.int64)
        token_of_pair = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
        send_x = x[token_of_pair[order]]
        with trace_section("moe_comm"):  # dispatch
            send_splits = send_counts.tolist()
            recv_splits = st.a2a.exchange_counts(send_splits)
            recv_x = st.a2a.all_to_all(send_x, send_splits, recv_splits)
            recv_ids = st.a2a.all_to_all(flat_ids[order], send_splits, recv_splits)
        with trace_section("moe_compute"):
            y = experts.run_expert_rows(recv_x, recv_ids - experts.expert_offset)
        with trace_section("moe_comm"):  # combine
            back = st.a2a.all_to_all(y, recv_splits, send_splits)
        pairs = torch.empty_like(back)
        pairs[order] = back
        pairs = pairs.view(num_tokens, k, x.shape[1])
        out = torch.zeros_like(x)
        by_expert = torch.argsort(topk_ids, dim=1)
        rows = torch.arange(num_tokens, device=x.device)
        for j in range(k):
            slot = by_expert[:, j]
            out += pairs[rows, slot] * topk_weights[rows, slot, None].to(x.dtype)
        return out


@register("deepep")
class DeepEPMoE(MoEComm):
    """DeepEP low-latency dispatch/combine (NVSHMEM). Tokens go to their experts' ranks packed
    per local expert ([E_local, max_tokens * ranks, hidden], valid rows given by recv_count);
    experts run on the packed rows; combine reduces with the routing weights on the home rank.

    Every rank must call dispatch/combine the same number of times, so a step's tokens are cut
    into ceil(max_r num_tokens_r / max_tokens) chunks computed from the step's global counts.
    """

    SUPPORTED_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)

    def __init__(
        self, state: ParallelState, hidden_size: int = 0, num_experts: int = 0, max_tokens_per_rank: int = 128
    ) -> None:
        super().__init__(state)
        try:
            import deep_ep
        except ImportError as e:
            raise RuntimeError(
                "--moe-a2a-backend deepep needs DeepEP: install it with `pip install nanocp[deepep]` or build it "
                "from source (https://github.com/deepseek-ai/DeepEP); or use --moe-a2a-backend all_to_all"
            ) from e
        if not torch.cuda.is_available() or state.group is None:
            raise RuntimeError("--moe-a2a-backend deepep needs CUDA devices and a NCCL process group")
        if hidden_size not in self.SUPPORTED_HIDDEN:
            raise RuntimeError(
                f"--moe-a2a-backend deepep: hidden size {hidden_size} is not supported by DeepEP's low-latency "
                f"kernels (supported: {', '.join(map(str, self.SUPPORTED_HIDDEN))})"
            )
        n = state.ep_size
        self.num_experts = num_experts
        self.max_tokens = max_tokens_per_rank
        rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
            max_tokens_per_rank, hidden_size, n, num_experts
        )
        self.buffer = deep_ep.Buffer(
            state.group, num_rdma_bytes=rdma_bytes, low_latency_mode=True, num_qps_per_rank=num_experts // n
        )

    def forward(self, x, topk_weights, topk_ids, experts, global_num_tokens):
        counts = global_num_tokens or [x.shape[0]]
        num_chunks = max(1, -(-max(counts) // self.max_tokens))
        outs = []
        for c in range(num_chunks):
            sl = slice(c * self.max_tokens, (c + 1) * self.max_tokens)
            outs.append(self._run(x[sl], topk_weights[sl], topk_ids[sl], experts))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _run(self, x, topk_weights, topk_ids, experts):
        ids = topk_ids.to(torch.int64)
        with trace_section("moe_comm"):
            recv_x, recv_count, handle, _, _ = self.buffer.low_latency_dispatch(
                x.to(torch.bfloat16).contiguous(), ids, self.max_tokens, self.num_experts, use_fp8=False
            )
        with trace_section("moe_compute"):
            # packed layout: expert e's tokens are rows [0, recv_count[e]) of recv_x[e]
            num_local, cap, hidden = recv_x.shape
            slot = torch.arange(cap, device=recv_x.device)
            row_expert = torch.arange(num_local, device=recv_x.device)[:, None].expand(num_local, cap)
            row_expert = torch.where(slot[None, :] < recv_count[:, None], row_expert, -1).reshape(-1)
            y = experts.run_expert_rows(recv_x.view(-1, hidden), row_expert).view(num_local, cap, hidden)
        with trace_section("moe_comm"):
            out, _, _ = self.buffer.low_latency_combine(y, ids, topk_weights.float(), handle)
        return out.to(x.dtype)
