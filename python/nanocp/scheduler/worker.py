"""Worker process: one instance's scheduler loop behind ZMQ.

Receives requests from the router, runs scheduler steps, sends new token ids to the
detokenizer and load reports to the router.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

import torch
import zmq

from nanocp.distributed.dcp import build_dcp_step
from nanocp.distributed.parallel_state import init_parallel_state, instance_device
from nanocp.engine.step_trace import StepTracer
from nanocp.errors import InvalidRequestError
from nanocp.fault_injection import request_fault
from nanocp.model_executor.model_runner import ModelRunner
from nanocp.sampling.sampling_params import SamplingParams
from nanocp.scheduler.request import Req, RequestFactory, check_generate
from nanocp.scheduler.scheduler import ReqOutput, Scheduler
from nanocp.server_args import ServerArgs
from nanocp.tokenizer.detokenizer import eos_token_ids, load_tokenizer
from nanocp_router.cluster_state import REPORT_INTERVAL_S
from nanocp_router.ipc import PortArgs, drain, dumps, pull, push
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
        self.parallel = init_parallel_state(instance, dp, server_args.ep_size, device, ports.dist_port)
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
        self.inbox = pull(self.ctx, ports.workers[instance])
        self.to_router = push(self.ctx, ports.router)
        self.to_detok = push(self.ctx, ports.detokenizer)
        self._announced: dict[str, dict] = {}  # rid -> detok params not yet sent
        # [rid, cp_key] of requests finished since the last report: the router frees their
        # segments (the key tells a finished request from a newer one reusing its rid)
        self._finished: list[list] = []
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
        }

    def join_cluster(self, instance_tokens: list[int]) -> None:
        """Every instance's KV capacity, from the launcher once all are ready: a request the
        router placed may span them (KV pooling), as the HTTP boundary checked it."""
        self.limits = self.limits.with_pool(
            self.cp_config, instance_tokens, self.runner.page_allocator.page_size
        )

    # ---------------------------------------------------------------- messages
    def handle_safely(self, msg: dict) -> list[dict]:
        """handle(msg); an error it raises fails only the request the message is about."""
        try:
            return self.handle(msg)
        except Exception as e:
            kind, rid = msg.get("type"), msg.get("rid")
            logger.error(
                "instance %d: %s message of request %s failed", self.instance, kind, rid, exc_info=True
            )
            if kind == "reserve":  # the router waits for every holder's answer
                reply = {
                    "type": "reserved",
                    "cp_key": msg.get("cp_key"),
                    "start": msg.get("start"),
                    "ok": False,
                }
                self.to_router.send(dumps({**reply, "instance": self.instance}))
            if kind != "generate" or not isinstance(rid, str):
                return []
            status = 400 if isinstance(e, InvalidRequestError) else 500
            message = str(e) if status == 400 else f"instance {self.instance}: {type(e).__name__}: {e}"
            req = self.scheduler.find(rid)
            reason = {"type": "abort", "status_code": status, "message": message}
            if req is not None:  # queued before the error: take it out again
                return [self._encode(self.scheduler.fail(req, reason))]
            return [self._finished_output(rid, msg, reason)]

    def _finished_output(self, rid: str, msg: dict, reason: dict) -> dict:
        """The output of a request this instance refuses before queueing it."""
        ids = msg.get("input_ids")
        prompt_tokens = len(ids) if isinstance(ids, list) else 0
        self._placed.pop(rid, None)
        self._announced.pop(rid, None)
        return self._encode(ReqOutput(rid, [], "", True, reason, prompt_tokens, 0), msg.get("cp_key"))

    def handle(self, msg: dict) -> list[dict]:
        kind = msg["type"]
        if kind == "generate":
            request_fault("worker", msg["rid"])  # tests only (envs.fault_inject)
            params = check_generate(
                msg["input_ids"],
                msg["sampling_params"],
                self.limits,
                msg.get("return_logprob", False),
                msg.get("top_logprobs_num", 0),
                placed=bool(msg.get("placement")),
            )
            limit = self.max_queued_requests
            if limit is not None and len(self.scheduler.waiting) >= limit:
                reason = queue_full_reason(f"instance {self.instance}", limit)
                return [self._finished_output(msg["rid"], msg, reason)]
            req = self.make_req(
                msg["rid"],
                msg["input_ids"],
                params,
                return_logprob=msg.get("return_logprob", False),
                top_logprobs_num=msg.get("top_logprobs_num", 0),
                need_text=False,
            )
            self._announced[req.rid] = detok_params(params)
            if msg.get("placement"):
                req.set_placement([tuple(seg) for seg in msg["placement"]], self.instance)
                req.cp_key = msg["cp_key"]
                self._placed[req.rid] = req
            self.scheduler.add_request(req)
        elif kind == "reserve":
            ok = self.scheduler.reserve_foreign(msg["cp_key"], msg["start"], msg["end"])
            reply = {"type": "reserved", "cp_key": msg["cp_key"], "start": msg["start"], "ok": ok}
            self.to_router.send(dumps({**reply, "instance": self.instance}))
        elif kind == "grown":
            self.scheduler.apply_growth(msg["rid"], msg["cp_key"], tuple(msg["segment"]))
        elif kind == "release":
            self.scheduler.release_foreign(msg["cp_key"])
        elif kind == "abort":
            out = self.scheduler.abort_request(msg["rid"])
            if out is not None:
                return [self._encode(out)]
        elif kind == "flush_cache":
            pass  # no prefix cache yet: nothing is kept beyond running requests
        elif kind == "wake":
            pass  # a request arrived somewhere: its step starts without waiting for the idle poll
        else:
            logger.warning("worker: unknown message type %r", kind)
        return []

    def _encode(self, out: ReqOutput, cp_key: int | None = None) -> dict:
        """The detokenizer's record of an output; cp_key: of a finished request not queued here."""
        d = {
            "rid": out.rid,
            "ids": out.new_token_ids,
            "finished": out.finished,
            "reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
        }
        if out.token_logprobs is not None:
            d["lp"] = out.token_logprobs
            if out.top_logprobs is not None:
                d["top"] = out.top_logprobs
        params = self._announced.pop(out.rid, None) if out.finished else self._announced.get(out.rid)
        if params is not None:
            d["detok"] = params
            if not out.finished:
                self._announced[out.rid] = None  # sent; keep the key so finish pops it
        if out.finished:
            # where the request's KV lived: [instance, tokens] per segment (the home holds the tail)
            req = self._placed.pop(out.rid, None)
            self._finished.append([out.rid, req.cp_key if req is not None else cp_key])
            total = out.prompt_tokens + out.completion_tokens
            if req is None:
                d["placement"] = [[self.instance, total]]
            else:
                segs = [[inst, min(end, total) - start] for inst, start, end in req.placement]
                d["placement"] = [seg for seg in segs if seg[1] > 0] or segs[:1]
        return d

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_INTERVAL_S:
            return
        s = self.scheduler
        alloc = s.kv.allocator
        self.to_router.send(
            dumps(
                {
                    "type": "load",
                    "instance": self.instance,
                    "total_pages": alloc.num_pages,
                    "free_pages": alloc.num_free_pages,
                    "page_size": alloc.page_size,
                    "running": len(s.running),
                    "waiting": len(s.waiting),
                    "kv_tokens": sum(r.kv_len for r in s.running),
                    "committed_tokens": s.committed_tokens(),
                    "retractions": s.num_retractions,
                    "step_kinds": s.step_kinds,
                    "finished": self._finished,
                    "trace": s.tracer.summary() if s.tracer is not None else None,
                }
            )
        )
        self._finished = []
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
            p = self.parallel
            batch.dcp = build_dcp_step(
                batch.cp_work or [],
                p.rank,
                p.world_size,
                self.scheduler.foreign,
                p.a2a,
                p.cpu_group,
                self.runner.device,
            )
            graphs = self.runner.graph_runner
            batch.dcp.graph = graphs is not None and graphs.can_run_dcp([g[1] for g in gathered], counts)
        return self.scheduler.run_batch(batch, sampling)

    def run_forever(self) -> None:
        while True:
            busy = self.scheduler.has_work() or self._cluster_busy
            now = time.monotonic()
            if busy:
                self._idle_since = now
            idle_ms = IDLE_POLL_MS if now - self._idle_since < IDLE_BACKOFF_S else IDLE_MAX_POLL_MS
            outs: list[dict] = []
            for msg in drain(self.inbox, timeout_ms=0 if busy else idle_ms):
                outs += self.handle_safely(msg)
            if self.lockstep:
                outs += [self._encode(o) for o in self.step_lockstep()]
            elif self.scheduler.has_work():
                outs += [self._encode(o) for o in self.scheduler.step()]
            outs += [self._encode(o) for o in self.scheduler.take_failed()]

            for ask in self.scheduler.growth_requests:
                self.to_router.send(dumps(ask))
            self.scheduler.growth_requests.clear()
            if outs:
                self.to_detok.send(dumps({"type": "out", "instance": self.instance, "outputs": outs}))
            self.report(force=bool(self._finished) and not self.scheduler.has_work())


def run_worker_process(server_args: ServerArgs, instance: int, ports: dict, ready_conn) -> None:
    child_process_setup(f"worker{instance}", server_args.log_level)
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
