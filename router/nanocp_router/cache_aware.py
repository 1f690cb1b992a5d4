"""Cache-aware homes: where a request whose prompt prefix is cached goes.

Each instance caches the KV of the positions it holds of a request (kvcache/radix_cache.py); the
router estimates who caches which prefix (prefix_index.py). A request whose prefix some instance
caches from position 0 goes home there when that keeps dual balance (static DP's
`--load-balance-method cache_aware` and the DCP planner both ask cache_home):
    maximise    saved prefill = the cached prefix length on h
    subject to  B_h + 1 <= max(max_i B_i, B_b + 2, (1 + eps) * mean B')              (batch)
                KV_h + new_h <= max(max_i KV_i, KV_b', (1 + eps) * mean KV' + page)  (KV)
where b is the home the cache-blind plan picks (the fewest requests), KV_b' the most KV that
plan leaves on an instance (KV_b + length, or the water level when it would shard), new_h =
length - saved what the request adds on h, mean B' and mean KV' the means after placing it,
eps = CACHE_BALANCE_TOLERANCE. The lockstep step costs about the max over instances of batch
and KV: inside the envelope the cached home ends with at most one request more than the least
loaded instance would, and no more KV than the cache-blind plan leaves somewhere (or eps above
the mean), so the prefill is saved at a bounded cost to every step and affinity cannot creep an
instance up (both bounds are anchored to the minimum or the mean, not to h itself). Outside it,
the request would make its home the straggler for its whole life: the plan is the cache-blind
one. A cached home gets the whole request (degree 1).
"""

from __future__ import annotations

from nanocp_router.cluster_state import ClusterState, InstanceLoad, free_tokens, home_load, used_tokens

CACHE_BALANCE_TOLERANCE = 0.1  # eps of the cache-aware home's envelope (above)


def cache_home(
    state: ClusterState,
    cached: dict[int, int] | None,
    length: int,
    base: InstanceLoad | None = None,
    shard_level: float | None = None,
) -> InstanceLoad | None:
    """The instance with the longest cached prefix of a request needing `length` KV tokens that
    can be its home inside the dual-balance envelope (above), against the plan without
    caches: `base` its home (default: pick_home's), shard_level the most KV it leaves on any
    instance when it would be sharded (None: whole on base). None: no such instance. Costs
    O(len(cached)) besides the index."""
    if not cached:
        return None
    n, eps = len(state.instances), CACHE_BALANCE_TOLERANCE
    base = base or next(state.by_home())
    batch_cap = max(state.max_requests, home_load(base)[0] + 2, (1 + eps) * (state.total_requests + 1) / n)
    base_kv = used_tokens(base) + length
    if shard_level is not None:
        base_kv = min(base_kv, shard_level)
    kv_cap = max(state.max_used, base_kv)
    best, best_key = None, None
    for i, tokens in cached.items():
        inst = state.instances[i]
        saved = min(tokens, length - 1)
        new = length - saved
        if (
            saved <= 0
            or home_load(inst)[0] + 1 > batch_cap
            or used_tokens(inst) + new
            > max(kv_cap, (1 + eps) * (state.total_used + new) / n + inst.page_size)
            or free_tokens(inst) < length
        ):
            continue
        key = (saved, -home_load(inst)[0], -i)
        if best_key is None or key > best_key:
            best, best_key = inst, key
    return best
