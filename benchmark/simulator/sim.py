"""Discrete-event simulation of N lockstep instances serving a workload as NanoCP does.

Scheduling follows the real server, reusing its code where it is torch-free:
- router: with a context-parallel policy, a FCFS queue placed by the real planner
  (nanocp_router.planner) against a ClusterState kept like the router's: the instances' load
  reports (at most every REPORT_INTERVAL_S, and when one goes idle after finishing) plus what was
  placed since; holders reserve their segments at placement; a request whose plan runs out gets
  its next tail quota from the policy's plan_growth. With --cp-policy none, the real
  load-balancing policy (round robin by default) sends each request to an instance at once.
- instances: the engine's own scheduling loop (nanocp.scheduler.core: FCFS queues, chunked
  prefill, new-token-ratio admission, retraction) over page counts (simulator.instance).
Step cost: every instance runs its work (decode attention over the KV it holds, own and foreign
segments; R_i attention sequences, own and served; dense + expert layers for its B_i decode and P_i prefill tokens;
Q_i queries served for other homes) and all wait for the slowest:
    step = max_i(attention(KV_i, R_i) + dense(B_i) + prefill(P_i) + routing(Q_i)) + moe_comm(max_i B_i)
(on a shared CPU host the instances' work adds up instead, see ProfileCost.combine).
With `disaggregated=True` prompts arrive prefilled (PD disaggregation): only decode is simulated.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from benchmark.simulator.cost import CostModel
from benchmark.simulator.instance import SimInstance, SimRequest
from benchmark.workloads import Request
from nanocp.scheduler.dcp import Placement
from nanocp_router.cluster_state import REPORT_INTERVAL_S, ClusterState
from nanocp_router.messages import Load
from nanocp_router.planner import CPPolicy, NoCP, apply_growth, apply_plan, causal_pairs
from nanocp_router.policy import create_policy


@dataclass
class SimResult:
    metrics: list[dict]
    steps: int
    makespan_s: float
    kv_imbalance: list[float] = field(default_factory=list)  # per step: max_i KV_i / mean
    batch_imbalance: list[float] = field(default_factory=list)  # per step: max_i B_i / mean
    retractions: int = 0

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "makespan_s": self.makespan_s,
            "kv_imbalance_mean": float(np.mean(self.kv_imbalance)) if self.kv_imbalance else 1.0,
            "batch_imbalance_mean": float(np.mean(self.batch_imbalance)) if self.batch_imbalance else 1.0,
            "retractions": self.retractions,
        }


class Simulator:
    def __init__(
        self,
        cost: CostModel,
        policy: CPPolicy,
        page_size: int = 64,
        chunk: int = 8192,
        capacity_tokens: int | None = None,
        max_running: int = 256,
        disaggregated: bool = False,
        load_balance_method: str = "round_robin",
        schedule_conservativeness: float = 1.0,
        schedule_policy: str = "fcfs",
        slo_ttft_s: float = float("inf"),
        slo_tpot_s: float = float("inf"),
        long_prefill_tokens: int = 0,
    ) -> None:
        """disaggregated: prompts are prefilled elsewhere (PD disaggregation) and arrive with their
        KV; only decode runs here, so TPOT reflects decode balance alone (the case DCP targets).
        The other arguments are the server's flags of the same names (capacity_tokens:
        --max-total-tokens per instance; chunk: --chunked-prefill-size)."""
        self.cost = cost
        self.policy = policy
        self.page = page_size
        self.chunk = chunk
        self.n = cost.num_instances
        self.capacity = capacity_tokens or cost.kv_capacity_tokens()
        self.max_running = max_running
        self.disaggregated = disaggregated
        self.load_balance_method = load_balance_method
        self.conservativeness = schedule_conservativeness
        self.schedule = (schedule_policy, slo_ttft_s, slo_tpot_s, long_prefill_tokens)
        # per step (start time, [(rid, home, tokens)]), kept when set to a list: joins with the
        # real server's step traces (their "work" field) request by request
        self.step_log: list[tuple[float, list[tuple[int, int, int]]]] | None = None

    def run(self, workload: list[Request], max_steps: int = 10_000_000) -> SimResult:
        self.insts = [
            SimInstance(
                i,
                self.capacity // self.page,
                self.page,
                self.chunk,
                self.max_running,
                self.conservativeness,
                *self.schedule,
            )  # fmt: skip
            for i in range(self.n)
        ]
        per_token = (self.cost.prefill(self.chunk) + self.cost.dense(self.chunk, self.chunk)) / self.chunk
        for inst in self.insts:  # what a pending token costs, for the slo order's slack
            inst.prefill_s_per_token = per_token
        self.state = ClusterState.create(self.n)
        self.queue: list[SimRequest] = []  # router queue (context-parallel policies)
        # placed, sharded requests whose holders reserve between this step and the next: their
        # home (which drained its inbox before the holders acked) starts them a step later
        self.in_flight: list[SimRequest] = []
        self.lb = create_policy(self.load_balance_method) if isinstance(self.policy, NoCP) else None
        self.reqs = [SimRequest(r, i) for i, r in enumerate(workload)]
        arrivals = [(sr.arrival, sr.rid, sr) for sr in self.reqs]
        heapq.heapify(arrivals)
        done: list[SimRequest] = []
        t, steps = 0.0, 0
        kv_imb, bs_imb = [], []
        for inst in self.insts:
            self._report(inst, t)
        while arrivals or self.queue or self.in_flight or any(i.has_work() for i in self.insts):
            while arrivals and arrivals[0][0] <= t:
                self._route(heapq.heappop(arrivals)[2], t)
            self._place(t)
            works = [inst.step_work(t) for inst in self.insts]
            asks = [self.reqs[g.rid] for inst in self.insts for g in inst.growth_requests]
            for inst in self.insts:
                inst.growth_requests.clear()
            if not any(works) and self.in_flight:  # an idle cluster: delivered at once
                self._deliver()
                self._grow_all(asks)
                continue
            self._deliver()
            if not any(works):
                if asks:  # every running request waits for its growth: the router answers first
                    self._grow_all(asks)
                    continue
                if not arrivals:
                    raise RuntimeError(
                        "simulation stalled: queued requests can never run (larger than the cluster's KV?)"
                    )
                t = max(t, arrivals[0][0])
                continue
            step, kv, batch = self._step_cost(works)
            kv_imb.append(max(kv) / (sum(kv) / self.n) if sum(kv) else 1.0)
            bs_imb.append(max(batch) / (sum(batch) / self.n) if sum(batch) else 1.0)
            start, t = t, t + step
            steps += 1
            if self.step_log is not None:
                self.step_log.append((start, [(sr.rid, sr.home, n) for w in works for sr, n in w]))
            finished = [False] * self.n
            for inst, work in zip(self.insts, works):
                inst.new_token_ratio.step()
                for sr, n in work:
                    if self._advance(sr, n, t):
                        finished[inst.index] = True
                        done.append(sr)
            self._grow_all(asks)
            for inst in self.insts:
                if t - inst.last_report_s >= REPORT_INTERVAL_S or (
                    finished[inst.index] and not inst.has_work()
                ):
                    self._report(inst, t)
            if steps >= max_steps:
                raise RuntimeError("simulation did not finish")
        metrics = [self._metrics(sr) for sr in sorted(done, key=lambda s: s.rid)]
        retractions = sum(i.retractions for i in self.insts)
        return SimResult(metrics, steps, t, kv_imb, bs_imb, retractions)

    # ------------------------------------------------------------------ router
    def _route(self, sr: SimRequest, t: float) -> None:
        if self.disaggregated:  # the prompt's KV (and first token) arrive with it; admitted = first token
            sr.kv_len, sr.generated = sr.req.input_len, 1
        if self.lb is None:
            self.queue.append(sr)
            return
        budget = sr.req.input_len + sr.req.output_len
        home = self.lb.select(self.state, budget)
        self.state.on_dispatch(home, budget)
        sr.home, sr.placed_s = home, t
        self.insts[home].enqueue(sr)

    def _place(self, t: float) -> None:
        """Router.place: FCFS; a request that does not fit waits, and so do those behind it."""
        while self.queue:
            sr = self.queue[0]
            plan = self.policy.plan(sr.req.input_len + self.policy.tail_quota(sr.req.output_len), self.state)
            if plan is None:
                return
            apply_plan(self.state, plan)
            sr.home = plan.home
            sr.place(Placement([(s.instance, s.start, s.end) for s in plan.segments], plan.home))
            holders = [s for s in plan.segments if s.instance != plan.home]
            reserved = [s for s in holders if self.insts[s.instance].reserve_foreign(sr.rid, s.start, s.end)]
            if len(reserved) < len(holders):  # a holder had no room after all: plan again later
                for s in reserved:
                    self.insts[s.instance].release_foreign(sr.rid)
                return
            self.queue.pop(0)
            sr.placed_s = t
            if holders:  # the home gets it once the holders have reserved: after their next drain
                self.in_flight.append(sr)
            else:
                self.insts[plan.home].enqueue(sr)

    def _deliver(self) -> None:
        for sr in self.in_flight:
            self.insts[sr.home].enqueue(sr)
        self.in_flight = []

    def _grow_all(self, asks: list[SimRequest]) -> None:
        for sr in asks:
            if sr.finished_s is None:
                self._grow(sr)

    def _grow(self, sr: SimRequest) -> None:
        """Router.on_grow: the next tail quota, on the home or reserved on another instance."""
        end = sr.placement.end
        tokens = self.policy.tail_quota(sr.total_len - end)
        holders = {s[0] for s in sr.placement.segments} - {sr.home}
        inst, tokens = self.policy.plan_growth(sr.home, holders, tokens, self.state)
        apply_growth(self.state, inst, tokens)
        if inst != sr.home and not self.insts[inst].reserve_foreign(sr.rid, end, end + tokens):
            inst = sr.home  # no room there after all: the home grows on demand
        sr.place(sr.placement.grown((inst, end, end + tokens)), grown=True)

    def _report(self, inst: SimInstance, t: float) -> None:
        self.state.on_report(
            Load(
                **{
                    "instance": inst.index,
                    "total_pages": inst.total_pages,
                    "free_pages": inst.free_pages,
                    "page_size": inst.page_size,
                    "running": len(inst.running),
                    "waiting": len(inst.waiting),
                    "kv_tokens": sum(r.kv_len for r in inst.running),
                }
            )
        )
        inst.last_report_s = t

    # ---------------------------------------------------------------- requests
    def _advance(self, sr: SimRequest, n: int, t: float) -> bool:
        """The step ran n tokens of sr (its kv_len counts them already); True when it finished."""
        if sr.num_pending > 0:
            return False
        sr.generated += 1  # the step ends with a sample
        if sr.first_token_s is None:
            sr.first_token_s = t
        if sr.generated < sr.req.output_len:
            return False
        sr.finished_s = t
        self.insts[sr.home].finish(sr)
        for inst in self.insts:
            inst.release_foreign(sr.rid)
        return True

    def _metrics(self, sr: SimRequest) -> dict:
        r = sr.req
        return {
            "rid": sr.rid,
            "ttft": sr.first_token_s - r.arrival_s,
            "tpot": (sr.finished_s - sr.first_token_s) / (r.output_len - 1) if r.output_len > 1 else 0.0,
            "e2e": sr.finished_s - r.arrival_s,
            "degree": sr.degree,
            "input_len": r.input_len,
            "output_len": r.output_len,
            "retractions": sr.num_retractions,
            "growths": sr.growths,
        }

    # -------------------------------------------------------------------- cost
    def _step_cost(self, works: list[list[tuple[SimRequest, int]]]) -> tuple[float, list[int], list[int]]:
        """Per instance, the features the server's step traces record (and sim_validate fits):
        KV tokens read by decodes, query-key pairs of prefill chunks (causal on the home; a holder
        attends the queries that see its keys over all it holds below the chunk's end, masked,
        not skipped), attention sequences (own requests + one per request served for another
        home, as build_dcp_plan groups them), own tokens, queries served for other homes."""
        n = self.n
        kv, reqs, batch, prefill, foreign_q, pairs = [0] * n, [0] * n, [0] * n, [0] * n, [0] * n, [0] * n
        for home, work in enumerate(works):
            for sr, tokens in work:
                q0, q1 = sr.kv_len - tokens, sr.kv_len  # schedule() allocated the step's tokens
                segments = sr.placement.segments if sr.placement else [(home, 0, q1)]
                reqs[home] += 1
                if tokens == 1 and sr.generated > 0 and sr.num_pending == 0:  # decode: reads the KV
                    batch[home] += 1
                    for inst in {inst for inst, _, _ in segments} - {home}:  # one sequence per holder
                        held = sum(max(0, min(e, q1) - s) for i, s, e in segments if i == inst)
                        if held:
                            kv[inst] += held
                            reqs[inst] += 1
                            foreign_q[inst] += 1
                    kv[home] += sum(max(0, min(e, q1) - s) for i, s, e in segments if i == home)
                    continue
                prefill[home] += tokens
                pairs[home] += sum(causal_pairs(q0, q1, s, e) for i, s, e in segments if i == home)
                for inst in {inst for inst, _, _ in segments} - {home}:  # one sequence per holder
                    first = min(s for i, s, _ in segments if i == inst)
                    seen = max(0, q1 - max(q0, first))  # queries that see some of its keys
                    if seen:
                        pairs[inst] += seen * sum(max(0, min(e, q1) - s) for i, s, e in segments if i == inst)
                        reqs[inst] += 1
                        foreign_q[inst] += seen
        c = self.cost
        cluster_tokens = sum(batch) + sum(prefill)
        routed = c.routing_step() if any(foreign_q) else 0.0  # lockstep exchange on every instance
        per_instance = [
            c.attention(kv[i], reqs[i])
            + c.prefill_attention(pairs[i])
            + c.dense(batch[i] + prefill[i], cluster_tokens)
            + c.prefill(prefill[i])
            + c.routing(foreign_q[i])
            + routed
            for i in range(n)
        ]
        if c.combine == "shared":  # instances share a few CPU cores, each uses one at most
            step = max(c.cores * max(per_instance), sum(per_instance))
        else:
            step = max(per_instance)
        return step + c.moe_comm(max(batch[i] + prefill[i] for i in range(n))), kv, batch
