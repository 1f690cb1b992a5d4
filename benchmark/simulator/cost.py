"""Step-cost model of one instance: attention over the KV it reads, dense + expert layers at its
batch, MoE all-to-all, context-parallel routing. Analytic roofline from a model shape and a device,
or fitted profiles (JSON) measured by the GPU benchmarks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    kv_bytes_per_token_layer: int  # K+V (or compressed latent) bytes of one token in one layer
    attn_params_per_layer: int  # q/k/v/o (or MLA) projections, replicated on every instance
    dense_params: int  # embeddings, lm head, dense MLP layers (replicated)
    num_experts: int
    top_k: int
    expert_params: int  # one expert of one layer
    num_moe_layers: int
    bytes_per_param: int = 2


# Public configs (bf16 weights); only the sizes matter here.
QWEN3_235B = ModelShape(
    "Qwen3-235B-A22B",
    num_layers=94,
    hidden=4096,
    kv_bytes_per_token_layer=2 * 4 * 128 * 2,
    attn_params_per_layer=4096 * (64 * 128 + 2 * 4 * 128) + 64 * 128 * 4096,
    dense_params=2 * 151_936 * 4096,
    num_experts=128,
    top_k=8,
    expert_params=3 * 4096 * 1536,
    num_moe_layers=94,
)
DEEPSEEK_V3 = ModelShape(
    "DeepSeek-V3",
    num_layers=61,
    hidden=7168,
    kv_bytes_per_token_layer=(512 + 64) * 2,
    attn_params_per_layer=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168,
    dense_params=2 * 129_280 * 7168 + 3 * 3 * 7168 * 18_432,
    num_experts=256 + 1,
    top_k=8 + 1,
    expert_params=3 * 7168 * 2048,
    num_moe_layers=58,
    bytes_per_param=1,  # FP8 weights, as DeepSeek-V3 is deployed
)

QWEN3_30B = ModelShape(
    "Qwen3-30B-A3B",
    num_layers=48,
    hidden=2048,
    kv_bytes_per_token_layer=2 * 4 * 128 * 2,
    attn_params_per_layer=2048 * (32 * 128 + 2 * 4 * 128) + 32 * 128 * 2048,
    dense_params=2 * 151_936 * 2048,
    num_experts=128,
    top_k=8,
    expert_params=3 * 2048 * 768,
    num_moe_layers=48,
)
MODELS = {m.name: m for m in (QWEN3_235B, DEEPSEEK_V3, QWEN3_30B)}


@dataclass(frozen=True)
class Device:
    name: str
    mem_bw: float  # bytes/s achieved by large reads
    flops: float  # dense bf16 flop/s achieved
    link_bw: float  # bytes/s per GPU for the MoE all-to-all
    link_latency: float  # s per collective call
    kernel_overhead: float  # s per small kernel (per request shard per layer, graph-replayed)


# mem_bw: measured copy bandwidth; kernel_overhead: time a batched decode-attention kernel spends
# per request shard beyond reading its KV, measured 35-125 ns on H200 (attention_bandwidth_h200.json,
# 128-512 shards per kernel); link figures are NVLink-class estimates (no multi-GPU runs yet).
H200 = Device(
    "H200", mem_bw=4.27e12, flops=6.0e14, link_bw=3.0e11, link_latency=1.5e-5, kernel_overhead=1.0e-7
)


@dataclass(frozen=True)
class CostModel:
    """All times in seconds, for one lockstep step."""

    model: ModelShape
    device: Device
    num_instances: int
    hbm_bytes: float = 141e9

    def attention(self, kv_tokens: int, num_shards: int) -> float:
        m, d = self.model, self.device
        return (
            kv_tokens * m.kv_bytes_per_token_layer * m.num_layers / d.mem_bw
            + num_shards * m.num_layers * d.kernel_overhead
        )

    def dense(self, batch_tokens: int, cluster_tokens: int) -> float:
        """Replicated weights + this instance's experts touched by the cluster's tokens."""
        m, d = self.model, self.device
        local_experts = m.num_experts / self.num_instances
        routed = cluster_tokens * m.top_k / m.num_experts  # tokens per expert
        touched = (
            local_experts * (1 - math.exp(-routed)) if cluster_tokens else 0.0
        )  # experts hit at least once
        weight_bytes = (m.attn_params_per_layer * m.num_layers + m.dense_params) * m.bytes_per_param
        expert_bytes = touched * m.expert_params * m.num_moe_layers * m.bytes_per_param
        active = (
            m.attn_params_per_layer * m.num_layers
            + m.dense_params / 2
            + m.top_k * m.expert_params * m.num_moe_layers
        )
        return max((weight_bytes + expert_bytes) / d.mem_bw, 2 * active * batch_tokens / d.flops)

    def moe_comm(self, max_batch_tokens: int) -> float:
        if self.num_instances == 1:
            return 0.0
        m, d = self.model, self.device
        bytes_per_layer = 2 * max_batch_tokens * m.top_k * m.hidden * m.bytes_per_param  # dispatch + combine
        return m.num_moe_layers * (2 * d.link_latency + bytes_per_layer / d.link_bw)

    def routing(self, foreign_queries: int) -> float:
        """Queries served for other homes: q out, (o, lse) back, per layer (rides the a2a)."""
        if foreign_queries == 0:
            return 0.0
        m, d = self.model, self.device
        bytes_per_layer = foreign_queries * 2 * m.hidden * m.bytes_per_param
        return m.num_layers * (d.link_latency + bytes_per_layer / d.link_bw)

    def routing_step(self) -> float:
        """Fixed cost of a step with context-parallel routing (in `routing` per layer here)."""
        return 0.0

    combine = "max"  # every instance has its own device: the slowest one sets the step

    def prefill(self, tokens: int) -> float:
        m, d = self.model, self.device
        active = m.attn_params_per_layer * m.num_layers + m.top_k * m.expert_params * m.num_moe_layers
        return 2 * active * tokens / d.flops

    def prefill_attention(self, pairs: int) -> float:
        """Causal attention of prefill chunks: 4 flop per query-key pair per hidden unit and layer."""
        m, d = self.model, self.device
        return 4 * pairs * m.hidden * m.num_layers / d.flops

    def kv_capacity_tokens(self) -> int:
        m = self.model
        weights = (
            (m.attn_params_per_layer * m.num_layers + m.dense_params)
            + m.num_experts / self.num_instances * m.expert_params * m.num_moe_layers
        ) * m.bytes_per_param
        free = 0.9 * self.hbm_bytes - weights
        if free <= 0:
            raise ValueError(f"{m.name} does not fit on {self.num_instances} x {self.device.name}")
        return int(free // (m.kv_bytes_per_token_layer * m.num_layers))

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": asdict(self.model),
                "device": asdict(self.device),
                "num_instances": self.num_instances,
                "hbm_bytes": self.hbm_bytes,
            }
        )

    @classmethod
    def from_json(cls, path: str | Path) -> CostModel:
        d = json.loads(Path(path).read_text())
        return cls(
            ModelShape(**d["model"]), Device(**d["device"]), d["num_instances"], d.get("hbm_bytes", 141e9)
        )


@dataclass(frozen=True)
class ProfileCost:
    """Step costs fitted to measurements of a real deployment (benchmark.sim_validate writes
    one from a run's step traces; the GPU benchmarks write the same format). Linear in the work:
        attention = per_kv_token * KV tokens read by decodes
                    + per_prefill_pair * query-key pairs of prefill chunks
                    + per_request * requests/shards attended
        compute   = base + per_token * tokens run (dense layers, local experts, step overhead)
        moe_comm  = base + per_token * the largest instance's tokens
        routing   = per_query * queries served for other homes
                    + routing_step on every instance in a step where any request is sharded
                      (the lockstep q / KV / (o, lse) exchanges run on all instances)
    The simulator's interface is CostModel's; prefill work is in `compute` and `attention`."""

    num_instances: int
    kv_capacity: int
    attn_per_kv_token_s: float
    attn_per_request_s: float
    compute_base_s: float
    compute_per_token_s: float
    moe_comm_base_s: float
    moe_comm_per_token_s: float
    routing_per_query_s: float
    routing_step_s: float = 0.0
    attn_per_prefill_pair_s: float | None = None  # None: same as attn_per_kv_token_s
    # "max": one device per instance, the slowest sets the step; "shared": the instances share
    # `cores` CPU cores, one each at most: step = max(cores * max_i w_i, sum_i w_i), with the
    # coefficients in host-seconds (fitted to the summed work)
    combine: str = "max"
    cores: int = 1
    device: str = ""
    source: str = ""

    def attention(self, kv_tokens: int, num_shards: int) -> float:
        return self.attn_per_kv_token_s * kv_tokens + self.attn_per_request_s * num_shards

    def prefill_attention(self, pairs: int) -> float:
        per = self.attn_per_prefill_pair_s
        return (self.attn_per_kv_token_s if per is None else per) * pairs

    def dense(self, batch_tokens: int, cluster_tokens: int) -> float:
        return self.compute_base_s + self.compute_per_token_s * batch_tokens

    def prefill(self, tokens: int) -> float:
        return 0.0

    def moe_comm(self, max_batch_tokens: int) -> float:
        if self.num_instances == 1:
            return 0.0
        return self.moe_comm_base_s + self.moe_comm_per_token_s * max_batch_tokens

    def routing(self, foreign_queries: int) -> float:
        return self.routing_per_query_s * foreign_queries

    def routing_step(self) -> float:
        return self.routing_step_s

    def kv_capacity_tokens(self) -> int:
        return self.kv_capacity

    def to_json(self) -> str:
        return json.dumps({"kind": "profile", **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, path: str | Path, num_instances: int | None = None) -> ProfileCost:
        d = json.loads(Path(path).read_text())
        d.pop("kind", None)
        if num_instances is not None:
            d["num_instances"] = num_instances
        return cls(**d)
