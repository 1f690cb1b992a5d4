"""Worker process: one instance's scheduler loop behind ZMQ.

Receives requests from the router, runs scheduler steps, sends new token ids to the
detokenizer and load reports to the router.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from typing import Any

import torch
import zmq

from nanocp import envs
from nanocp.disaggregation.decode import KVReceiver
from nanocp.disaggregation.prefill import KVSender
from nanocp.disaggregation.transfer import pool_layout
from nanocp.distributed.dcp import build_dcp_plan
from nanocp.distributed.parallel_state import init_parallel_state, instance_device
from nanocp.engine.step_trace import StepTracer
from nanocp.errors import InvalidRequestError
from nanocp.model_executor.model_runner import ModelRunner
from nanocp.registries import KV_TRANSFER_BACKENDS
from nanocp.sampling.sampling_params import SamplingParams
from nanocp.scheduler.dcp import Placement
from nanocp.scheduler.request import Req, RequestFactory
from nanocp.scheduler.scheduler import ReqOutput, Scheduler
from nanocp.scheduler.validation import check_generate
from nanocp.server_args import ServerArgs
from nanocp.tokenizer.detokenizer import eos_token_ids, load_tokenizer
from nanocp_router import faults
from nanocp_router.cluster_state import REPORT_INTERVAL_S
from nanocp_router.faults import request_fault
from nanocp_router.ipc import PortArgs, drain, pull, push
from nanocp_router.messages import (
    PREFILL_WORKER_INBOX,
    WORKER_INBOX,
    Abort,
    FlushCache,
    Generate,
    Grown,
    KVFailed,
    KVReady,
    Load,
    Message,
    Output,
    Outputs,
    PrefillAbort,
    PrefillHello,
    PrefillRequest,
    Release,
    Reserve,
    Reserved,
    decoder,
    encode,
)
from nanocp_router.prefill_router import prefill_rid
from nanocp_router.process import child_process_setup
from nanocp_router.router import queue_full_reason

logger = logging.getLogger("nanocp.worker")
# Lockstep instances run one (possibly empty) step per loop turn, so an idle cluster still meets
# in a small all-gather every poll: every 20 ms right after work, every 200 ms once idle for a
# second (the router's "wake" broadcast cuts the wait short when a request arrives).
IDLE_POLL_MS = 20
IDLE_MAX_POLL_MS = 200
IDLE_BACKOFF_S = 1.0


def detok_params(p: SamplingParams) -> dict[str, Any]:
    """What the detokenizer needs to turn a request's tokens into its text."""
    return {
        "stop_strs": p.stop_strs,
        "no_stop_trim": p.no_stop_trim,
        "skip_special_tokens": p.skip_special_tokens,
        "spaces_between_special_tokens": p.spaces_between_special_tokens,
    }


class Worker:
    def __init__(self, server_args: ServerArgs, instance: int, ports: PortArgs) -> None:
        self.instance = instance
        tokenizer = (
            None
            if server_args.skip_tokenizer_init
            else load_tokenizer(server_args.tokenizer_path, server_args.trust_remote_code)
        )
        dp = server_args.dp_size
        if server_args.device == "cpu" and dp > 1:  # instances share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dp))
        device = instance_device(instance, server_args.device)
        self.parallel = init_parallel_state(
            instance, dp, server_args.ep_size, device, ports.dist_init, store=ports.dist_store
        )
        # MoE collectives or context-parallel routing: every instance runs every step
        self.lockstep = server_args.ep_size > 1 or server_args.cp_policy != "none"
        self.runner = ModelRunner(server_args, self.parallel)
        tracer = None
        if server_args.step_trace_file:
            path = f"{server_args.step_trace_file}.{instance}" if dp > 1 else server_args.step_trace_file
            tracer = StepTracer(path, instance, self.runner.device)
        self.scheduler = Scheduler(self.runner, tracer)
        self.limits = self.scheduler.limits(has_tokenizer=tokenizer is not None)
        self.cp_config = server_args.cp_config()
        self.max_queued_requests = server_args.max_queued_requests
        self._cluster_busy = False
        self._idle_since = time.monotonic()
        eos = eos_token_ids(tokenizer, self.runner.hf_config, server_args.model_path)
        self.make_req = RequestFactory(tokenizer, eos, self.runner.device, server_args.random_seed + instance)
        self.ctx = zmq.Context()
        self.inbox = pull(self.ctx, ports.workers[instance], bind=not ports.router_binds_workers)
        self.to_router = push(self.ctx, ports.router)
        self.to_detok = push(self.ctx, ports.detokenizer)
        # --disaggregation-mode: a prefill instance sends its requests' KV to decode instances
        # (it never decodes); a decode instance's pool receives it (nanocp.disaggregation)
        mode = server_args.disaggregation_mode
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        if mode != "null":
            backend = KV_TRANSFER_BACKENDS.get(server_args.disaggregation_transfer_backend)
            transfer = backend(f"{mode}-{uuid.uuid4().hex[:12]}-{instance}", self.runner.kv_pool)
        if mode == "prefill":
            r = self.runner
            self.sender = KVSender(
                transfer, r.kv_pool, r.req_to_token_pool.req_to_token, r.page_allocator, self.ctx, instance
            )
            self.scheduler.after_forward = self.sender.after_forward
            self.scheduler.before_release = self.sender.before_release
        elif mode == "decode":
            self.receiver = KVReceiver(transfer, instance)
            self.to_router.send(encode(self.receiver.agent()))
        self.decode = decoder(PREFILL_WORKER_INBOX if mode == "prefill" else WORKER_INBOX)
        self._announced: dict[str, dict] = {}  # rid -> detok params not yet sent
        # [rid, cp_key] of requests finished since the last report: the router frees their
        # segments (the key tells a finished request from a newer one reusing its rid)
        self._finished: list[tuple[str, int | None]] = []
        self._cacheable: list[int] = []  # see Load.cacheable
        self._placed: dict[str, Req] = {}  # requests with a context-parallel plan, by rid

        self._last_report = 0.0

    def info(self) -> dict[str, Any]:
        r = self.runner
        return {
            "instance": self.instance,
            "max_total_num_tokens": r.max_total_num_tokens,
            "context_length": r.context_length,
            "vocab_size": r.vocab_size,
            "page_size": r.page_allocator.page_size,
            "dtype": str(r.dtype),
            "device": str(r.device),
            "pid": os.getpid(),
            "kv_layout": pool_layout(r.kv_pool),  # what a prefill and a decode server must share
        }

    def join_cluster(self, instance_tokens: list[int]) -> None:
        """Every instance's KV capacity, from the launcher once all are ready: a request the
        router placed may span them (KV pooling), as the HTTP boundary checked it."""
        self.limits = self.limits.with_pool(
            self.cp_config, instance_tokens, self.runner.page_allocator.page_size
        )

    # ---------------------------------------------------------------- messages
    def handle_safely(self, msg: Message) -> list[Output]:
        """handle(msg); an error it raises fails only the request the message is about."""
        try:
            return self.handle(msg)
        except Exception as e:
            rid = getattr(msg, "rid", None)
            logger.error(
                "instance %d: %s message of request %s failed", self.instance, type(msg).__name__, rid,
                exc_info=True,
            )  # fmt: skip
            if isinstance(msg, Reserve):  # the router waits for every holder's answer
                self.to_router.send(encode(Reserved(msg.cp_key, msg.start, False, self.instance)))
            status = 400 if isinstance(e, InvalidRequestError) else 500
            message = str(e) if status == 400 else f"instance {self.instance}: {type(e).__name__}: {e}"
            reason = {"type": "abort", "status_code": status, "message": message}
            if isinstance(msg, PrefillRequest) and self.sender is not None:  # its decode server is told
                self.sender.fail(prefill_rid(msg.decode_id, msg.cp_key), msg, reason)
                return []
            if not isinstance(msg, Generate):
                return []
            if msg.kv_from_prefill:  # the router waits for the home's answer too
                self.to_router.send(encode(Reserved(msg.cp_key, 0, False, self.instance, refused=True)))
            req = self.scheduler.find(msg.rid)
            if req is not None:  # queued before the error: take it out again
                return [self._encode(self.scheduler.fail(req, reason))]
            return [self._refused(msg, reason)]

    def _refused(self, msg: Generate, reason: dict) -> Output:
        """The output of a request this instance refuses before queueing it."""
        self._forget(msg.rid)
        out = ReqOutput(msg.rid, [], "", True, reason, len(msg.input_ids), 0)
        return self._encode(out, msg.cp_key)

    def _forget(self, rid: str) -> None:
        """Drop what this worker keeps of a request that will not run here (no output follows)."""
        self._placed.pop(rid, None)
        self._announced.pop(rid, None)

    def handle(self, msg: Message) -> list[Output]:
        if isinstance(msg, Generate):
            request_fault("worker", msg.rid)  # tests only (envs.fault_inject)
            params = check_generate(
                msg.input_ids,
                msg.sampling_params,
                self.limits,
                msg.return_logprob,
                msg.top_logprobs_num,
                placed=bool(msg.placement),
            )
            limit = self.max_queued_requests
            if limit is not None and len(self.scheduler.waiting) >= limit and not msg.kv_from_prefill:
                return [self._refused(msg, queue_full_reason(f"instance {self.instance}", limit))]
            req = self.make_req(
                msg.rid,
                msg.input_ids,
                params,
                return_logprob=msg.return_logprob,
                top_logprobs_num=msg.top_logprobs_num,
                need_text=False,
            )
            self._announced[req.rid] = detok_params(params)
            if msg.placement:
                req.set_placement(Placement([tuple(seg) for seg in msg.placement], self.instance))
                req.cp_key = msg.cp_key
                req.cached_prefix = msg.cached_prefix
                self._placed[req.rid] = req
            if msg.kv_from_prefill:
                return self._land(msg, req)
            self.scheduler.add_request(req)
        elif isinstance(msg, Reserve):
            cache = {"root": (msg.start, msg.context), "tokens": msg.tokens, "reuse": msg.reuse}
            ok = self.scheduler.reserve_foreign(msg.cp_key, msg.start, msg.end, **cache)
            dest = None
            if ok and msg.want_dest and self.receiver is not None:
                dest = self.receiver.holder_dests(self.scheduler.foreign, msg.cp_key, msg.start)
            found = self.scheduler.foreign.cached(msg.cp_key, msg.start) if ok else 0
            self.to_router.send(
                encode(Reserved(msg.cp_key, msg.start, ok, self.instance, dest, cached=found))
            )
        elif isinstance(msg, Grown):
            self.scheduler.apply_growth(msg.rid, msg.cp_key, tuple(msg.segment))
        elif isinstance(msg, Release):
            self.scheduler.release_foreign(msg.cp_key, msg.cache)
            landing = self.scheduler.drop_landing(msg.cp_key)
            if landing is not None:  # planned again later: forget it here
                self._forget(landing.rid)
        elif isinstance(msg, KVReady):
            return [self._encode(self.scheduler.start_landed(msg.cp_key, msg.token, msg.lp, msg.top))]
        elif isinstance(msg, KVFailed):
            req = self.scheduler.landing.get(msg.cp_key)
            if req is not None and req.rid == msg.rid:
                return [self._encode(self.scheduler.fail(req, msg.reason))]
        elif isinstance(msg, PrefillHello):
            self.sender.on_hello(msg)
        elif isinstance(msg, PrefillRequest):
            self._prefill(msg)
        elif isinstance(msg, PrefillAbort):
            req = self.scheduler.find(prefill_rid(msg.decode_id, msg.cp_key))
            if req is not None:
                return [
                    self._encode(self.scheduler.fail(req, {"type": "abort", "message": "aborted by request"}))
                ]
        elif isinstance(msg, Abort):
            out = self.scheduler.abort_request(msg.rid)
            if out is not None:
                return [self._encode(out)]
        elif isinstance(msg, FlushCache):
            self.scheduler.flush_cache()
        # Wake: a request arrived somewhere; its step starts without waiting for the idle poll.
        return []

    def _land(self, msg: Generate, req: Req) -> list[Output]:
        """Disaggregated decode: allocate the prompt's KV here and tell the router where it is."""
        ok = self.scheduler.land(req)
        dest = self.receiver.home_dests(req) if ok else None
        if not ok:
            self._forget(req.rid)
        self.to_router.send(encode(Reserved(msg.cp_key, 0, ok, self.instance, dest)))
        return []

    def _prefill(self, msg: PrefillRequest) -> None:
        """A prefill server's request: its prompt, then one token (sampled by its own params)."""
        sp = dict(msg.sampling_params)
        sp["max_new_tokens"] = 1
        sp["min_new_tokens"] = min(sp.get("min_new_tokens") or 0, 1)
        params = check_generate(msg.input_ids, sp, self.limits, msg.return_logprob, msg.top_logprobs_num)
        rid = prefill_rid(msg.decode_id, msg.cp_key)
        self.sender.track(rid, msg)
        req = self.make_req(
            rid, msg.input_ids, params, return_logprob=msg.return_logprob,
            top_logprobs_num=msg.top_logprobs_num, need_text=False,
        )  # fmt: skip
        self.scheduler.add_request(req)

    def _encode(self, out: ReqOutput, cp_key: int | None = None) -> Output:
        """The detokenizer's record of an output; cp_key: of a finished request not queued here."""
        d = Output(
            out.rid,
            out.new_token_ids,
            out.finished,
            out.finish_reason,
            out.prompt_tokens,
            out.completion_tokens,
        )
        d.cached_tokens = out.cached_tokens
        if out.token_logprobs is not None:
            d.lp = out.token_logprobs
            d.top = out.top_logprobs
        params = self._announced.pop(out.rid, None) if out.finished else self._announced.get(out.rid)
        if params is not None:
            d.detok = params
            if not out.finished:
                self._announced[out.rid] = None  # sent; keep the key so finish pops it
        if out.finished:
            # where the request's KV lived: [instance, tokens] per segment (the home holds the tail)
            req = self._placed.pop(out.rid, None)
            self._finished.append((out.rid, req.cp_key if req is not None else cp_key))
            failed = (out.finish_reason or {}).get("status_code") == 500  # its KV is not trusted
            if req is not None and out.completion_tokens and not failed:
                self._cacheable.append(req.cp_key)  # its holders' prompt KV is complete
            total = out.prompt_tokens + out.completion_tokens
            if req is None:
                d.placement = [[self.instance, total]]
            else:
                d.placement = req.placement.token_counts(total)
        return d

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_INTERVAL_S:
            return
        s = self.scheduler
        alloc, cache = s.kv.allocator, s.kv.cache
        load = Load(
            instance=self.instance,
            total_pages=alloc.num_pages,
            free_pages=s.kv.num_free_pages,  # evictable cached pages count as free
            page_size=alloc.page_size,
            running=len(s.running),
            waiting=len(s.waiting),
            kv_tokens=sum(r.kv_len for r in s.running),
            committed_tokens=s.committed_tokens(),
            retractions=s.num_retractions,
            cached_pages=cache.cached_pages if cache is not None else 0,
            cache_hit_tokens=cache.hit_tokens if cache is not None else 0,
            cache_query_tokens=cache.query_tokens if cache is not None else 0,
            step_kinds=s.step_kinds,
            finished=self._finished,
            cacheable=self._cacheable,
            trace=s.tracer.summary() if s.tracer is not None else None,
        )
        self.to_router.send(encode(load))
        self._finished, self._cacheable = [], []
        self._last_report = now

    def step_lockstep(self) -> list[ReqOutput]:
        """One step of expert-parallel instances: all agree (one small all-gather) on every
        instance's token count and mode; if any has work, all run, idle ones with an empty batch."""
        next_batch = self.scheduler.get_next_batch()
        sharded = int(bool(next_batch and next_batch[0].cp_work))
        local = (
            [next_batch[0].num_tokens, int(next_batch[0].forward_mode), sharded] if next_batch else [0, 0, 0]
        )
        gathered = self.parallel.all_gather_ints(local)
        counts = [g[0] for g in gathered]
        self._cluster_busy = any(counts)
        if not self._cluster_busy:
            return []
        batch, sampling = next_batch or (self.scheduler.idle_batch(), [])
        batch.global_num_tokens = counts
        if any(g[2] for g in gathered):  # some instance routes context-parallel work this step
            p, graphs = self.parallel, self.runner.graph_runner
            batch.dcp = build_dcp_plan(
                batch.cp_work or [],
                p.rank,
                p.world_size,
                self.scheduler.foreign,
                p.cpu_group,
                self.runner.device,
                graph=graphs is not None and graphs.can_run_dcp([g[1] for g in gathered], counts),
            )
        return self.scheduler.run_batch(batch, sampling)

    def run_forever(self) -> None:
        while True:
            busy = self.scheduler.has_work() or self._cluster_busy
            now = time.monotonic()
            if busy:
                self._idle_since = now
            idle_ms = IDLE_POLL_MS if now - self._idle_since < IDLE_BACKOFF_S else IDLE_MAX_POLL_MS
            if self.sender is not None and self.sender.out:
                idle_ms = 1  # transfers in flight: they progress when polled (KVSender.poll)
            elif self.scheduler.landing:  # KV landing: its notices are read every turn
                idle_ms = IDLE_POLL_MS
            outs: list[Output] = []
            for msg in drain(self.inbox, self.decode, timeout_ms=0 if busy else idle_ms):
                outs += self.handle_safely(msg)
            if self.lockstep:
                outs += [self._encode(o) for o in self.step_lockstep()]
            elif self.scheduler.has_work():
                outs += [self._encode(o) for o in self.scheduler.step()]
            outs += [self._encode(o) for o in self.scheduler.take_failed()]

            for ask in self.scheduler.growth_requests:
                self.to_router.send(encode(ask))
            self.scheduler.growth_requests.clear()
            if self.receiver is not None:
                for landed in self.receiver.landed():
                    self.to_router.send(encode(landed))
            if self.sender is not None:  # a prefill server's outputs are its PrefillDone answers
                self.sender.on_outputs(outs)
                self.sender.poll()
                outs = []
            if outs:
                self.to_detok.send(encode(Outputs(outs, self.instance)))
            if self.scheduler.flush_pending:
                self.scheduler.flush_cache()
            self.report(force=bool(self._finished) and not self.scheduler.has_work())


def run_worker_process(server_args: ServerArgs, instance: int, ports: dict, ready_conn) -> None:
    child_process_setup(f"worker{instance}", server_args.log_level)
    faults.configure(envs.fault_inject())  # tests only
    try:
        worker = Worker(server_args, instance, PortArgs(**ports))
    except BaseException as e:  # tell the launcher why, instead of dying silently
        ready_conn.send(
            {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        )
        raise SystemExit(1) from e
    ready_conn.send({"ok": True, **worker.info()})
    try:
        cluster = ready_conn.recv()  # once every instance is ready
    except EOFError:  # the launcher gave up (another instance failed to start)
        raise SystemExit(1) from None
    ready_conn.close()
    worker.join_cluster(cluster["instance_tokens"])
    try:
        worker.run_forever()
    except Exception:
        logger.error("instance %d failed:\n%s", instance, traceback.format_exc())
        raise SystemExit(1) from None
