"""Discrete-event simulation of N lockstep instances under a context-parallel policy.

Each step, every instance runs: decode attention over the KV it holds for running requests
(own and foreign segments), dense + expert layers for the requests it is home to, and prefill
chunks (at most `chunk` tokens per instance per step); then the MoE all-to-all. All instances
wait for the slowest:
    step = max_i(attention(KV_i, shards_i) + dense(B_i) + prefill(P_i) + routing(Q_i)) + moe_comm(max_i B_i)
With `disaggregated=True` prompts arrive prefilled (PD disaggregation): only decode is simulated.
Requests are placed by the router's real planner (nanocp_router.planner): it sees the same
ClusterState the server's router sees. A placement reserves the request's final length
(prompt + output); a request that does not fit waits in the router queue (FCFS).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from benchmark.simulator.cost import CostModel
from benchmark.workloads import Request
from nanocp_router.cluster_state import ClusterState
from nanocp_router.planner import CPPolicy, Plan, causal_pairs


@dataclass
class SimRequest:
    req: Request
    rid: int
    plan: Plan | None = None
    prefilled: int = 0
    generated: int = 0
    admitted_s: float = 0.0
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def length(self) -> int:
        return self.req.input_len + self.req.output_len

    @property
    def kv_len(self) -> int:
        return self.prefilled + self.generated


@dataclass
class SimResult:
    metrics: list[dict]
    steps: int
    makespan_s: float
    kv_imbalance: list[float] = field(default_factory=list)  # per step: max_i KV_i / mean
    batch_imbalance: list[float] = field(default_factory=list)  # per step: max_i B_i / mean

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "makespan_s": self.makespan_s,
            "kv_imbalance_mean": float(np.mean(self.kv_imbalance)) if self.kv_imbalance else 1.0,
            "batch_imbalance_mean": float(np.mean(self.batch_imbalance)) if self.batch_imbalance else 1.0,
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
    ) -> None:
        """disaggregated: prompts are prefilled elsewhere (PD disaggregation) and arrive with their
        KV; only decode runs here, so TPOT reflects decode balance alone (the case DCP targets)."""
        self.disaggregated = disaggregated
        self.cost = cost
        self.policy = policy
        self.page = page_size
        self.chunk = chunk
        self.n = cost.num_instances
        self.capacity = capacity_tokens or cost.kv_capacity_tokens()
        self.max_running = max_running
        # per step (start time, [(rid, home, tokens)]), kept when set to a list: joins with the
        # real server's step traces (their "work" field) request by request
        self.step_log: list[tuple[float, list[tuple[int, int, int]]]] | None = None

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.page)

    def run(self, workload: list[Request], max_steps: int = 10_000_000) -> SimResult:
        state = ClusterState.create(self.n)
        for inst in state.instances:
            inst.total_pages = inst.free_pages = self.capacity // self.page
            inst.page_size = self.page
        arrivals = [(r.arrival_s, i, SimRequest(r, i)) for i, r in enumerate(workload)]
        heapq.heapify(arrivals)
        queue: list[SimRequest] = []
        running: list[SimRequest] = []
        done: list[SimRequest] = []
        t, steps = 0.0, 0
        kv_imb, bs_imb = [], []
        while arrivals or queue or running:
            while arrivals and arrivals[0][0] <= t:
                queue.append(heapq.heappop(arrivals)[2])
            while queue:  # FCFS admission through the planner
                home_counts = [i.running for i in state.instances]
                if min(home_counts) >= self.max_running:
                    break
                sr = queue[0]
                plan = self.policy.plan(sr.length, state)
                if plan is None:
                    break
                queue.pop(0)
                sr.plan, sr.admitted_s = plan, t
                if self.disaggregated:
                    sr.prefilled, sr.generated, sr.first_token_s = sr.req.input_len, 1, t
                for inst in state.instances:
                    inst.free_pages -= self._pages(plan.tokens_on(inst.instance))
                state.instances[plan.home].running += 1
                running.append(sr)
            if not running:
                if not arrivals:
                    raise RuntimeError("requests can never be placed (larger than the cluster's KV)")
                t = max(t, arrivals[0][0])
                continue
            step, kv, batch = self._step_cost(running)
            kv_imb.append(max(kv) / (sum(kv) / self.n) if sum(kv) else 1.0)
            bs_imb.append(max(batch) / (sum(batch) / self.n) if sum(batch) else 1.0)
            start = t
            t += step
            steps += 1
            budget = [self.chunk] * self.n
            log = self.step_log is not None
            work = []
            for sr in list(running):
                home = sr.plan.home
                if sr.prefilled < sr.req.input_len:
                    take = min(budget[home], sr.req.input_len - sr.prefilled)
                    budget[home] -= take
                    if log and take:
                        work.append((sr.rid, home, take))
                    sr.prefilled += take
                    if sr.prefilled == sr.req.input_len:
                        sr.generated, sr.first_token_s = 1, t
                else:
                    sr.generated += 1
                    if log:
                        work.append((sr.rid, home, 1))
                if sr.prefilled == sr.req.input_len and sr.generated >= sr.req.output_len:
                    sr.finished_s = t
                    running.remove(sr)
                    done.append(sr)
                    for inst in state.instances:
                        inst.free_pages += self._pages(sr.plan.tokens_on(inst.instance))
                    state.instances[home].running -= 1
            if log:
                self.step_log.append((start, work))
            if steps >= max_steps:
                raise RuntimeError("simulation did not finish")
        metrics = []
        for sr in sorted(done, key=lambda s: s.rid):
            ttft = sr.first_token_s - sr.req.arrival_s
            e2e = sr.finished_s - sr.req.arrival_s
            tpot = (
                (sr.finished_s - sr.first_token_s) / (sr.req.output_len - 1) if sr.req.output_len > 1 else 0.0
            )
            metrics.append(
                {
                    "rid": sr.rid,
                    "ttft": ttft,
                    "tpot": tpot,
                    "e2e": e2e,
                    "degree": sr.plan.degree,
                    "input_len": sr.req.input_len,
                    "output_len": sr.req.output_len,
                }
            )
        return SimResult(metrics, steps, t, kv_imb, bs_imb)

    def _step_cost(self, running: list[SimRequest]) -> tuple[float, list[int], list[int]]:
        n = self.n
        kv, shards, batch, prefill, foreign_q = [0] * n, [0] * n, [0] * n, [0] * n, [0] * n
        pairs = [0] * n  # query-key pairs of prefill chunks
        budget = [self.chunk] * n
        for sr in running:
            home = sr.plan.home
            decoding = sr.prefilled >= sr.req.input_len
            if decoding:
                batch[home] += 1
                cur = sr.kv_len
                for seg in sr.plan.segments:
                    held = max(0, min(seg.end, cur) - seg.start)
                    if held:
                        kv[seg.instance] += held
                        shards[seg.instance] += 1
                        foreign_q[seg.instance] += seg.instance != home
                continue
            take = min(budget[home], sr.req.input_len - sr.prefilled)
            budget[home] -= take
            prefill[home] += take
            q0, q1 = sr.prefilled, sr.prefilled + take
            for seg in sr.plan.segments:
                p = causal_pairs(q0, q1, seg.start, seg.end)
                if p:
                    pairs[seg.instance] += p
                    shards[seg.instance] += 1
                    if seg.instance != home:
                        foreign_q[seg.instance] += q1 - max(q0, seg.start)
        c = self.cost
        cluster_tokens = sum(batch) + sum(prefill)
        routed = c.routing_step() if any(foreign_q) else 0.0  # lockstep exchange on every instance
        per_instance = [
            c.attention(kv[i], shards[i])
            + c.prefill_attention(pairs[i])
            + c.dense(batch[i] + prefill[i], cluster_tokens)
            + c.prefill(prefill[i])
            + c.routing(foreign_q[i])
            + routed
            for i in range(n)
        ]
        if c.combine == "shared":  # instances share a few CPU cores, each uses one at most
            work = max(c.cores * max(per_instance), sum(per_instance))
        else:
            work = max(per_instance)
        return work + c.moe_comm(max(batch[i] + prefill[i] for i in range(n))), kv, batch
