"""DCP planner: home instance, context-parallel degree and KV placement of a request.

Objective. All instances step together, so a decode step costs about
    T = max_i (a * KV_i + b * Q_i + c * B_i) + comm(max_i B_i)
where on instance i, KV_i is the KV it reads (own and foreign segments), Q_i the queries it
serves and B_i the requests it is home to (its MoE tokens). Static DP ties all three to one
instance. DCP decouples them: the home (where MoE work happens) balances B, the placement of
KV segments balances KV, so both max_i KV_i / mean and max_i B_i / mean stay near 1. Sharding
costs routing and small kernels, so a request is split only when it would lift its home above
the cluster's KV water level, and into as few segments as that takes.

Policies (--cp-policy): `none` (static DP: one segment on home), `uniform` (every request split
evenly over --cp-size instances, like SGLang/vLLM decode CP), `dynamic` (the default).

Positions: a placement covers [0, length) exactly once with contiguous segments in order; the
home holds the last segment of a new plan (the tail), where new tokens are appended. Segment
boundaries are page aligned so a page never holds two instances' tokens.

Growth (re-planning). A dynamic plan covers the prompt plus a tail quota of at most
cp_min_shard_tokens output tokens, not the whole max_new_tokens. When a request's tail reaches
the end of its plan, its home asks for the next quota and `plan_growth` places it: on the home
while the home is not above the cluster's water level, otherwise on the least-loaded instance
(a new segment there; the home's tail is sealed where it is). A request growing to many times
its prompt thus keeps spreading its KV, and memory is reserved only for outputs that come.

Prefix caches: a request whose prefix an instance caches from position 0 goes home there when
that keeps dual balance (cache_aware.cache_home: the objective and its envelope).

DCP and prefixes (`DynamicCP.plan`, chain). A long prefix cached as segments on several
instances (a sharded request's) stays where it is: the plan is those segments + the
remainder's own plan (Plan.reused), when the chain is at least cp_min_shard_tokens long and
longer than any one instance caches from 0. Holders confirm what they found; the home computes
from there.

Cost: a plan reads the cluster state's index (instances by home load and by used KV, the total
used KV) and fills a few candidate groups in closed form: O(degree log N), flat in N
(benchmark.planner_latency).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from nanocp_router.cache_aware import cache_home
from nanocp_router.cluster_state import ClusterState, InstanceLoad, free_tokens, used_tokens

Cached = dict[int, int] | None  # instance -> tokens of a request's prefix it caches from 0
Chain = list[tuple[int, int, int]]  # a request's prefix as cached segments (instance, start, end)


@dataclass(frozen=True)
class Segment:
    instance: int
    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass
class Plan:
    home: int
    segments: list[Segment] = field(default_factory=list)
    reused: int = 0  # positions [0, reused) reuse cached segments in place (no new KV there)

    @property
    def degree(self) -> int:
        return len({s.instance for s in self.segments})

    @property
    def length(self) -> int:
        return self.segments[-1].end if self.segments else 0

    def tokens_on(self, instance: int) -> int:
        return sum(s.tokens for s in self.segments if s.instance == instance)


@dataclass
class PlannerConfig:
    cp_size: int = 2  # uniform policy: instances per request
    cp_max_degree: int = 8  # dynamic policy: most instances one request may span
    cp_min_shard_tokens: int = 4096  # dynamic: never split off less than this (nor split shorter requests)


def causal_pairs(q0: int, q1: int, s: int, e: int) -> int:
    """Query-key pairs of queries at positions [q0, q1) over keys [s, e), causal (a query at q
    sees keys at positions <= q)."""
    total = 0
    a, b = max(q0, s), min(q1, e)  # these queries see keys s..q
    if b > a:
        total += (b - a) * (a + b - 1) // 2 + (b - a) * (1 - s)
    c = max(q0, e)  # these see the whole segment
    if q1 > c:
        total += (q1 - c) * (e - s)
    return total


def last_page_tokens(length: int, page: int) -> int:
    """Tokens on the last page of a request of `length` (1..page): what its home holds at least."""
    return (length - 1) % page + 1


def _align_up(n: int, page: int) -> int:
    return -(-n // page) * page


def contiguous_plan(home: int, amounts: dict[int, int], length: int, page: int) -> Plan:
    """Segments in instance order with the home last; all but the last are page aligned."""
    order = [i for i in sorted(amounts) if i != home and amounts[i] > 0] + [home]
    segments, start = [], 0
    for k, inst in enumerate(order):
        end = length if k == len(order) - 1 else min(length, start + _align_up(amounts[inst], page))
        if end > start:
            segments.append(Segment(inst, start, end))
        start = end
    return Plan(home, segments)


class CPPolicy(ABC):
    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()

    @abstractmethod
    def plan(
        self,
        length: int,
        state: ClusterState,
        cached: Cached = None,
        chain: Chain | None = None,
    ) -> Plan | None:
        """Placement of a request needing `length` KV tokens; None when it cannot fit now (it then
        waits in the router queue; nothing is ever placed beyond an instance's free pages).
        cached: instance -> tokens of the request's prefix it caches from 0 (cache_home); chain:
        its prefix as cached segments (instance, start, end), reusable in place (dynamic only)."""

    @staticmethod
    def whole_on(home: InstanceLoad, length: int) -> Plan:
        return Plan(home.instance, [Segment(home.instance, 0, length)])

    @staticmethod
    def pick_home(state: ClusterState, tail: int | None = None) -> InstanceLoad | None:
        """The instance with the fewest requests (home_load); with `tail`, among those with room
        for that many tokens (the positions the home must hold itself), None when none has."""
        return next((i for i in state.by_home() if tail is None or free_tokens(i) >= tail), None)

    @staticmethod
    def least_used(state: ClusterState, n: int, skip: InstanceLoad) -> list[InstanceLoad]:
        """The n instances but `skip` with the least used KV (ties: lower instance first)."""
        out = []
        for inst in state.by_used():
            if len(out) == n:
                break
            if inst is not skip:
                out.append(inst)
        return out

    @abstractmethod
    def capacity(self, instance_tokens: list[int], page: int) -> int:
        """The longest request (KV tokens: prompt + max_new_tokens) this policy can place on an
        idle cluster whose instances hold `instance_tokens` each: what requests are checked
        against up front (KV pooling: with context parallelism, more than one instance's)."""

    def capacity_note(self) -> str:
        """How capacity() comes about, for the error of a request beyond it."""
        return "one instance's KV cache; raise --max-total-tokens"

    def tail_quota(self, max_new_tokens: int) -> int:
        """Output tokens a new plan covers; growth beyond it is planned later (plan_growth)."""
        return max_new_tokens

    def plan_growth(self, home: int, holders: set[int], tokens: int, state: ClusterState) -> tuple[int, int]:
        """(instance, tokens) to hold the next positions (at most `tokens`) of a request whose
        plan is used up; holders: the instances already holding its segments. The home always
        works: it then grows like any request, on demand."""
        return home, tokens


class NoCP(CPPolicy):
    """Static DP: the whole request on its home."""

    def capacity(self, instance_tokens: list[int], page: int) -> int:
        return min(instance_tokens)

    def plan(
        self, length: int, state: ClusterState, cached: Cached = None, chain: Chain | None = None
    ) -> Plan | None:
        home = cache_home(state, cached, length) or self.pick_home(state)
        if free_tokens(home) < length:
            return None
        return self.whole_on(home, length)


class UniformCP(CPPolicy):
    """Every request split evenly over cp_size instances: the home and the least-loaded others."""

    def capacity(self, instance_tokens: list[int], page: int) -> int:
        # k shares of whole pages; the home's is the largest, by less than k pages
        k = min(self.config.cp_size, len(instance_tokens))
        smallest = min(instance_tokens)  # fits one share's worth on every instance (or goes unsplit)
        return max(smallest, k * (smallest - (k - 1) * page))

    def capacity_note(self) -> str:
        return f"--cp-size {self.config.cp_size} instances' KV caches, split evenly"

    def plan(
        self, length: int, state: ClusterState, cached: Cached = None, chain: Chain | None = None
    ) -> Plan | None:
        # no cache-aware home: every request is split (its home holds the tail, not the prefix)
        home = self.pick_home(state)
        page = home.page_size
        # whole pages per instance: a request shorter than cp_size pages spans fewer instances
        k = max(1, min(self.config.cp_size, len(state.instances), length // page))
        others = self.least_used(state, k - 1, home)
        share = length // k // page * page
        amounts = {i.instance: share for i in others}

        amounts[home.instance] = length - share * len(others)
        plan = contiguous_plan(home.instance, amounts, length, page)
        if any(free_tokens(state.instances[s.instance]) < plan.tokens_on(s.instance) for s in plan.segments):
            return None
        return plan


class DynamicCP(CPPolicy):
    """Degree 1 while the request fits at home below the water level; otherwise water-fill its
    KV onto the least-loaded instances (home included, keeping the tail), with the fewest
    instances that bring every holder down to the level. Degree is at most cp_max_degree and,
    unless memory forces more, at most length // cp_min_shard_tokens. Cost: O(degree log N) from
    the cluster state's index, and a closed-form water-fill per candidate degree."""

    @staticmethod
    def fill(ids: list[int], caps: list[int], loads: list[int], length: int, page: int) -> Fill | None:
        return fill_lists(ids, caps, loads, length, page)

    @staticmethod
    def group_level(
        ids: list[int], caps: list[int], loads: list[int], length: int, page: int
    ) -> float | None:
        """The level the group would be filled to (None: it cannot hold `length`)."""
        level = fill_level(caps, loads, length)
        return None if level is None else level[0] / level[1]

    def _first_at_level(self, levels, threshold: float, last: int) -> int:
        """The smallest degree d <= last whose group level is known and <= threshold (last + 1:
        none). Adding the next least-used instance never raises a group's fill level nor makes
        it unable to hold the request, so the degrees that qualify are a suffix: bisect."""
        lo, hi = 1, last + 1
        while lo < hi:
            mid = (lo + hi) // 2
            lv = levels(mid)
            if lv is not None and lv <= threshold:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def plan(
        self, length: int, state: ClusterState, cached: Cached = None, chain: Chain | None = None
    ) -> Plan | None:
        """A long cached prefix held as segments (chain) stays where it is: the plan is those
        segments + the remainder's own plan, when the chain covers at least cp_min_shard_tokens
        and more than any one instance caches from 0 (else a cached home, else a fresh plan)."""
        if chain:
            reused = chain[-1][2]
            single = max(cached.values()) if cached else 0
            if self.config.cp_min_shard_tokens <= reused < length and reused > single:
                rest = self._plan(length - reused, state, None)
                if rest is not None:
                    shifted = [Segment(s.instance, s.start + reused, s.end + reused) for s in rest.segments]
                    segments = [Segment(*seg) for seg in chain] + shifted
                    return Plan(rest.home, segments, reused)
        return self._plan(length, state, cached)

    def _plan(self, length: int, state: ClusterState, cached: Cached) -> Plan | None:
        cfg = self.config
        insts = state.instances
        page = insts[0].page_size
        # the home holds the tail (at least the last page's tokens): one without room for it cannot be home
        home = self.pick_home(state, last_page_tokens(length, page))
        if home is None:
            return None
        level = (state.total_used + length) / len(insts)  # mean load after placing
        shard_level = level + page if length > cfg.cp_min_shard_tokens else None
        cached_home = cache_home(state, cached, length, home, shard_level)
        if cached_home is not None:
            return self.whole_on(cached_home, length)
        fits_home = free_tokens(home) >= length
        if fits_home and (length <= cfg.cp_min_shard_tokens or used_tokens(home) + length <= level + page):
            return self.whole_on(home, length)
        max_degree = min(cfg.cp_max_degree, len(insts))
        others = self.least_used(state, max_degree - 1, home)
        natural_max = max(1, length // max(1, cfg.cp_min_shard_tokens))
        ids, caps, loads = _loads([home, *others])  # degree d: the first d
        plans: dict[int, Plan | None] = {}

        def plan_of(degree: int) -> Plan | None:  # the fill's rounding may still fail
            if degree not in plans:
                filled = self.fill(ids[:degree], caps[:degree], loads[:degree], length, page)
                plans[degree] = (
                    None if filled is None else contiguous_plan(home.instance, filled[0], length, page)
                )
            return plans[degree]

        def widest_below(degree: int) -> Plan | None:
            return next((p for d in range(degree - 1, 0, -1) if (p := plan_of(d)) is not None), None)

        levels: dict[int, float | None] = {}

        def level_of(degree: int) -> float | None:
            if degree not in levels:
                levels[degree] = self.group_level(ids[:degree], caps[:degree], loads[:degree], length, page)
            return levels[degree]

        # The smallest degree whose fill level reaches the cluster's. Both levels rise with
        # length, the group's at least as fast (1/k vs 1/N per token), and more holders lower
        # the group's level: the chosen degree never drops as length grows. (Comparing holders'
        # loads instead would count the home's mandatory tail page, which made a longer request
        # pick a smaller degree when the home sat just above the level.) A plan is rounded to
        # pages only for the degree chosen.
        start = self._first_at_level(level_of, level + page, min(natural_max, max_degree))
        for degree in range(start, max_degree + 1):
            group_level = level_of(degree)
            if group_level is None:
                continue
            if degree > natural_max:  # only memory pressure justifies going this wide
                plan = plan_of(degree)
                if plan is not None:
                    return widest_below(degree) or plan
            elif group_level <= level + page and (plan := plan_of(degree)) is not None:
                return plan
        return widest_below(max_degree + 1)

    def capacity(self, instance_tokens: list[int], page: int) -> int:
        # cp_max_degree pools, whole (the water-fill fills them to the last page); the smallest
        # ones, as the home and its holders are picked by load, not by size
        return sum(sorted(instance_tokens)[: self.config.cp_max_degree])

    def capacity_note(self) -> str:
        return f"the KV caches of up to --cp-max-degree {self.config.cp_max_degree} instances together"

    def tail_quota(self, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.config.cp_min_shard_tokens)

    def plan_growth(self, home: int, holders: set[int], tokens: int, state: ClusterState) -> tuple[int, int]:
        """On the home while it stays near the water level, else on the least-loaded instance
        with room for the quota; when none has that much, a smaller quota where the most room
        is (so a request up to capacity() can grow into the last pages); with no room anywhere,
        on the home, on demand."""
        insts = state.instances
        h = insts[home]
        level = (state.total_used + tokens) / len(insts)
        if free_tokens(h) >= tokens and used_tokens(h) + tokens <= level + h.page_size:
            return home, tokens
        spanned = holders | {home}
        candidates = state.by_used()  # the least used with room first; the home among equals
        if len(spanned) >= self.config.cp_max_degree:
            insts = [i for i in insts if i.instance in spanned]
            candidates = iter(sorted(insts, key=lambda i: (used_tokens(i), i.instance)))
        first = next((i for i in candidates if free_tokens(i) >= tokens), None)
        if first is not None:
            if first.instance != home and used_tokens(h) == used_tokens(first) and free_tokens(h) >= tokens:
                return home, tokens
            return first.instance, tokens
        roomiest = max(insts, key=lambda i: (free_tokens(i), i.instance == home, -i.instance))
        room = free_tokens(roomiest) // h.page_size * h.page_size
        return (roomiest.instance, room) if room > 0 else (home, tokens)


Fill = tuple[dict[int, int], float]  # tokens per instance, and the level they were filled to


def _loads(group: list[InstanceLoad]) -> tuple[list[int], list[int], list[int]]:
    """(instances, free tokens, used tokens) of a group, the home first."""
    return (
        [i.instance for i in group],
        [max(0, free_tokens(i)) for i in group],
        [used_tokens(i) for i in group],
    )


def fill_level(caps: list[int], loads: list[int], length: int) -> tuple[int, int] | None:
    """The least common level L (exact: num / den) at which the instances, each raised from
    its load by at most its cap, take `length` tokens: sum_i min(cap_i, max(0, L - load_i)) =
    length; None when the caps cannot. Walks the breakpoints of that piecewise linear sum: an
    instance joins at its load and stops at load + cap."""
    if sum(caps) < length:
        return None
    events = sorted(
        [(x, 1) for x, c in zip(loads, caps) if c > 0] + [(x + c, -1) for x, c in zip(loads, caps) if c > 0]
    )
    taken, slope, at = 0, 0, events[0][0]
    for x, step in events:
        if slope and taken + slope * (x - at) >= length:
            break
        taken += slope * (x - at)
        at, slope = x, slope + step
    return (length - taken) + slope * at, slope  # L = at + (length - taken) / slope


def fill_lists(ids: list[int], caps: list[int], loads: list[int], length: int, page: int) -> Fill | None:
    """water_fill over the group's (instances, free tokens, used tokens), the home first."""
    level = fill_level(caps, loads, length)
    if level is None:
        return None
    num, den = level
    raw = [min(c, max(0, (num - den * x) // den)) for c, x in zip(caps, loads)]
    return _round_fill(ids, caps, raw, length, page, num / den)


def water_fill(group: list[InstanceLoad], length: int, page: int) -> Fill | None:
    """Tokens per instance raising the least loaded to a common level within their free tokens,
    and that level; non-home amounts are whole pages, the home (group[0]) takes the remainder."""
    return fill_lists(*_loads(group), length, page)


def bisect_lists(ids: list[int], caps: list[int], loads: list[int], length: int, page: int) -> Fill | None:
    """fill_lists with the level bisected in floats: the planner's former formulation, kept as
    the oracle of the closed form (test_planner) and for its cost (benchmark.planner_latency)."""
    if sum(caps) < length:
        return None
    lo, hi = min(loads), max(loads) + length
    for _ in range(64):  # bisection on the common level
        mid = (lo + hi) / 2
        if sum(min(c, max(0.0, mid - x)) for c, x in zip(caps, loads)) >= length:
            hi = mid
        else:
            lo = mid
    raw = [min(c, int(max(0.0, hi - x))) for c, x in zip(caps, loads)]
    return _round_fill(ids, caps, raw, length, page, hi)


def water_fill_bisect(group: list[InstanceLoad], length: int, page: int) -> Fill | None:
    return bisect_lists(*_loads(group), length, page)


def _round_fill(
    ids: list[int], caps: list[int], raw: list[int], length: int, page: int, level: float
) -> Fill | None:
    """Whole pages to the non-home instances (their raw share rounded down), the remainder to
    the home (ids[0]), which keeps the tail (at least the last page's tokens)."""
    amounts = [r // page * page for r in raw]
    amounts[0] = length - sum(amounts[1:])
    # Rounding down left too much on the home: move whole pages to others with room.
    for k in range(1, len(ids)):
        while amounts[0] > caps[0] and caps[k] - amounts[k] >= page:
            amounts[k] += page
            amounts[0] -= page
    need_home = last_page_tokens(length, page)
    while amounts[0] < need_home and len(ids) > 1:
        donor = max(range(1, len(ids)), key=lambda k: amounts[k])  # the first of the largest
        if amounts[donor] < page:
            break
        amounts[donor] -= page
        amounts[0] += page
    if not need_home <= amounts[0] <= caps[0]:
        return None
    return dict(zip(ids, amounts)), level


class ScanningDynamicCP(DynamicCP):
    """DynamicCP filling every candidate degree by bisection (over a ScannedClusterState: the
    former planner's cost)."""

    @staticmethod
    def fill(ids: list[int], caps: list[int], loads: list[int], length: int, page: int) -> Fill | None:
        return bisect_lists(ids, caps, loads, length, page)

    @staticmethod
    def group_level(
        ids: list[int], caps: list[int], loads: list[int], length: int, page: int
    ) -> float | None:
        filled = bisect_lists(ids, caps, loads, length, page)
        return None if filled is None else filled[1]


POLICIES: dict[str, type[CPPolicy]] = {"none": NoCP, "uniform": UniformCP, "dynamic": DynamicCP}


def create_cp_policy(name: str, config: PlannerConfig | None = None) -> CPPolicy:
    if name not in POLICIES:
        raise ValueError(f"--cp-policy must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name](config)


def cp_policy_from(cp: dict) -> CPPolicy:
    """The policy of a server's context-parallel settings (ServerArgs.cp_config)."""
    config = PlannerConfig(cp["cp_size"], cp["cp_max_degree"], cp["cp_min_shard_tokens"])
    return create_cp_policy(cp["policy"], config)


def apply_growth(state: ClusterState, instance: int, tokens: int) -> None:
    state.instances[instance].pending_tokens += tokens


def apply_plan(state: ClusterState, plan: Plan) -> None:
    """Account a placed request in the cluster state (until the instances' next load reports)."""
    for seg in plan.segments:  # reused positions are cached pages: nothing new there
        state.instances[seg.instance].pending_tokens += seg.end - max(seg.start, min(seg.end, plan.reused))
    state.instances[plan.home].pending_requests += 1
