"""How MoE tokens reach the experts of other expert-parallel ranks (--moe-a2a-backend).

Every backend computes, for the tokens of this rank, sum_k w_k * expert_{id_k}(x), where the
experts are spread over the EP ranks (rank r holds experts [r*E/N, (r+1)*E/N)). All ranks call
the backend the same number of times per step (an idle rank with 0 tokens too), so collectives
never deadlock. `global_num_tokens` (every rank's token count this step) comes from the
scheduler's per-step all-gather.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import Protocol

import torch
import torch.distributed as dist

from nanocp.distributed.parallel_state import ParallelState
from nanocp.engine.step_trace import trace_section
from nanocp.registries import MOE_A2A_BACKENDS


class LocalExperts(Protocol):
    """What an exchange runs on this rank (layers/moe's FusedMoE): its slice of the experts."""

    num_local_experts: int
    expert_offset: int  # global id of local expert 0

    def run_experts(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_offset: int
    ) -> torch.Tensor: ...

    def run_expert_rows(
        self,
        x: torch.Tensor,
        local_ids: torch.Tensor,
        out: torch.Tensor | None = None,
        max_rows: int | None = None,
        fill_unused: bool = True,
    ) -> torch.Tensor: ...


class MoEComm(ABC):
    """A MoE token exchange between expert-parallel ranks; backends declare what they need."""

    name = ""
    graph_capturable = False  # no host sync: a decode step with it can be captured in a CUDA graph
    max_tokens = 0  # tokens per rank per call (graph-capturable backends)
    needs_cuda = False
    shares_gpus = False  # runs with several instances on one GPU (NCCL refuses two ranks per GPU)

    @classmethod
    def check_config(cls, ep_size: int, deepep_mode: str) -> None:
        """Raise ValueError naming the flag if the backend cannot run this configuration here."""
        return None  # most run any

    def __init__(self, state: ParallelState, **_: object) -> None:
        self.state = state

    def prepare_replay(self) -> None:
        """Called before a CUDA graph with this backend inside replays (no Python runs then)."""
        return None  # most backends keep no state between calls

    @abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: LocalExperts,
        global_num_tokens: list[int] | None,
    ) -> torch.Tensor: ...


def register(name: str):
    """Class decorator adding an exchange to the registry (nanocp.registries) under `name`."""

    def deco(cls):
        cls.name = name
        return MOE_A2A_BACKENDS.register(name, cls)

    return deco


def moe_a2a_backends() -> dict[str, type[MoEComm]]:
    """Every registered exchange's class by name (the --moe-a2a-backend choices)."""
    return MOE_A2A_BACKENDS.classes()


def create_moe_comm(name: str, state: ParallelState, force: bool = False, **kwargs) -> MoEComm | None:
    """None when there is no expert parallelism (every expert is local); DeepEP is used even on
    one rank when asked for (it then dispatches to itself, which is how it is tested on one GPU),
    and so is any backend with force (benchmarks: its cost on one rank)."""
    cls = MOE_A2A_BACKENDS.get(name)
    if state.ep_size == 1 and name != "deepep" and not force:
        return None
    return cls(state, **kwargs)


class AllGatherMoE(MoEComm):
    """Reference: gather every rank's tokens, apply the local experts to all of them, sum the
    partial results over ranks, keep this rank's rows. Simple and obviously right; moves N x
    the data of all_to_all."""

    name = "allgather"

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


class AllToAllMoE(MoEComm):
    """Send each (token, expert) pair to the expert's rank, run it there, send the result back,
    and combine on the home rank in increasing expert order (the order HF transformers sums in)."""

    name = "all_to_all"

    shares_gpus = True  # ranks on one GPU exchange through CUDA IPC (ParallelState.a2a)

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
        return combine_pairs(pairs.view(num_tokens, k, x.shape[1]), topk_weights, topk_ids)


def combine_pairs(
    pairs: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_k w_k * pairs[:, k], added in increasing expert order (HF's order: exact fp32 parity).
    pairs [T, k, H], or with rows: any [*, H] buffer where pair (t, j) is row rows[t, j]."""
    if pairs.is_cuda:  # one launch (it runs once per MoE layer)
        from nanocp_kernels.dispatch import combine_rows

        src = pairs if rows is not None else pairs.reshape(-1, pairs.shape[-1])
        return combine_rows(src, topk_weights, topk_ids, rows)
    if rows is not None:
        pairs = pairs[rows]
    num_tokens, k, hidden = pairs.shape
    by_expert = torch.argsort(topk_ids, dim=1)
    # every product rounded on its own, then added one expert after the other (no fused
    # multiply-add, no tree reduction), as HF does
    w = topk_weights.gather(1, by_expert).to(pairs.dtype)
    terms = pairs.gather(1, by_expert[..., None].expand(num_tokens, k, hidden)) * w[..., None]
    out = terms[:, 0]
    for j in range(1, k):
        out = out + terms[:, j]
    return out.contiguous()


def in_chunks(run, x, topk_weights, topk_ids, experts, global_num_tokens: list[int] | None, chunk: int):
    """run(x, w, ids, experts) over chunks of at most `chunk` tokens; every rank makes
    ceil(max_r num_tokens_r / chunk) calls (from the step's global counts), empty ones included."""
    counts = global_num_tokens or [x.shape[0]]
    outs = []
    for c in range(max(1, -(-max(counts) // chunk))):
        sl = slice(c * chunk, (c + 1) * chunk)
        outs.append(run(x[sl], topk_weights[sl], topk_ids[sl], experts))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class FixedCapacityMoE(MoEComm):
    """Backends whose buffers hold at most max_tokens tokens per rank per call, with device-side
    counts (graph-capturable). Every rank must call them equally often, so a step's tokens are cut
    into ceil(max_r num_tokens_r / max_tokens) chunks computed from the step's global counts."""

    graph_capturable = True

    def __init__(self, state: ParallelState, max_tokens_per_rank: int = 128, **_: object) -> None:
        super().__init__(state)
        self.max_tokens = max_tokens_per_rank

    def forward(self, x, topk_weights, topk_ids, experts, global_num_tokens):
        return in_chunks(self._run, x, topk_weights, topk_ids, experts, global_num_tokens, self.max_tokens)

    @abstractmethod
    def _run(self, x, topk_weights, topk_ids, experts) -> torch.Tensor: ...


class IpcMoE(FixedCapacityMoE):
    """The routing backend for MoE: each (token, expert) pair is written straight into its expert
    rank's receive block (CUDA IPC, NVLink between GPUs) by IpcAllToAll.exchange, with the local
    expert id in the row's last word; results come back into the same block positions. No host
    sync anywhere, so a decode step with it can be captured in a CUDA graph.

    Steps where some rank has more than max_tokens tokens (prefill chunks: always eager) take
    the variable-size all_to_all of `ParallelState.a2a` instead, in as few calls as its buffers
    allow. Cut into max_tokens-token blocks, each block would read every local expert's weights
    again: a 4k-token chunk on Qwen3-30B-A3B took 1.7 s of expert time instead of ~50 ms."""

    name = "ipc"

    needs_cuda = True
    shares_gpus = True

    def __init__(
        self,
        state: ParallelState,
        hidden_size: int = 0,
        max_tokens_per_rank: int = 128,
        top_k: int = 8,
        dtype: torch.dtype = torch.bfloat16,
        **_: object,
    ) -> None:
        super().__init__(state, max_tokens_per_rank)
        from nanocp.distributed.ipc_comm import IpcAllToAll

        if state.device is None or state.device.type != "cuda":
            raise RuntimeError("--moe-a2a-backend ipc needs CUDA devices; use all_to_all")
        n, dev = state.ep_size, state.device
        self.cap = max_tokens_per_rank * top_k  # every pair of every token may go to one rank
        self.words = hidden_size * dtype.itemsize // 4  # row payload in int32 words
        self.comm = IpcAllToAll(
            state.rank,
            n,
            state.cpu_group,
            dev,
            capacity_bytes=16,
            graph_capacity_bytes=self.cap * 4 * (self.words + 1),
        )
        self.send = torch.zeros(n, self.cap, self.words + 1, dtype=torch.int32, device=dev)
        self.recv = torch.zeros_like(self.send)
        self.out = torch.zeros(n, self.cap, hidden_size, dtype=dtype, device=dev)
        self.back = torch.zeros_like(self.out)
        self.counts = torch.zeros(n, dtype=torch.int64, device=dev)
        self.recv_counts = torch.zeros_like(self.counts)
        self.back_counts = torch.zeros_like(self.counts)
        self.large = AllToAllMoE(state) if state.a2a is not None else None
        # tokens per variable-size call: every pair of every token may go to one peer, whose
        # receive buffer (IPC) holds `capacity` bytes; NCCL's all_to_all has no such bound
        capacity = getattr(state.a2a, "capacity", None)
        row_bytes = hidden_size * dtype.itemsize
        self.large_chunk = max(max_tokens_per_rank, capacity // (top_k * row_bytes)) if capacity else 1 << 30

    def forward(self, x, topk_weights, topk_ids, experts, global_num_tokens):
        if self.large is None or max(global_num_tokens or [x.shape[0]]) <= self.max_tokens:
            return super().forward(x, topk_weights, topk_ids, experts, global_num_tokens)
        run = lambda *a: self.large.forward(*a, None)  # noqa: E731
        return in_chunks(run, x, topk_weights, topk_ids, experts, global_num_tokens, self.large_chunk)

    def _run(self, x, topk_weights, topk_ids, experts):
        from nanocp_kernels.dispatch import pack_pairs

        n, cap, words = self.state.ep_size, self.cap, self.words
        num_tokens, k = topk_ids.shape
        with trace_section("moe_comm"):  # dispatch: pairs packed into their ranks' blocks
            self.counts.zero_()
            x_words = x.to(self.out.dtype).contiguous().view(torch.int32)
            pos = pack_pairs(x_words, topk_ids, experts.num_local_experts, self.send, self.counts)
            self.comm.exchange(self.send, self.counts, self.recv, self.recv_counts)
        with trace_section("moe_compute"):
            rows = self.recv.view(n * cap, words + 1)
            slot = torch.arange(cap, device=x.device)
            valid = (slot[None, :] < self.recv_counts[:, None]).reshape(-1)
            local_ids = torch.where(valid, rows[:, words].to(torch.int64), -1)
            xr = rows[:, :words].view(self.out.dtype)  # strided rows, read in place by the GEMM
            # rows past a source's count are never sent back: left as they are
            experts.run_expert_rows(xr, local_ids, out=self.out.view(n * cap, -1), fill_unused=False)
        with trace_section("moe_comm"):  # combine: results return to the same block positions
            self.comm.exchange(self.out, self.recv_counts, self.back, self.back_counts)
        # pair (t, j)'s result is row pos[t, j] of the returned blocks (may be 0 tokens)
        return combine_pairs(self.back.view(n * cap, -1), topk_weights, topk_ids, pos.view(num_tokens, k)).to(
            x.dtype
        )


class DeepEPMoE(FixedCapacityMoE):
    """DeepEP on one Buffer (NVSHMEM + NVLink).

    Low-latency kernels (decode, graph-capturable): tokens go to their experts' ranks packed per
    local expert ([E_local, max_tokens * ranks, hidden], valid rows given by recv_count); experts
    run on the packed rows; combine reduces with the routing weights on the home rank.
    Normal (high-throughput, intranode) kernels: each token goes once to every rank holding one of
    its experts, with its top-k ids made local (-1 elsewhere) and weights; the rank applies its
    experts with the weights (fused MoE), combine sums the ranks' partial results. Exact sizes,
    host-synchronised (eager only); DeepEP supports them on 2, 4 or 8 ranks per node.
    --deepep-mode auto: normal kernels for a step in which some rank has more tokens than the
    low-latency buffer holds (prefill), low-latency otherwise; low_latency: chunked low-latency
    every step; normal: normal kernels every step (no CUDA graphs). Every rank decides alike from
    the step's global token counts. After a normal step the low-latency buffer is cleaned before
    its next use (eager call or graph replay: `prepare_replay`), as DeepEP requires."""

    name = "deepep"

    SUPPORTED_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
    MAX_TOP_K = 11  # the low-latency kernels' limit
    NORMAL_RANKS = (2, 4, 8)
    needs_cuda = True

    @classmethod
    def check_config(cls, ep_size: int, deepep_mode: str) -> None:
        """DeepEP's one availability check (ServerArgs, and this backend when it starts): the normal
        kernels' rank counts (auto runs them on more than one rank), and DeepEP installed."""
        if (
            deepep_mode == "normal" or (deepep_mode == "auto" and ep_size > 1)
        ) and ep_size not in cls.NORMAL_RANKS:
            ranks = f"{', '.join(map(str, cls.NORMAL_RANKS[:-1]))} or {cls.NORMAL_RANKS[-1]}"
            raise ValueError(
                f"--deepep-mode {deepep_mode}: DeepEP's normal kernels need {ranks} EP ranks on one node, got --ep-size {ep_size}; use --deepep-mode low_latency"
            )
        if importlib.util.find_spec("deep_ep") is None:
            raise ValueError(
                "--moe-a2a-backend deepep needs DeepEP: install it with `pip install nanocp[deepep]` or build it "
                "from source (https://github.com/deepseek-ai/DeepEP); or use --moe-a2a-backend all_to_all"
            )

    def __init__(
        self,
        state: ParallelState,
        hidden_size: int = 0,
        num_experts: int = 0,
        max_tokens_per_rank: int = 128,
        deepep_mode: str = "auto",
        top_k: int = 8,
        deepep_fp8_dispatch: bool = False,
        **_: object,
    ) -> None:
        super().__init__(state, max_tokens_per_rank)
        self.check_config(state.ep_size, deepep_mode)
        import deep_ep

        if not torch.cuda.is_available() or state.group is None:
            raise RuntimeError("--moe-a2a-backend deepep needs CUDA devices and a NCCL process group")
        n = state.ep_size
        self.low_latency = deepep_mode in ("auto", "low_latency")
        # auto on one rank: nothing to exchange, big steps run the low-latency kernels in chunks
        self.normal = deepep_mode == "normal" or (deepep_mode == "auto" and n > 1)
        if self.low_latency and hidden_size not in self.SUPPORTED_HIDDEN:
            raise RuntimeError(
                f"--moe-a2a-backend deepep: hidden size {hidden_size} is not supported by DeepEP's low-latency "
                f"kernels (supported: {', '.join(map(str, self.SUPPORTED_HIDDEN))}); try --deepep-mode normal"
            )
        if self.low_latency and top_k > self.MAX_TOP_K:
            raise RuntimeError(
                f"--moe-a2a-backend deepep: {top_k} experts per token exceed the low-latency kernels' "
                f"{self.MAX_TOP_K}; try --deepep-mode normal"
            )
        self.graph_capturable = self.low_latency
        self.num_experts, self.hidden_size = num_experts, hidden_size
        nvl_bytes = rdma_bytes = 0
        if self.normal:
            configs = (deep_ep.Buffer.get_dispatch_config(n), deep_ep.Buffer.get_combine_config(n))
            nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_size * 2, n) for c in configs)
        if self.low_latency:
            rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
                max_tokens_per_rank, hidden_size, n, num_experts
            )
        self.buffer = deep_ep.Buffer(
            state.group,
            num_nvl_bytes=nvl_bytes,
            num_rdma_bytes=rdma_bytes,
            low_latency_mode=self.low_latency,
            num_qps_per_rank=num_experts // n if self.low_latency else 1,
        )
        self.use_fp8 = deepep_fp8_dispatch
        self._dequant: torch.Tensor | None = None  # bf16 copy of the FP8 receive layout, built once
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dirty = False  # a normal step ran since the low-latency buffer was last clean

    def forward(self, x, topk_weights, topk_ids, experts, global_num_tokens):
        big = max(global_num_tokens or [x.shape[0]]) > self.max_tokens
        if self.normal and (big or not self.low_latency):
            return self._run_normal(x, topk_weights, topk_ids, experts)
        self.prepare_replay()
        return super().forward(x, topk_weights, topk_ids, experts, global_num_tokens)

    def prepare_replay(self) -> None:
        """Called before low-latency use (also before a CUDA-graph replay, where no Python runs)."""
        if self._dirty:
            self.buffer.clean_low_latency_buffer(self.max_tokens, self.hidden_size, self.num_experts)
            self._dirty = False

    def _run_normal(self, x, topk_weights, topk_ids, experts):
        num_tokens = x.shape[0]
        ids = topk_ids.to(torch.int64)
        if num_tokens == 0:  # an idle rank still joins the exchange: one token that selects no expert
            x = x.new_zeros((1, x.shape[1]))
            ids = ids.new_full((1, ids.shape[1]), -1)
            topk_weights = topk_weights.new_zeros((1, ids.shape[1]))
        with trace_section("moe_comm"):
            per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(ids, self.num_experts)
            recv_x, recv_ids, recv_w, _, handle, _ = self.buffer.dispatch(
                x.to(torch.bfloat16).contiguous(),
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=ids,
                topk_weights=topk_weights.float(),
            )
        self._dirty = self.low_latency
        with trace_section("moe_compute"):
            # recv_ids are local expert ids, -1 for experts on other ranks (their pairs give 0)
            y = experts.run_experts(recv_x, recv_w, recv_ids, 0) if recv_x.shape[0] else recv_x
        with trace_section("moe_comm"):
            out, _, _ = self.buffer.combine(y.to(torch.bfloat16).contiguous(), handle)
        return out[:num_tokens].to(x.dtype)

    def _packed_index(self, num_local: int, cap: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, local expert) of every row of the packed receive layout, built once."""
        if self._index is None or self._index[0].shape != (num_local, cap):
            slot = torch.arange(cap, device=device)[None, :].expand(num_local, cap)
            expert = torch.arange(num_local, device=device)[:, None].expand(num_local, cap)
            self._index = (slot.contiguous(), expert.contiguous())
        return self._index

    def _dequantize(self, xq: torch.Tensor, scales: torch.Tensor, recv_count: torch.Tensor) -> torch.Tensor:
        """Received FP8 rows (below each expert's count) to bf16, into a buffer kept across calls."""
        from nanocp_kernels.dispatch import dequant_packed_fp8

        if self._dequant is None or self._dequant.shape != xq.shape:
            self._dequant = torch.empty(xq.shape, dtype=torch.bfloat16, device=xq.device)
        return dequant_packed_fp8(xq, scales, recv_count, self._dequant)

    def _run(self, x, topk_weights, topk_ids, experts):
        ids = topk_ids.to(torch.int64)
        with trace_section("moe_comm"):
            recv_x, recv_count, handle, _, _ = self.buffer.low_latency_dispatch(
                x.to(torch.bfloat16).contiguous(),
                ids,
                self.max_tokens,
                self.num_experts,
                use_fp8=self.use_fp8,
            )
        with trace_section("moe_compute"):
            if self.use_fp8:
                recv_x = self._dequantize(*recv_x, recv_count)
            # packed layout: expert e's tokens are rows [0, recv_count[e]) of recv_x[e]; at most
            # ranks * max_tokens * min(k, local experts) rows are used, and combine reads only those
            num_local, cap, hidden = recv_x.shape
            slot, expert = self._packed_index(num_local, cap, recv_x.device)
            row_expert = torch.where(slot < recv_count[:, None], expert, -1).view(-1)
            max_rows = self.state.ep_size * self.max_tokens * min(topk_ids.shape[1], num_local)
            y = experts.run_expert_rows(
                recv_x.view(-1, hidden), row_expert, max_rows=max_rows, fill_unused=False
            ).view(num_local, cap, hidden)
        with trace_section("moe_comm"):
            out, _, _ = self.buffer.low_latency_combine(y, ids, topk_weights.float(), handle)
        return out.to(x.dtype)
