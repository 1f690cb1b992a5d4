"""What the router knows of every instance, from the instances' load reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from nanocp_router.messages import Load

# Instances send a load report at most this often (and when they go idle with finished requests);
# between reports the router counts what it dispatched itself (pending_*).
REPORT_INTERVAL_S = 0.5


@dataclass
class InstanceLoad:
    instance: int
    total_pages: int = 0
    free_pages: int = 0
    page_size: int = 1
    running: int = 0  # requests in the running batch
    waiting: int = 0  # requests queued on the instance
    kv_tokens: int = 0  # tokens held in the KV cache
    # KV the instance's requests were promised here but have not allocated yet (placed positions
    # of waiting / running requests): free pages minus these are what a new plan may use, or
    # requests waiting at their homes could be starved by segments reserved after them
    committed_tokens: int = 0
    retractions: int = 0  # requests retracted so far (KV freed, recomputed later)
    step_kinds: dict | None = None  # forward steps so far: eager / graph / graph_dcp
    trace: dict | None = None  # cumulative step timings (--step-trace-file)
    # Requests dispatched since the last report, so back-to-back dispatches see each other.
    pending_requests: int = 0
    pending_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_pages / self.total_pages if self.total_pages else 0.0


@dataclass
class ClusterState:
    instances: list[InstanceLoad] = field(default_factory=list)

    @classmethod
    def create(cls, n: int) -> ClusterState:
        return cls([InstanceLoad(i) for i in range(n)])

    def on_report(self, report: Load) -> None:
        inst = self.instances[report.instance]
        for key in ("total_pages", "free_pages", "page_size", "running", "waiting", "kv_tokens"):
            setattr(inst, key, getattr(report, key))
        inst.committed_tokens = report.committed_tokens
        inst.trace = report.trace
        inst.retractions = report.retractions
        inst.step_kinds = report.step_kinds
        inst.pending_requests = inst.pending_tokens = 0

    def on_dispatch(self, instance: int, num_tokens: int) -> None:
        inst = self.instances[instance]
        inst.pending_requests += 1
        inst.pending_tokens += num_tokens

    def snapshot(self) -> list[dict]:
        return [{**asdict(i), "kv_usage": round(i.kv_usage, 4)} for i in self.instances]
