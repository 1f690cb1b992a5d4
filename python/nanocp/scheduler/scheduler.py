"""Continuous-batching scheduler of one instance.

Every step runs, in one forward, the decodes of all running requests plus prefill chunks (at most
--chunked-prefill-size prompt tokens per step). New requests are admitted first-come first-served
while the KV budget allows; when running requests outgrow the pool, running requests are retracted
(their KV freed, prompt + outputs recomputed later), so no request fails for lack of memory: the
newest first, but context-parallel ones (which free only their home's share here) last.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from nanocp.distributed.dcp import ForeignKV
from nanocp.engine.forward_batch import ForwardBatch, ForwardMode
from nanocp.engine.step_trace import StepTracer
from nanocp.kvcache.manager import KVManager, held_tokens, local_ranges
from nanocp.model_executor.model_runner import ModelRunner
from nanocp.scheduler.admission import GROWTH_AHEAD_TOKENS, NewTokenRatio, retraction_victim
from nanocp.scheduler.request import Req, ReqStatus, RequestLimits
from nanocp.utils import get_logger
from nanocp_router.faults import step_fault
from nanocp_router.messages import Grow
from nanocp_router.planner import causal_pairs

logger = get_logger(__name__)


@dataclass
class ReqOutput:
    rid: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[float, int]]] | None = None


class Scheduler:
    def __init__(self, runner: ModelRunner, tracer: StepTracer | None = None) -> None:
        self.runner = runner
        self.tracer = tracer
        args = runner.server_args
        self.kv = KVManager(runner.page_allocator, runner.req_to_token_pool)
        self.chunked_prefill_size = args.chunked_prefill_size
        self.max_running_requests = args.max_running_requests
        self.waiting: list[Req] = []  # sorted by arrival (retracted requests go back in order)
        self.running: list[Req] = []  # admission order; the newest is retracted first
        self.new_token_ratio = NewTokenRatio(args.schedule_conservativeness)
        self.num_retractions = 0
        self.num_paused = 0  # running requests that could not run this step (plan not grown yet)
        self._traced_work: list[list] = []  # the step's [rid, tokens], for the step trace
        self.forward_ct = 0
        # forward steps by how they ran: "eager", "graph", "graph_dcp" (CUDA graphs with DCP routing)
        self.step_kinds: dict[str, int] = {"eager": 0, "graph": 0, "graph_dcp": 0}
        self.foreign = ForeignKV(runner.page_allocator, runner.device)
        self.instance = runner.parallel.rank if runner.parallel is not None else 0
        self.growth_requests: list[Grow] = []  # asks for the next tail quota, for the router
        self._step_reqs: list[Req] = []  # the requests of the step being run (fail_step)
        self.failed: list[ReqOutput] = []  # requests failed while scheduling, to be sent (take_failed)
        self.num_failed_steps = 0

    # ------------------------------------------------------- context parallelism
    def reserve_foreign(self, key: int, start: int, end: int) -> bool:
        """Hold [start, end) of another home's request. Called between steps: own running
        requests are retracted (see _victim) if that is what it takes."""
        need = self.foreign.pages_for(start, end)
        while self.kv.allocator.num_free_pages < need and self.running:
            self._retract(self._victim())
        return self.foreign.reserve(key, start, end)

    def release_foreign(self, key: int) -> None:
        self.foreign.release(key)

    def apply_growth(self, rid: str, cp_key: int, segment: tuple[int, int, int]) -> None:
        """The router placed the next positions of a request (on this home or on a holder)."""
        req = self.find(rid)
        if req is not None and req.cp_key == cp_key and req.planned_end == segment[1]:
            req.set_placement([*req.placement, segment], self.instance)

    def _ask_growth(self, req: Req) -> None:
        """Ask for the next tail quota once the request nears the end of its plan."""
        end = req.planned_end
        if end is None or req.growth_asked or req.kv_len < end - GROWTH_AHEAD_TOKENS:
            return
        need = len(req.origin_input_ids) + req.sampling_params.max_new_tokens - end
        if need > 0:
            req.growth_asked = True
            self.growth_requests.append(Grow(req.rid, req.cp_key, end, need))

    # ----------------------------------------------------------------- requests
    def limits(self, has_tokenizer: bool) -> RequestLimits:
        """What this instance's requests are validated against (request.check_generate)."""
        r = self.runner
        return RequestLimits(r.vocab_size, r.context_length, r.max_total_num_tokens, has_tokenizer)

    def add_request(self, req: Req) -> None:
        """Queue a request that passed request.check_generate against `limits`."""
        self._enqueue(req)

    def find(self, rid: str) -> Req | None:
        return next((r for q in (self.waiting, self.running) for r in q if r.rid == rid), None)

    def abort_request(self, rid: str) -> ReqOutput | None:
        req = self.find(rid)
        return None if req is None else self.fail(req, {"type": "abort", "message": "aborted by request"})

    def committed_tokens(self) -> int:
        """KV tokens this instance's requests may still allocate here without a new plan: the
        placed positions it holds that are not allocated yet (a request without a placement: the
        rest of its prompt + max_new_tokens). The router's planner counts them as taken."""
        total = 0
        for req in (*self.running, *self.waiting):
            if req.placement is None:
                total += len(req.origin_input_ids) + req.sampling_params.max_new_tokens - req.kv_len
            else:
                total += held_tokens(req, req.planned_end) - held_tokens(req)
        return max(total, 0)

    def take_failed(self) -> list[ReqOutput]:
        out, self.failed = self.failed, []
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --------------------------------------------------------------------- step
    def step(self) -> list[ReqOutput]:
        """Schedule, run one forward, sample; returns an output for every request that sampled."""
        next_batch = self.get_next_batch()
        return self.run_batch(*next_batch) if next_batch is not None else []

    def get_next_batch(self) -> tuple[ForwardBatch, list[Req]] | None:
        """Schedule this step (reserving its KV); None when there is nothing to run."""
        if self.tracer is not None:
            self.tracer.begin_step()
        work = self._schedule()
        self._step_reqs = [req for req, _ in work]
        if self.tracer is not None:
            self._traced_work = [[req.rid, n] for req, n in work]
        return self._build_batch(work) if work else None

    def idle_batch(self) -> ForwardBatch:
        """A batch of no tokens: lets an instance without work take part in the step's collectives."""
        if self.tracer is not None:
            self.tracer.begin_step()
            self._traced_work = []
        self._step_reqs = []
        return self._build_batch([])[0]

    def run_batch(self, batch: ForwardBatch, sampling: list[Req]) -> list[ReqOutput]:
        """Run the step and sample. A fault in it fails this step's requests (fail_step) and the
        instance goes on; in lockstep it first completes the step with its peers (see below)."""
        try:
            logits = self.runner.forward(batch)
        except Exception as e:
            peers = batch.global_num_tokens is not None and len(batch.global_num_tokens) > 1
            if peers and batch.collectives_begun:
                raise  # its peers wait inside this step's collectives: the instance cannot rejoin
            if peers:  # they will enter this step's collectives: run it again with them, discarded
                logger.error(
                    "instance %d: step fault (%s); completing the step with its peers", self.instance, e
                )
                self.runner.forward(batch)  # a second fault leaves the loop: the instance exits
            return self.fail_step(e)
        if self.tracer is not None:
            self.tracer.end_step(
                {
                    **self._trace_info(batch),
                    "paused": self.num_paused,
                    "waiting": len(self.waiting),
                    "work": self._traced_work,  # [rid, tokens] run by this instance's own requests
                }
            )
        self.forward_ct += 1
        kind = ("graph_dcp" if batch.dcp is not None else "graph") if batch.cuda_graph else "eager"
        self.step_kinds[kind] += 1
        try:  # from here on nothing waits for peers
            return self._sample(logits, sampling)
        except Exception as e:
            return self.fail_step(e)

    def _sample(self, logits: torch.Tensor, sampling: list[Req]) -> list[ReqOutput]:
        if sampling:
            step_fault("sample", self.instance, self.runner.forward_steps)  # tests only
        next_ids, logprobs = self.runner.sampler(logits, sampling) if sampling else ([], [])
        outputs = []
        for req, token, lp in zip(sampling, next_ids, logprobs):
            req.append_token(token)
            out = ReqOutput(
                req.rid,
                [token],
                req.stream.take_delta(),
                req.finished,
                req.finished_reason,
                len(req.origin_input_ids),
                len(req.output_ids),
            )
            if lp is not None:
                req.output_token_logprobs.append(lp[0])
                out.token_logprobs = [lp[0]]
                if req.top_logprobs_num:
                    req.output_top_logprobs.append(lp[1])
                    out.top_logprobs = [lp[1]]
            outputs.append(out)
            if req.finished:
                self.running.remove(req)
                self.kv.release(req)
        self.new_token_ratio.step()
        return outputs

    def fail_step(self, error: BaseException) -> list[ReqOutput]:
        """The step raised: its requests fail (HTTP 500 naming the instance), their KV is freed,
        and the scheduler goes on with the others. Outputs of a token sampled before the fault
        are not sent: the failed request's output is just its failure."""
        self.num_failed_steps += 1
        logger.error(
            "instance %d: step failed, failing its %d requests",
            self.instance,
            len(self._step_reqs),
            exc_info=error,
        )
        message = f"internal error in instance {self.instance}'s step: {type(error).__name__}: {error}"
        outs = [
            self.fail(req, {"type": "abort", "status_code": 500, "message": message})
            for req in self._step_reqs
            if not req.finished
        ]
        self._step_reqs = []
        return outs

    def fail(self, req: Req, reason: dict[str, Any]) -> ReqOutput:
        """Finish a queued or running request with `reason` and free its KV."""
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
        self.kv.release(req)
        req.finish(reason)
        return ReqOutput(
            req.rid, [], "", True, req.finished_reason, len(req.origin_input_ids), len(req.output_ids)
        )

    @staticmethod
    def _trace_info(batch: ForwardBatch) -> dict[str, Any]:
        """What a step did, for --step-trace-file (and the simulator's cost calibration)."""
        ranges = batch.kv_ranges_cpu or [[(0, seq)] for seq in batch.seq_lens_cpu]
        lens = zip(batch.seq_lens_cpu, batch.extend_seq_lens_cpu, ranges)
        info = {
            "mode": batch.forward_mode.name,
            "batch_size": batch.batch_size,
            "num_tokens": batch.num_tokens,
            "kv_tokens": sum(batch.seq_lens_cpu),
            # query-key pairs of the own tokens over the KV held here (causal)
            "attn_pairs": sum(causal_pairs(seq - n, seq, s, e) for seq, n, rs in lens for s, e in rs),
            "global_num_tokens": batch.global_num_tokens,
            "cuda_graph": batch.cuda_graph,  # replayed: no per-section times
        }
        st = batch.dcp
        if st is not None:  # context-parallel work served for other homes
            info["foreign_queries"] = sum(st.q_recv_counts)
            info["foreign_seqs"] = len(st.f_qo_indptr) - 1  # requests whose queries attend here
            info["foreign_pairs"] = sum(
                (st.f_qo_indptr[i + 1] - st.f_qo_indptr[i]) * (st.f_kv_indptr[i + 1] - st.f_kv_indptr[i])
                for i in range(len(st.f_qo_indptr) - 1)
            )
        return info

    def _schedule(self) -> list[tuple[Req, int]]:
        budget = self.chunked_prefill_size
        work: list[tuple[Req, int]] = []
        self.num_paused = 0
        # 1. running requests: every decode, and continued prefill chunks within the budget
        for req in self.running:
            self._ask_growth(req)
            runnable = req.num_runnable
            if runnable <= 0:
                self.num_paused += 1
                continue  # paused: its next positions are not placed yet
            if req.num_pending == 1:
                work.append((req, 1))
            elif budget > 0:
                n = min(runnable, budget)
                budget -= n
                work.append((req, n))
        work = self._fit_or_retract(work)
        for req, n in work:
            self.kv.extend(req, n)
        # 2. admit waiting requests first-come first-served
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            req = self.waiting[0]
            n = min(req.num_runnable, budget)
            if n <= 0:  # a retracted request at the end of its plan: it waits for its growth
                break
            if not self._can_admit(req, n) or self.kv.extend(req, n) is None:
                break
            self.waiting.pop(0)
            logger.debug(
                "admitted %s (%d tokens pending, %d running)", req.rid, req.num_pending, len(self.running)
            )
            req.status = ReqStatus.RUNNING
            self.running.append(req)
            work.append((req, n))
            budget -= n
        return work

    def _future_tokens(self, req: Req, scheduled: int) -> float:
        """KV tokens a request may still need here after this step's `scheduled` tokens. A
        context-parallel plan says exactly which: its positions held here not yet allocated (what
        its holders store, and growth past the plan, which the router places, take none here);
        counting all of its tokens would keep it waiting behind pages it never uses."""
        if req.placement is not None:
            upto = req.kv_len + scheduled
            return self.new_token_ratio.future_tokens(
                held_tokens(req, req.planned_end) - held_tokens(req, upto), 0
            )
        remaining_out = req.sampling_params.max_new_tokens - len(req.output_ids)
        return self.new_token_ratio.future_tokens(req.num_pending - scheduled, remaining_out)

    def _can_admit(self, req: Req, n: int) -> bool:
        future = self._future_tokens(req, n) + sum(self._future_tokens(r, 0) for r in self.running)
        return self.new_token_ratio.fits(
            self.kv.pages_needed(req, n), future, self.kv.page_size, self.kv.allocator.num_free_pages
        )

    def _fit_or_retract(self, work: list[tuple[Req, int]]) -> list[tuple[Req, int]]:
        while sum(self.kv.pages_needed(r, r.kv_len + n) for r, n in work) > self.kv.allocator.num_free_pages:
            # the last running request goes too when segments held for other homes took its
            # pages (it waits until they are released); without them admission was wrong
            if len(self.running) <= 1 and not self.foreign.segments:
                req = self.running[0] if self.running else None
                if req is None or req.placement is None:
                    raise RuntimeError("KV cache cannot hold a single request; this is a bug in admission")
                # A context-parallel request grew on demand on its home (no instance had room for
                # its growth) past what the home holds: it can neither run nor wait here.
                message = (
                    f"instance {self.instance}: the cluster's KV cache is full; request {req.rid} could "
                    f"not grow past {req.kv_len} tokens (retry later)"
                )
                self.failed.append(self.fail(req, {"type": "abort", "status_code": 503, "message": message}))
                return [(r, n) for r, n in work if r is not req]
            victim = self._victim()
            self._retract(victim)
            work = [(r, n) for r, n in work if r is not victim]
            logger.debug("retracted %s (%d tokens) to free KV cache", victim.rid, len(victim.fill_ids))
        return work

    def _victim(self) -> Req:
        """The running request whose retraction frees the most KV here per token it must
        recompute; the newest among equals (admission.retraction_victim)."""
        return self.running[retraction_victim([(r.kv_len, held_tokens(r)) for r in self.running])]

    def _retract(self, victim: Req) -> None:
        """Free a running request's KV; it waits and is recomputed (prompt + outputs) later."""
        self.running.remove(victim)
        self.kv.release(victim)
        victim.status = ReqStatus.WAITING
        victim.num_retractions += 1
        self.num_retractions += 1
        self._enqueue(victim)
        self.new_token_ratio.on_retract()

    def _enqueue(self, req: Req) -> None:
        keys = [r.arrival for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, req.arrival), req)

    def _build_batch(self, work: list[tuple[Req, int]]) -> tuple[ForwardBatch, list[Req]]:
        """Lay out the step's tokens request by request. KV slots were reserved by _schedule."""
        device = self.runner.device
        table = self.kv.req_to_token_pool.req_to_token
        input_ids, positions, locs, logits_rows, sampling, cp_work, ranges = [], [], [], [], [], [], []
        seq_lens, ext_lens, prefix_lens, rows = [], [], [], []
        offset = 0
        for req, n in work:
            end = req.kv_len  # extend() already advanced kv_len past this step's tokens
            start = end - n
            if req.has_remote_kv(self.instance):
                cp_work.append((req, offset, start, end))
            ranges.append([(lo, hi) for lo, hi, _ in local_ranges(req.local_segments, 0, end)])
            input_ids.extend(req.fill_ids[start:end])
            positions.append(torch.arange(start, end))
            locs.append(table[req.req_pool_idx, start:end])
            offset += n
            if end == len(req.fill_ids):
                logits_rows.append(offset - 1)
                sampling.append(req)
            seq_lens.append(end)
            ext_lens.append(n)
            prefix_lens.append(start)
            rows.append(req.req_pool_idx)
        if not work:
            mode = ForwardMode.IDLE
        elif all(n == 1 and p > 0 for n, p in zip(ext_lens, prefix_lens)):
            mode = ForwardMode.DECODE
        elif any(n == 1 and p > 0 for n, p in zip(ext_lens, prefix_lens)):
            mode = ForwardMode.MIXED
        else:
            mode = ForwardMode.EXTEND

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        batch = ForwardBatch(
            forward_mode=mode,
            batch_size=len(work),
            input_ids=t(input_ids),
            positions=torch.cat(positions).to(device) if positions else t([]),
            out_cache_loc=torch.cat(locs) if locs else t([]),
            req_pool_indices=t(rows),
            seq_lens=t(seq_lens),
            logits_indices=t(logits_rows),
            seq_lens_cpu=seq_lens,
            extend_seq_lens_cpu=ext_lens,
            req_to_token_pool=self.kv.req_to_token_pool,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.runner.attn_backend,
            moe_comm=self.runner.moe_comm,
            tracer=self.tracer,
            kv_ranges_cpu=None if all(r == [(0, e)] for r, e in zip(ranges, seq_lens)) else ranges,
            cp_work=cp_work,
        )
        return batch, sampling
