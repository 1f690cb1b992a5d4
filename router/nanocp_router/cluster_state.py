"""What the router knows of every instance, from the instances' load reports, indexed for the
planner: the instances by home load and by used KV, and the cluster's total used KV, kept up to
date on every change of an instance's load fields (so a plan costs O(degree log N), not a scan).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
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
    cached_pages: int = 0  # the prefix cache's pages (the evictable ones count in free_pages)
    cache_hit_tokens: int = 0  # admitted prompt tokens found cached / all admitted, since start
    cache_query_tokens: int = 0
    step_kinds: dict | None = None  # forward steps so far: eager / graph / graph_dcp
    trace: dict | None = None  # cumulative step timings (--step-trace-file)
    # Requests dispatched since the last report, so back-to-back dispatches see each other.
    pending_requests: int = 0
    pending_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_pages / self.total_pages if self.total_pages else 0.0

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        owner = self.__dict__.get("_owner")
        if owner is not None and name in _INDEXED:
            owner._reindex(self)


_INDEXED = frozenset(
    ("total_pages", "free_pages", "page_size", "running", "waiting", "committed_tokens")
    + ("pending_requests", "pending_tokens")
)


def free_tokens(inst: InstanceLoad) -> int:
    """KV tokens a new plan may still place there."""
    return inst.free_pages * inst.page_size - inst.pending_tokens - inst.committed_tokens


def used_tokens(inst: InstanceLoad) -> int:
    return (inst.total_pages - inst.free_pages) * inst.page_size + inst.pending_tokens + inst.committed_tokens


def home_load(inst: InstanceLoad) -> tuple[int, int, int]:
    """Which instance should be home first: fewest requests, then least used KV."""
    return (inst.running + inst.waiting + inst.pending_requests, used_tokens(inst), inst.instance)


@dataclass
class ClusterState:
    instances: list[InstanceLoad] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_home: list[tuple[int, int, int]] = []  # home_load keys, ascending
        self._by_used: list[tuple[int, int]] = []  # (used_tokens, instance), ascending
        self._keys: dict[int, tuple[tuple[int, int, int], tuple[int, int]]] = {}
        self._total_used = 0
        self._total_requests = 0
        for inst in self.instances:
            object.__setattr__(inst, "_owner", self)
            self._reindex(inst)

    @classmethod
    def create(cls, n: int) -> ClusterState:
        return cls([InstanceLoad(i) for i in range(n)])

    # ------------------------------------------------------------------ index
    def _reindex(self, inst: InstanceLoad) -> None:
        old = self._keys.get(inst.instance)
        if old is not None:
            home_key, used_key = old
            del self._by_home[bisect.bisect_left(self._by_home, home_key)]
            del self._by_used[bisect.bisect_left(self._by_used, used_key)]
            self._total_used -= used_key[0]
            self._total_requests -= home_key[0]
        home_key = home_load(inst)
        used_key = (home_key[1], inst.instance)
        bisect.insort(self._by_home, home_key)
        bisect.insort(self._by_used, used_key)
        self._keys[inst.instance] = (home_key, used_key)
        self._total_used += used_key[0]
        self._total_requests += home_key[0]

    @property
    def total_used(self) -> int:
        """The cluster's used KV tokens (used_tokens summed over the instances)."""
        return self._total_used

    @property
    def total_requests(self) -> int:
        """Requests homed on the instances (home_load's first key, summed)."""
        return self._total_requests

    @property
    def max_used(self) -> int:
        """The most used KV tokens of any instance."""
        return self._by_used[-1][0] if self._by_used else 0

    @property
    def max_requests(self) -> int:
        """The most requests homed on any instance."""
        return self._by_home[-1][0] if self._by_home else 0

    def by_home(self) -> Iterator[InstanceLoad]:
        """Instances by home_load, the least loaded first."""
        return (self.instances[key[-1]] for key in self._by_home)

    def by_used(self) -> Iterator[InstanceLoad]:
        """Instances by (used_tokens, instance), the least used first."""
        return (self.instances[key[-1]] for key in self._by_used)

    # ---------------------------------------------------------------- updates
    def on_report(self, report: Load) -> None:
        inst = self.instances[report.instance]
        object.__setattr__(inst, "_owner", None)  # one reindex for the whole report
        for key in ("total_pages", "free_pages", "page_size", "running", "waiting", "kv_tokens"):
            setattr(inst, key, getattr(report, key))
        inst.committed_tokens = report.committed_tokens
        inst.trace = report.trace
        inst.retractions = report.retractions
        inst.cached_pages = report.cached_pages
        inst.cache_hit_tokens, inst.cache_query_tokens = report.cache_hit_tokens, report.cache_query_tokens
        inst.step_kinds = report.step_kinds
        inst.pending_requests = inst.pending_tokens = 0
        object.__setattr__(inst, "_owner", self)
        self._reindex(inst)

    def on_dispatch(self, instance: int, num_tokens: int) -> None:
        inst = self.instances[instance]
        inst.pending_requests += 1
        inst.pending_tokens += num_tokens

    def snapshot(self) -> list[dict]:
        return [{**asdict(i), "kv_usage": round(i.kv_usage, 4)} for i in self.instances]


class ScannedClusterState(ClusterState):
    """The same answers by scanning and sorting every instance at every call: the oracle of the
    index (test_planner) and the planner's former cost (benchmark.planner_latency)."""

    def _reindex(self, inst: InstanceLoad) -> None:
        pass

    @property
    def total_used(self) -> int:
        return sum(used_tokens(i) for i in self.instances)

    @property
    def total_requests(self) -> int:
        return sum(home_load(i)[0] for i in self.instances)

    @property
    def max_used(self) -> int:
        return max((used_tokens(i) for i in self.instances), default=0)

    @property
    def max_requests(self) -> int:
        return max((home_load(i)[0] for i in self.instances), default=0)

    def by_home(self) -> Iterator[InstanceLoad]:
        return iter(sorted(self.instances, key=home_load))

    def by_used(self) -> Iterator[InstanceLoad]:
        return iter(sorted(self.instances, key=lambda i: (used_tokens(i), i.instance)))
