"""The scheduling loop of one instance, in plain Python: which requests run how many tokens each
step, which wait, which are retracted. The engine's Scheduler (over real KV pages and a model)
and the cluster simulator (benchmark/simulator: page counts and a cost model) both run it, so
they cannot drift apart.

Every step runs the decodes of all running requests plus prefill chunks (at most `chunk` prompt
tokens per step). Waiting requests are admitted first-come first-served while the KV budget
allows (admission.NewTokenRatio); when running requests outgrow the pool, running requests are
retracted (their KV freed, prompt + outputs recomputed later), so no request fails for lack of
memory: the one freeing the most KV per recomputed token first (admission.retraction_victim).

Admission order (--schedule-policy): `fcfs`, or `slo`: least remaining slack first (Medha-style),
slack = the request's next deadline (arrival + TTFT SLO before its first token; first token +
TPOT SLO per token since, for a retracted one) - now - the time its pending tokens take
(prefill_s_per_token, measured by the owner). Requests that can no longer meet their deadline
(negative slack) go after every one that still can, oldest first: an overloaded instance keeps
serving the requests it can still serve in time instead of all of them late.

Head-of-line blocking (--long-prefill-token-threshold N, on by default on prefill servers):
while other prompts wait or prefill, no request runs more than N prompt tokens in a step, so
chunks of different requests interleave and a 128k prompt does not hold short ones back for
its whole prefill; a prompt prefilling alone takes the whole --chunked-prefill-size.
"""

from __future__ import annotations

import bisect
from typing import Any, Protocol

from nanocp.scheduler.admission import NewTokenRatio, retraction_victim
from nanocp.scheduler.dcp import ForeignKV, PageSource, Placement, growth_ask, held_tokens
from nanocp_router.messages import Grow


class CoreReq(Protocol):
    """A request as the loop sees it (scheduler.request.Req; the simulator's SimRequest)."""

    rid: Any
    arrival: Any  # orders the waiting queue
    kv_len: int  # positions whose KV is computed (0 after a retraction)
    num_retractions: int
    placement: Placement | None
    cp_key: int | None
    growth_asked: bool

    @property
    def num_pending(self) -> int: ...  # tokens to run before the next sample
    @property
    def num_runnable(self) -> int: ...  # of those, within the placed positions
    @property
    def held_ranges(self) -> list[tuple[int, int]] | None: ...
    @property
    def total_len(self) -> int: ...  # prompt + max_new_tokens
    @property
    def remaining_output(self) -> int: ...  # output tokens it may still sample
    @property
    def num_outputs(self) -> int: ...  # output tokens sampled so far

    arrival_s: float  # on the owner's clock (now)
    first_token_s: float | None


class KVPages(Protocol):
    """An instance's KV pages for its own requests (kvcache.manager.KVManager)."""

    page_size: int

    @property
    def num_free_pages(self) -> int: ...
    def pages_needed(self, req: Any, new_len: int) -> int: ...
    def extend(self, req: Any, num_tokens: int) -> object | None: ...  # None: no room, nothing changed
    def release(self, req: Any, cache: bool = True) -> None: ...  # cache: its KV may stay cached
    def match_prefix(self, req: Any) -> int: ...  # adopt a cached prefix (positions; 0: none)
    def unmatch(self, req: Any) -> None: ...  # undo match_prefix (not admitted after all)


class SchedulerCore:
    def __init__(
        self,
        kv: KVPages,
        pages: PageSource,
        chunk: int,
        max_running: int,
        conservativeness: float = 1.0,
        instance: int = 0,
        policy: str = "fcfs",
        ttft_slo_s: float = float("inf"),
        tpot_slo_s: float = float("inf"),
        long_prefill_tokens: int = 0,
    ) -> None:
        """kv: the own requests' KV; pages: where segments held for other homes are allocated
        (the same pages); chunk: --chunked-prefill-size; max_running: --max-running-requests;
        policy, *_slo_s: --schedule-policy and the SLOs the `slo` order works against;
        long_prefill_tokens: --long-prefill-token-threshold (0: off)."""
        self.kv = kv
        self.foreign = ForeignKV(pages)
        self.chunk = chunk
        self.max_running = max_running
        self.instance = instance
        self.new_token_ratio = NewTokenRatio(conservativeness)
        self.waiting: list[CoreReq] = []  # sorted by arrival (retracted requests go back in order)
        self.running: list[CoreReq] = []  # admission order
        self.work: list[tuple[CoreReq, int]] = []  # the last step's (request, tokens)
        self.num_retractions = 0
        self.num_paused = 0  # running requests that could not run this step (plan not grown yet)
        self.growth_requests: list[Grow] = []  # asks for the next tail quota, for the router
        if policy not in ("fcfs", "slo"):
            raise ValueError(f"--schedule-policy must be fcfs or slo, got {policy!r}")
        self.policy, self.ttft_slo_s, self.tpot_slo_s = policy, ttft_slo_s, tpot_slo_s
        self.long_prefill_tokens = long_prefill_tokens
        self.now = 0.0  # the owner's clock at this step (engine: time.monotonic(); simulator: its time)
        self.prefill_s_per_token = 0.0  # the owner's estimate, for the slack of pending tokens

    # ------------------------------------------------------------------ hooks
    def on_admit(self, req: CoreReq) -> None:
        """A waiting request starts running."""

    def on_retract(self, req: CoreReq) -> None:
        """A running request was retracted (it is waiting again)."""

    def on_cannot_grow(self, req: CoreReq) -> None:
        """The lone running request, context-parallel, grew on demand past what this home holds:
        it can neither run nor wait here; the hook takes it out of the loop (fail or raise)."""
        raise RuntimeError(f"instance {self.instance}: request {req.rid} cannot grow (cluster KV full)")

    # --------------------------------------------------------------- requests
    def enqueue(self, req: CoreReq) -> None:
        # by arrival (the fcfs order); the slo order re-sorts the queue before each admission
        keys = [r.arrival for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, req.arrival), req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: CoreReq, cache: bool = True) -> None:
        """Take a finished (or failed) request out and free its KV here (cache=False: none of
        it goes to the prefix cache, e.g. after a failed step)."""
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
        self.kv.release(req, cache)

    def owned(self) -> list[CoreReq]:
        """The requests whose KV this instance allocates (committed_tokens counts their rest)."""
        return [*self.running, *self.waiting]

    def committed_tokens(self) -> int:
        """KV tokens this instance's requests may still allocate here without a new plan: the
        placed positions it holds that are not allocated yet (a request without a placement: the
        rest of its prompt + max_new_tokens). The router's planner counts them as taken."""
        total = 0
        for req in self.owned():
            if req.placement is None:
                total += req.total_len - req.kv_len
            else:
                total += held_tokens(req.held_ranges, req.placement.end) - held_tokens(
                    req.held_ranges, req.kv_len
                )
        return max(total, 0)

    # ---------------------------------------------------- context parallelism
    def reserve_foreign(self, key: int, start: int, end: int, **cache: Any) -> bool:
        """Hold [start, end) of another home's request. Called between steps: own running
        requests are retracted if that is what it takes. cache: ForeignKV.reserve's root, tokens
        and reuse."""
        return self.foreign.reserve(key, start, end, self._make_room, **cache)

    def _make_room(self, pages: int) -> None:
        while self.kv.num_free_pages < pages and self.running:
            self.retract(self.victim())

    def release_foreign(self, key: int, cache: bool = False) -> None:
        self.foreign.release(key, cache)

    # ------------------------------------------------------------------- step
    def schedule(self) -> list[tuple[CoreReq, int]]:
        """This step's (request, tokens), their KV allocated."""
        budget = self.chunk
        work: list[tuple[CoreReq, int]] = []
        self.num_paused = 0
        # while other prompts want the budget, one request's chunk is capped (head-of-line: a
        # long prompt shares each step with the short ones instead of running alone for its whole
        # prefill); alone, it takes the whole budget
        prefilling = sum(1 for r in self.running if r.num_pending > 1)
        cap = self.long_prefill_tokens
        if not cap or (prefilling <= 1 and not self.waiting):
            cap = budget
        # 1. running requests: every decode, and continued prefill chunks within the budget
        for req in self.running:
            ask = growth_ask(req)
            if ask is not None:
                self.growth_requests.append(ask)
            runnable = req.num_runnable
            if runnable <= 0:
                self.num_paused += 1
                continue  # paused: its next positions are not placed yet
            if req.num_pending == 1:
                work.append((req, 1))
            elif budget > 0:
                n = min(runnable, budget, cap)
                budget -= n
                work.append((req, n))
        work = self._fit_or_retract(work)
        for req, n in work:
            self.kv.extend(req, n)
        if self.policy == "slo":
            self.waiting.sort(key=self._slack_order)
        # 2. admit waiting requests in order (first-come first-served, or by slack); a cached
        # prefix is adopted first, so the chunk starts after it
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            self.kv.match_prefix(req)
            n = min(req.num_runnable, budget, cap if len(self.waiting) > 1 else budget)
            # n <= 0: a retracted request at the end of its plan: it waits for its growth
            if n <= 0 or not self._can_admit(req, n) or self.kv.extend(req, n) is None:
                self.kv.unmatch(req)
                break
            self.waiting.pop(0)
            self.running.append(req)
            self.on_admit(req)
            work.append((req, n))
            budget -= n
        self.work = work
        return work

    def slack(self, req: CoreReq) -> float:
        """Seconds to spare before the request's next deadline, after its pending tokens."""
        if req.first_token_s is None:
            deadline = req.arrival_s + self.ttft_slo_s
        else:
            deadline = req.first_token_s + self.tpot_slo_s * req.num_outputs
        return deadline - self.now - req.num_pending * self.prefill_s_per_token

    def _slack_order(self, req: CoreReq) -> tuple:
        slack = self.slack(req)
        return (False, slack, req.arrival) if slack >= 0 else (True, req.arrival)

    def _future_tokens(self, req: CoreReq, scheduled: int) -> float:
        """KV tokens a request may still need here after this step's `scheduled` tokens. A
        context-parallel plan says exactly which: its positions held here not yet allocated (what
        its holders store, and growth past the plan, which the router places, take none here);
        counting all of its tokens would keep it waiting behind pages it never uses."""
        if req.placement is not None:
            held, upto = req.held_ranges, req.kv_len + scheduled
            return self.new_token_ratio.future_tokens(
                held_tokens(held, req.placement.end) - held_tokens(held, upto), 0
            )
        return self.new_token_ratio.future_tokens(req.num_pending - scheduled, req.remaining_output)

    def _can_admit(self, req: CoreReq, n: int) -> bool:
        future = self._future_tokens(req, n) + sum(self._future_tokens(r, 0) for r in self.running)
        return self.new_token_ratio.fits(
            self.kv.pages_needed(req, req.kv_len + n), future, self.kv.page_size, self.kv.num_free_pages
        )

    def _fit_or_retract(self, work: list[tuple[CoreReq, int]]) -> list[tuple[CoreReq, int]]:
        while sum(self.kv.pages_needed(r, r.kv_len + n) for r, n in work) > self.kv.num_free_pages:
            # the last running request goes too when segments held for other homes took its
            # pages (it waits until they are released); without them admission was wrong
            if len(self.running) <= 1 and not self.foreign.segments:
                req = self.running[0] if self.running else None
                if req is None or req.placement is None:
                    raise RuntimeError("KV cache cannot hold a single request; this is a bug in admission")
                # grown on demand on its home (no instance had room for its growth) past what
                # the home holds
                self.on_cannot_grow(req)
                return [(r, n) for r, n in work if r is not req]
            victim = self.victim()
            self.retract(victim)
            work = [(r, n) for r, n in work if r is not victim]
        return work

    def victim(self) -> CoreReq:
        """The running request whose retraction frees the most KV here per token it must
        recompute; the newest among equals (admission.retraction_victim)."""
        return self.running[
            retraction_victim([(r.kv_len, held_tokens(r.held_ranges, r.kv_len)) for r in self.running])
        ]

    def retract(self, victim: CoreReq) -> None:
        """Free a running request's KV; it waits and is recomputed (prompt + outputs) later."""
        self.running.remove(victim)
        self.kv.release(victim)
        victim.num_retractions += 1
        self.num_retractions += 1
        self.enqueue(victim)
        self.new_token_ratio.on_retract()
        self.on_retract(victim)
