"""Continuous-batching scheduler of one instance: the scheduling loop (core.SchedulerCore) over
this instance's KV cache, the step's ForwardBatch, the forward, sampling and failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanocp.engine.forward_batch import ForwardBatch, ForwardMode
from nanocp.engine.step_trace import StepTracer
from nanocp.kvcache.manager import KVManager
from nanocp.model_executor.model_runner import ModelRunner
from nanocp.scheduler.core import SchedulerCore
from nanocp.scheduler.dcp import Segment, held_spans
from nanocp.scheduler.request import Req, ReqStatus
from nanocp.scheduler.validation import RequestLimits
from nanocp.utils import get_logger
from nanocp_router.faults import step_fault
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
    cached_tokens: int = 0  # prompt tokens found in the prefix cache


class Scheduler(SchedulerCore):
    def __init__(self, runner: ModelRunner, tracer: StepTracer | None = None) -> None:
        args = runner.server_args
        kv = KVManager(runner.page_allocator, runner.req_to_token_pool, args.radix_cache)
        super().__init__(
            kv,
            kv.pages,
            args.chunked_prefill_size,
            args.max_running_requests,
            args.schedule_conservativeness,
            runner.parallel.rank if runner.parallel is not None else 0,
            args.schedule_policy,
            args.slo_ttft_ms / 1e3,
            args.slo_tpot_ms / 1e3,
            args.long_prefill_token_threshold,
        )
        self.foreign.cache = kv.cache  # segments held for other homes are cached too
        self.runner = runner
        self.tracer = tracer
        self.forward_ct = 0
        # forward steps by how they ran: "eager", "graph", "graph_dcp" (CUDA graphs with DCP routing)
        self.step_kinds: dict[str, int] = {"eager": 0, "graph": 0, "graph_dcp": 0}
        self._step_reqs: list[Req] = []  # the requests of the step being run (fail_step)
        self.failed: list[ReqOutput] = []  # requests failed while scheduling, to be sent (take_failed)
        self.flush_pending = False  # a /flush_cache waits for cached pages to be unlocked
        # --disaggregation-mode decode: requests whose prompt KV a prefill server is writing into
        # pages allocated here, by cp_key; they start running with their first token (start_landed)
        self.landing: dict[int, Req] = {}
        # --disaggregation-mode prefill: after each forward, before sampling (the step's K/V is
        # complete, the pages still held), and before a request's pages are freed
        # (it returns what it sent, for the step trace)
        self.after_forward: Callable[[list[tuple[Req, int]]], dict[str, Any]] | None = None
        self.before_release: Callable[[Req], None] | None = None

    # ------------------------------------------------------------------ hooks
    def on_admit(self, req: Req) -> None:
        logger.debug(
            "admitted %s (%d tokens pending, %d running)", req.rid, req.num_pending, len(self.running)
        )
        req.status = ReqStatus.RUNNING
        self.kv.count_admitted(req)

    def on_retract(self, req: Req) -> None:
        logger.debug("retracted %s (%d tokens to recompute)", req.rid, len(req.fill_ids))
        req.status = ReqStatus.WAITING

    def on_cannot_grow(self, req: Req) -> None:
        message = (
            f"instance {self.instance}: the cluster's KV cache is full; request {req.rid} could "
            f"not grow past {req.kv_len} tokens (retry later)"
        )
        self.failed.append(self.fail(req, {"type": "abort", "status_code": 503, "message": message}))

    def finish(self, req: Req, cache: bool = True) -> None:
        if req.cp_key is not None and self.landing.get(req.cp_key) is req:
            del self.landing[req.cp_key]
        if self.before_release is not None:
            self.before_release(req)
        super().finish(req, cache)

    def retract(self, victim: Req) -> None:
        if self.before_release is not None:
            self.before_release(victim)
        super().retract(victim)

    def owned(self) -> list[Req]:
        return [*super().owned(), *self.landing.values()]

    # ------------------------------------------------- disaggregated decode
    def land(self, req: Req) -> bool:
        """Allocate the pages of a request's prompt positions held here (a prefill server writes
        them); False: no room now."""
        if self.kv.extend(req, len(req.origin_input_ids)) is None:
            return False
        self.landing[req.cp_key] = req
        return True

    def start_landed(self, cp_key: int, token: int, lp: list[float] | None, top: list | None) -> ReqOutput:
        """Every KV of the prompt landed: the request runs from the prefill server's first token."""
        req = self.landing.pop(cp_key)
        req.status = ReqStatus.RUNNING
        req.computed_len = req.kv_len  # computed by the prefill server: no cache query here
        out = self._record_token(req, token, (lp[0], top[0] if top else []) if lp else None, time.monotonic())
        if req.finished:
            self.finish(req)
        else:
            self.running.append(req)
            self.on_admit(req)
        return out

    def drop_landing(self, cp_key: int) -> Req | None:
        """A landing request taken back (its reservation elsewhere failed): free its pages."""
        req = self.landing.get(cp_key)
        if req is not None:
            self.finish(req)
        return req

    def apply_growth(self, rid: str, cp_key: int, segment: Segment) -> None:
        """The router placed the next positions of a request (on this home or on a holder)."""
        req = self.find(rid)
        if req is not None and req.cp_key == cp_key and req.placement and req.placement.end == segment[1]:
            req.set_placement(req.placement.grown(segment))

    # ----------------------------------------------------------------- requests
    def limits(self, has_tokenizer: bool) -> RequestLimits:
        """What this instance's requests are validated against (request.check_generate)."""
        r = self.runner
        return RequestLimits(r.vocab_size, r.context_length, r.max_total_num_tokens, has_tokenizer)

    def add_request(self, req: Req) -> None:
        """Queue a request that passed request.check_generate against `limits`."""
        self.enqueue(req)

    def find(self, rid: str) -> Req | None:
        queues = (self.waiting, self.running, self.landing.values())
        return next((r for q in queues for r in q if r.rid == rid), None)

    def abort_request(self, rid: str) -> ReqOutput | None:
        req = self.find(rid)
        return None if req is None else self.fail(req, {"type": "abort", "message": "aborted by request"})

    def flush_cache(self) -> bool:
        """/flush_cache: empty the prefix cache. While requests read cached pages it is deferred
        (flush_pending; the worker tries again after each step); True once done."""
        self.flush_pending = self.kv.cache is not None and not self.kv.cache.flush()
        if self.flush_pending:
            logger.info("instance %d: cache flush deferred until running requests finish", self.instance)
        return not self.flush_pending

    def take_failed(self) -> list[ReqOutput]:
        out, self.failed = self.failed, []
        return out

    # --------------------------------------------------------------------- step
    def step(self) -> list[ReqOutput]:
        """Schedule, run one forward, sample; returns an output for every request that sampled."""
        next_batch = self.get_next_batch()
        return self.run_batch(*next_batch) if next_batch is not None else []

    def get_next_batch(self) -> tuple[ForwardBatch, list[Req]] | None:
        """Schedule this step (reserving its KV); None when there is nothing to run."""
        if self.tracer is not None:
            self.tracer.begin_step()
        self.now = time.monotonic()
        work = self.schedule()
        self._step_reqs = [req for req, _ in work]
        return self._build_batch(work) if work else None

    def idle_batch(self) -> ForwardBatch:
        """A batch of no tokens: lets an instance without work take part in the step's collectives."""
        if self.tracer is not None:
            self.tracer.begin_step()
        self._step_reqs, self.work = [], []
        return self._build_batch([])[0]

    def run_batch(self, batch: ForwardBatch, sampling: list[Req]) -> list[ReqOutput]:
        """Run the step and sample. A fault in it fails this step's requests (fail_step) and the
        instance goes on; in lockstep it first completes the step with its peers (see below)."""
        t0 = time.monotonic()
        try:
            logits = self.runner.forward(batch)
        except Exception as e:
            if self.tracer is not None:
                self.tracer.cancel_step()
            peers = batch.global_num_tokens is not None and len(batch.global_num_tokens) > 1
            if peers and batch.collectives_begun:
                raise  # its peers wait inside this step's collectives: the instance cannot rejoin
            if peers:  # they will enter this step's collectives: run it again with them, discarded
                logger.error(
                    "instance %d: step fault (%s); completing the step with its peers", self.instance, e
                )
                self.runner.forward(batch)  # a second fault leaves the loop: the instance exits
            return self.fail_step(e)
        sent: dict[str, Any] = {}
        if self.after_forward is not None:  # a prefill server's KV transfers of this step
            try:
                sent = self.after_forward(self.work)
            except Exception as e:
                return self.fail_step(e)
        if self.tracer is not None:
            self.tracer.end_step(
                {
                    **self._trace_info(batch),
                    **sent,
                    "paused": self.num_paused,
                    "waiting": len(self.waiting),
                    "landing": len(self.landing),  # disaggregated decode: requests waiting for KV
                    "work": [[req.rid, n] for req, n in self.work],  # run by this instance's own requests
                }
            )
        self.forward_ct += 1
        if batch.num_tokens > batch.batch_size:  # prefill tokens: what a pending token costs (slack)
            per_token = (time.monotonic() - t0) / batch.num_tokens
            self.prefill_s_per_token = per_token if not self.prefill_s_per_token else (
                0.9 * self.prefill_s_per_token + 0.1 * per_token
            )  # fmt: skip
        kind = ("graph_dcp" if batch.dcp is not None else "graph") if batch.cuda_graph else "eager"
        self.step_kinds[kind] += 1
        try:  # from here on nothing waits for peers
            for req, n in self.work:  # prefill chunks' KV is complete: requests arriving now find it
                if n > 1:
                    self.kv.cache_unfinished(req)
            if batch.dcp is not None:  # and so is the K/V written here for other homes
                self.foreign.cache_written(batch.dcp.written)
            return self._sample(logits, sampling)
        except Exception as e:
            return self.fail_step(e)

    def _sample(self, logits: torch.Tensor, sampling: list[Req]) -> list[ReqOutput]:
        if sampling:
            step_fault("sample", self.instance, self.runner.forward_steps)  # tests only
        next_ids, logprobs = self.runner.sampler(logits, sampling) if sampling else ([], [])
        outputs = []
        now = time.monotonic()
        for req, token, lp in zip(sampling, next_ids, logprobs):
            outputs.append(self._record_token(req, token, lp, now))
            if req.finished:
                self.finish(req)
        self.new_token_ratio.step()
        return outputs

    @staticmethod
    def _record_token(req: Req, token: int, lp: tuple | None, now: float) -> ReqOutput:
        """A sampled token (lp: its logprob and top logprobs) appended to the request."""
        req.append_token(token)
        if req.first_token_s is None:
            req.first_token_s = now
        out = ReqOutput(
            req.rid,
            [token],
            req.stream.take_delta(),
            req.finished,
            req.finished_reason,
            len(req.origin_input_ids),
            len(req.output_ids),
            cached_tokens=req.cached_tokens,
        )
        if lp is not None:
            req.output_token_logprobs.append(lp[0])
            out.token_logprobs = [lp[0]]
            if req.top_logprobs_num:
                req.output_top_logprobs.append(lp[1])
                out.top_logprobs = [lp[1]]
        return out

    def fail_step(self, error: BaseException) -> list[ReqOutput]:
        """The step raised: its requests fail (HTTP 500 naming the instance), their KV is freed,
        and the scheduler goes on with the others. Outputs of a token sampled before the fault
        are not sent: the failed request's output is just its failure."""
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
        """Finish a queued, running or landing request with `reason` and free its KV (none of its
        own goes to the prefix cache: a failed step may have left it incomplete)."""
        self.finish(req, cache=False)
        req.finish(reason)
        return ReqOutput(
            req.rid, [], "", True, req.finished_reason, len(req.origin_input_ids), len(req.output_ids)
        )

    @staticmethod
    def _trace_info(batch: ForwardBatch) -> dict[str, Any]:
        """What a step did, for --step-trace-file (and the simulator's cost calibration)."""
        ranges = batch.held_ranges or [[(0, seq)] for seq in batch.seq_lens_cpu]
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
        if batch.dcp is not None:  # context-parallel work served for other homes
            info.update(batch.dcp.foreign_stats())
        return info

    def _build_batch(self, work: list[tuple[Req, int]]) -> tuple[ForwardBatch, list[Req]]:
        """Lay out the step's tokens request by request. KV slots were reserved by schedule()."""
        device = self.runner.device
        table = self.kv.req_to_token_pool.req_to_token
        input_ids, positions, locs, logits_rows, sampling, cp_work, ranges = [], [], [], [], [], [], []
        seq_lens, ext_lens, prefix_lens, rows = [], [], [], []
        offset = 0
        for req, n in work:
            end = req.kv_len  # extend() already advanced kv_len past this step's tokens
            start = end - n
            if req.placement is not None and req.placement.remote:
                cp_work.append((req, offset, start, end))
            ranges.append([(lo, hi) for lo, hi, _ in held_spans(req.held_ranges, 0, end)])
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
            held_ranges=None if all(r == [(0, e)] for r, e in zip(ranges, seq_lens)) else ranges,
            cp_work=cp_work,
        )
        return batch, sampling
