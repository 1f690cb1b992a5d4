"""DCP planner properties (hypothesis) and balance against static DP on long-tail mixes."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nanocp_router.cluster_state import ClusterState, ScannedClusterState
from nanocp_router.messages import Load
from nanocp_router.planner import (
    Plan,
    PlannerConfig,
    Segment,
    apply_growth,
    apply_plan,
    contiguous_plan,
    create_cp_policy,
    free_tokens,
    last_page_tokens,
    used_tokens,
    water_fill,
    water_fill_bisect,
)

POLICIES = ["none", "uniform", "dynamic"]


def make_state(
    used: list[int], running: list[int], page: int, capacity: int, cls=ClusterState
) -> ClusterState:
    s = cls.create(len(used))
    total_pages = capacity // page
    for i, (u, r) in enumerate(zip(used, running)):
        s.on_report(
            Load(
                **{
                    "instance": i,
                    "total_pages": total_pages,
                    "free_pages": total_pages - min(total_pages, u // page),
                    "page_size": page,
                    "running": r,
                    "waiting": 0,
                    "kv_tokens": u,
                }
            )
        )
    return s


cluster = st.integers(1, 8).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 65_536), min_size=n, max_size=n),  # up to full
        st.lists(st.integers(0, 50), min_size=n, max_size=n),
        st.sampled_from([1, 16, 64]),
    )
)


@settings(max_examples=300, deadline=None)
@given(
    cluster=cluster,
    length=st.integers(1, 200_000),
    policy=st.sampled_from(POLICIES),
    cp_size=st.integers(1, 8),
    min_shard=st.sampled_from([1, 512, 4096]),
)
# the instance with the fewest requests is full: it cannot be the home (it once got a plan with
# no segment of its own, which the router started without reserving the holder's segment)
@example(cluster=([65_536, 1000], [0, 5], 1), length=66, policy="dynamic", cp_size=2, min_shard=512)
@example(cluster=([65_530, 0], [0, 5], 16), length=5000, policy="dynamic", cp_size=2, min_shard=512)
def test_placements_cover_once_and_fit(cluster, length, policy, cp_size, min_shard):
    used, running, page = cluster
    state = make_state(used, running, page, capacity=65_536)
    cfg = PlannerConfig(cp_size=cp_size, cp_max_degree=8, cp_min_shard_tokens=min_shard)
    plan = create_cp_policy(policy, cfg).plan(length, state)
    if plan is None:
        # nothing is placed only when the request cannot fit in the whole cluster's free memory
        # (static DP / uniform CP: on the instances they are restricted to)
        if policy == "dynamic":
            assert sum(max(0, free_tokens(i)) for i in state.instances) < length + page * len(state.instances)
        return
    pos = 0
    for seg in plan.segments:  # contiguous, in order, non-empty
        assert seg.start == pos and seg.end > seg.start
        pos = seg.end
    assert pos == length
    assert plan.segments[-1].instance == plan.home  # the home holds the tail
    for seg in plan.segments[:-1]:
        assert seg.end % page == 0  # boundaries page aligned
    for inst in state.instances:  # never beyond an instance's free memory
        assert plan.tokens_on(inst.instance) <= free_tokens(inst)
    if policy == "none":
        assert plan.degree == 1
    if policy == "dynamic":
        assert plan.degree <= 8


@settings(max_examples=100, deadline=None)
@given(cluster=cluster, lengths=st.lists(st.integers(1, 150_000), min_size=2, max_size=6))
# the home one token above the level: its mandatory tail page once made 6144 -> degree 3, 6149 -> 2
@example(cluster=([0, 25818, 0, 25818, 37376, 59747], [1, 0, 1, 0, 0, 0], 1), lengths=[6144, 6149])
def test_dynamic_degree_is_monotone_in_length(cluster, lengths):
    used, running, page = cluster
    policy = create_cp_policy("dynamic", PlannerConfig(cp_max_degree=8, cp_min_shard_tokens=2048))
    degrees = []
    for n in sorted(lengths):
        plan = policy.plan(n, make_state(used, running, page, capacity=1 << 20))
        degrees.append(plan.degree)
    assert degrees == sorted(degrees)


def simulate(policy_name: str, n: int, seed: int, lb: str = "total_requests"):
    """Place a long-tail stream (90% chat <= 2k, 10% documents 32k-256k) one by one, each
    instance's load updated by the plans; return max/mean KV and max/mean batch size."""
    rng = random.Random(seed)
    state = make_state([0] * n, [0] * n, 16, capacity=4_000_000)
    policy = create_cp_policy(
        policy_name, PlannerConfig(cp_size=n, cp_max_degree=n, cp_min_shard_tokens=4096)
    )
    if policy_name == "none" and lb == "total_tokens":  # static DP balancing KV instead of batch size
        policy.pick_home = lambda st_: min(st_.instances, key=lambda i: (used_tokens(i), i.instance))
    for _ in range(40 * n):
        length = rng.randint(32_000, 256_000) if rng.random() < 0.1 else rng.randint(50, 2_000)
        plan = policy.plan(length, state)
        assert plan is not None
        apply_plan(state, plan)
    kv = [used_tokens(i) for i in state.instances]
    bs = [i.pending_requests for i in state.instances]
    return max(kv) / (sum(kv) / n), max(bs) / (sum(bs) / n)


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("seed", range(3))
def test_dynamic_balances_kv_and_batch_better_than_static_dp(n, seed):
    dcp_kv, dcp_bs = simulate("dynamic", n, seed)
    for lb in ("total_requests", "total_tokens"):
        dp_kv, dp_bs = simulate("none", n, seed, lb)
        assert dcp_kv < dp_kv or dcp_kv <= 1.01, (lb, dcp_kv, dp_kv)
        assert dcp_bs <= dp_bs, (lb, dcp_bs, dp_bs)
    # a static DP that balances one of the two cannot balance the other on a long tail
    assert simulate("none", n, seed, "total_requests")[0] > dcp_kv
    assert simulate("none", n, seed, "total_tokens")[1] > dcp_bs


def test_short_requests_stay_local_long_ones_spread():
    state = make_state([1000, 2000, 1500, 500], [3, 3, 3, 3], 16, capacity=1 << 20)
    policy = create_cp_policy("dynamic", PlannerConfig(cp_max_degree=4, cp_min_shard_tokens=4096))
    assert policy.plan(1_500, state).degree == 1
    long_plan = policy.plan(200_000, state)
    assert long_plan.degree == 4
    assert (
        max(long_plan.tokens_on(i) for i in range(4)) - min(long_plan.tokens_on(i) for i in range(4)) < 3_000
    )


def test_unknown_cp_policy():
    with pytest.raises(ValueError, match="--cp-policy"):
        create_cp_policy("static")


@settings(max_examples=300, deadline=None)
@given(
    cluster=cluster,
    tokens=st.integers(1, 20_000),
    home=st.integers(0, 7),
    max_degree=st.integers(1, 8),
    holders=st.sets(st.integers(0, 7), max_size=7),
)
def test_growth_fits_and_respects_max_degree(cluster, tokens, home, max_degree, holders):
    used, running, page = cluster
    n = len(used)
    home, holders = home % n, {h % n for h in holders} - {home % n}
    state = make_state(used, running, page, capacity=64_000)
    policy = create_cp_policy("dynamic", PlannerConfig(cp_max_degree=max_degree, cp_min_shard_tokens=1))
    inst, got = policy.plan_growth(home, holders, tokens, state)
    assert 0 < got <= tokens
    spanned = holders | {home}
    room = max(free_tokens(i) for i in state.instances if len(spanned) < max_degree or i.instance in spanned)
    if got < tokens:  # a smaller quota only where no instance it may use has room for all of it
        assert room < tokens and got == room // page * page
    if inst != home:  # moved growth always fits where it goes and never widens past the cap
        assert free_tokens(state.instances[inst]) >= got
        assert inst in holders or len(holders) + 1 < max_degree
        level = (sum(used_tokens(i) for i in state.instances) + tokens) / n
        h = state.instances[home]  # only a full or above-level home gives growth away
        assert free_tokens(h) < tokens or used_tokens(h) + tokens > level + page


def test_growth_alternates_to_keep_a_growing_request_balanced():
    """One request on instance 0 of an empty pair, grown 20 times by 1000 tokens: re-planning
    keeps the two instances within one quota of each other."""
    state = make_state([4_000, 0], [1, 0], 1, capacity=1 << 20)
    policy = create_cp_policy("dynamic", PlannerConfig(cp_min_shard_tokens=1000))
    holders: set[int] = set()
    for _ in range(20):
        inst, _ = policy.plan_growth(0, holders, policy.tail_quota(50_000), state)
        holders |= {inst} - {0}
        state.instances[inst].free_pages -= 1000
    loads = [used_tokens(i) for i in state.instances]
    assert abs(loads[0] - loads[1]) <= 1000, loads
    assert policy.tail_quota(50_000) == 1000 and create_cp_policy("uniform").tail_quota(50_000) == 50_000


@settings(max_examples=300, deadline=None)
@given(
    caps=st.lists(st.integers(1, 4_000), min_size=1, max_size=8),
    page=st.sampled_from([1, 16]),
    policy=st.sampled_from(POLICIES),
    cp_size=st.integers(1, 8),
    max_degree=st.integers(1, 8),
    min_shard=st.sampled_from([1, 512, 4096]),
)
def test_capacity_is_what_the_planner_places_on_an_idle_cluster(
    caps, page, policy, cp_size, max_degree, min_shard
):
    """KV pooling: the up-front check admits exactly what the planner can place. A request of
    capacity() tokens gets a plan on an idle cluster (one more page does not, for dynamic CP)."""
    tokens = [c * page for c in caps]
    s = ClusterState.create(len(tokens))
    for i, t in enumerate(tokens):
        s.on_report(Load(**{"instance": i, "total_pages": t // page, "free_pages": t // page, "page_size": page,
                     "running": 0, "waiting": 0, "kv_tokens": 0}))  # fmt: skip
    cfg = PlannerConfig(cp_size=cp_size, cp_max_degree=max_degree, cp_min_shard_tokens=min_shard)
    p = create_cp_policy(policy, cfg)
    cap = p.capacity(tokens, page)
    assert cap >= min(tokens)  # never less than static DP's
    plan = p.plan(cap, s)
    assert (
        plan is not None and plan.length == cap and plan.degree <= (max_degree if policy == "dynamic" else 8)
    )
    if policy == "dynamic" and len(set(tokens)) == 1:  # equal instances: their pools, added up
        assert cap == tokens[0] * min(max_degree, len(tokens))
        assert p.plan(cap + page, s) is None


# ------------------------------------------------------------------ the indexed planner vs the scan
def former_dynamic_plan(policy, length: int, state):
    """DynamicCP.plan before the index (its loop filled and rounded every candidate degree), the
    fill exact: the oracle of the lazy loop (the float bisection: the test below)."""
    cfg, insts = policy.config, state.instances
    page = insts[0].page_size
    home = policy.pick_home(state, last_page_tokens(length, page))
    if home is None:
        return None
    level = (sum(used_tokens(i) for i in insts) + length) / len(insts)
    if free_tokens(home) >= length and (
        length <= cfg.cp_min_shard_tokens or used_tokens(home) + length <= level + page
    ):
        return Plan(home.instance, [Segment(home.instance, 0, length)])
    others = sorted((i for i in insts if i is not home), key=lambda i: (used_tokens(i), i.instance))
    natural_max = max(1, length // max(1, cfg.cp_min_shard_tokens))
    best = None
    for degree in range(1, min(cfg.cp_max_degree, len(insts)) + 1):
        filled = water_fill([home, *others[: degree - 1]], length, page)
        if filled is None:
            continue
        plan = contiguous_plan(home.instance, filled[0], length, page)
        if degree > natural_max:
            return best or plan
        best = plan
        if filled[1] <= level + page:
            return plan
    return best


@settings(max_examples=300, deadline=None)
@given(
    cluster=cluster,
    lengths=st.lists(st.integers(1, 150_000), min_size=1, max_size=8),
    growth=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 20_000)), max_size=4),
    policy=st.sampled_from(POLICIES),
    cp_size=st.integers(1, 8),
    max_degree=st.integers(1, 8),
    min_shard=st.sampled_from([1, 512, 4096]),
)
def test_indexed_planner_decides_as_the_scanning_one(
    cluster, lengths, growth, policy, cp_size, max_degree, min_shard
):
    """The planner over the cluster state's index places every request of a stream, and every
    growth, exactly as the former one, which scanned and sorted every instance per plan
    (ScannedClusterState); the fill itself: test_closed_form_fill_equals_the_bisection."""
    used, running, page = cluster
    cfg = PlannerConfig(cp_size=cp_size, cp_max_degree=max_degree, cp_min_shard_tokens=min_shard)
    fast, slow = create_cp_policy(policy, cfg), create_cp_policy(policy, cfg)
    if policy == "dynamic":
        slow.plan = lambda length, state: former_dynamic_plan(slow, length, state)
    states = [make_state(used, running, page, 65_536, cls) for cls in (ClusterState, ScannedClusterState)]
    for length in lengths:
        plans = [fast.plan(length, states[0]), slow.plan(length, states[1])]
        assert plans[0] == plans[1]
        if plans[0] is not None:
            for state, plan in zip(states, plans):
                apply_plan(state, plan)
    for home, tokens in growth:
        home %= len(used)
        got = [p.plan_growth(home, set(), tokens, st_) for p, st_ in zip((fast, slow), states)]
        assert got[0] == got[1]
        for state in states:
            apply_growth(state, *got[0])
    assert states[0].total_used == states[1].total_used
    assert [i.instance for i in states[0].by_home()] == [i.instance for i in states[1].by_home()]


@settings(max_examples=500, deadline=None)
@given(
    loads=st.lists(st.integers(0, 100_000), min_size=1, max_size=8),
    caps=st.lists(st.integers(0, 100_000), min_size=8, max_size=8),
    length=st.integers(1, 300_000),
    page=st.sampled_from([1, 16, 64]),
)
@example(loads=[0] * 8, caps=[1, 0, 0, 0, 0, 1252, 2845, 2844], length=6941, page=1)
def test_closed_form_fill_equals_the_bisection(loads, caps, length, page):
    """The exact fill level gives the former bisection's shares, but where the bisection's float
    level ends a few ulps below an exact level at which a share is whole: its floor then lost a
    token (in the example 2843.9999999999995 for 2844, giving 2845 + 2843 for 2844 + 2844)."""
    state = ClusterState.create(len(loads))
    for inst, load, cap in zip(state.instances, loads, caps):
        inst.page_size, inst.total_pages = 1, load + cap
        inst.free_pages = cap
    exact, old = water_fill(state.instances, length, page), water_fill_bisect(state.instances, length, page)
    assert (exact is None) == (old is None)
    if exact is None:
        return
    assert exact[1] == pytest.approx(old[1], rel=1e-12, abs=1e-9)
    if exact[0] != old[0]:
        assert old[1] < exact[1] and any(float(exact[1] - load).is_integer() for load in loads), (exact, old)


# ------------------------------------------------------------------ cache-aware homes
def test_cache_home_keeps_dual_balance():
    from nanocp_router.cache_aware import cache_home

    page = 16
    # instance 2 caches 900 tokens of the request; it is as loaded as the others: it is home
    s = make_state([4000, 4000, 4000, 4000], [3, 3, 3, 3], page, 1 << 16)
    assert cache_home(s, {2: 900}, 1000).instance == 2
    for name in POLICIES[::2]:  # none, dynamic (uniform splits every request: no cached home)
        assert create_cp_policy(name).plan(1000, s, {2: 900}).segments == [Segment(2, 0, 1000)]
    # one request more than the cache-blind home would have: still its home
    s = make_state([4000, 4000, 4000, 4000], [3, 3, 4, 3], page, 1 << 16)
    assert cache_home(s, {2: 900}, 1000).instance == 2
    # two more: refused
    s = make_state([4000, 4000, 4000, 4000], [3, 3, 5, 3], page, 1 << 16)
    assert cache_home(s, {2: 900}, 1000) is None
    assert create_cp_policy("dynamic").plan(1000, s, {2: 900}).home != 2
    # far more KV than the others: refused although the batch is even
    s = make_state([4000, 4000, 20000, 4000], [3, 3, 3, 3], page, 1 << 16)
    assert cache_home(s, {2: 900}, 1000) is None
    # the longest cached prefix among those inside the envelope; nothing cached: no choice
    s = make_state([4000, 4000, 4000, 4000], [3, 3, 3, 3], page, 1 << 16)
    assert cache_home(s, {1: 300, 3: 600}, 1000).instance == 3 and cache_home(s, {}, 1000) is None


def test_prefix_index_matches_records_and_forgets():
    from nanocp_router.prefix_index import PrefixIndex, block_hashes

    idx = PrefixIndex(3, block=4)
    doc = list(range(100, 120))
    h = block_hashes(doc + [1, 2, 3, 4, 5], 4)
    assert len(h) == 6 and block_hashes(doc, 4) == h[:5]  # chained: equal prefixes, equal hashes
    idx.record(0, block_hashes(doc, 4), capacity_tokens=1000)
    idx.record(2, block_hashes(doc[:8], 4), capacity_tokens=1000)
    assert idx.match(h) == {0: 20, 2: 8}
    assert idx.match(block_hashes([7] + doc, 4)) == {}  # a different first token: nothing in common
    idx.record(2, block_hashes(list(range(50)), 4), capacity_tokens=16)  # LRU: 4 blocks fit
    assert idx.match(h) == {0: 20} and len(idx.lru[2]) == 4
    idx.clear()
    assert idx.match(h) == {} and not idx.where
