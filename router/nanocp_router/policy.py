"""Load-balancing policies for static data parallelism (SGLang's --load-balance-method names;
cache_aware is sgl-router's)."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod

from nanocp_router.cache_aware import cache_home
from nanocp_router.cluster_state import ClusterState


class LoadBalancePolicy(ABC):
    @abstractmethod
    def select(self, state: ClusterState, num_tokens: int, cached: dict[int, int] | None = None) -> int:
        """Instance that gets a new request of num_tokens prompt + budgeted output tokens;
        cached: instance -> tokens of the request's prefix its cache holds (estimated)."""


class RoundRobin(LoadBalancePolicy):
    def __init__(self) -> None:
        self._next = itertools.count()

    def select(self, state: ClusterState, num_tokens: int, cached: dict[int, int] | None = None) -> int:
        return next(self._next) % len(state.instances)


class TotalRequests(LoadBalancePolicy):
    """Fewest requests (running + queued + just dispatched)."""

    def select(self, state: ClusterState, num_tokens: int, cached: dict[int, int] | None = None) -> int:
        return min(
            state.instances, key=lambda i: (i.running + i.waiting + i.pending_requests, i.instance)
        ).instance


class TotalTokens(LoadBalancePolicy):
    """Fewest KV tokens (held + just dispatched)."""

    def select(self, state: ClusterState, num_tokens: int, cached: dict[int, int] | None = None) -> int:
        return min(state.instances, key=lambda i: (i.kv_tokens + i.pending_tokens, i.instance)).instance


class CacheAware(LoadBalancePolicy):
    """The instance caching the longest prefix of the request while that keeps batch and KV
    balance (planner.cache_home: the envelope and why); otherwise the fewest requests, then the
    least used KV."""

    def select(self, state: ClusterState, num_tokens: int, cached: dict[int, int] | None = None) -> int:
        home = cache_home(state, cached, num_tokens)
        return (home if home is not None else next(state.by_home())).instance


POLICIES: dict[str, type[LoadBalancePolicy]] = {
    "round_robin": RoundRobin,
    "total_requests": TotalRequests,
    "total_tokens": TotalTokens,
    "cache_aware": CacheAware,
}


def create_policy(name: str) -> LoadBalancePolicy:
    if name not in POLICIES:
        raise ValueError(f"--load-balance-method must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name]()
