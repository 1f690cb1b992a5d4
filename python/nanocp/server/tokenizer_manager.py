"""TokenizerManager: the HTTP process's side of the engine.

Tokenizes and validates requests, sends them to the router, and turns the detokenizer's outputs
back into per-request state that HTTP handlers await. Also follows cluster state (for /metrics
and /server_info) and fails in-flight requests when a process of the engine dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from nanocp.errors import InvalidRequestError
from nanocp.sampling.sampling_params import SamplingParams, short_repr
from nanocp.scheduler.validation import RequestLimits, check_generate
from nanocp.server.metrics import Metrics
from nanocp.server_args import ServerArgs
from nanocp_router.faults import request_fault
from nanocp_router.ipc import PortArgs, bind_address, decode_or_drop, push
from nanocp_router.messages import (
    TOKENIZER_INBOX,
    Abort,
    FlushCache,
    Generate,
    Output,
    Outputs,
    decoder,
    encode,
)

logger = logging.getLogger("nanocp.tokenizer_manager")


class EngineError(RuntimeError):
    """The engine could not serve the request (HTTP status in `status_code`; `retry_after`: seconds
    after which the client may try again, for 503 when the request queue is full)."""

    def __init__(self, status_code: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after

    @classmethod
    def from_reason(cls, reason: dict) -> EngineError:
        """The error of a request the engine finished with {"type": "abort", "status_code", ...}."""
        return cls(reason["status_code"], reason.get("message", "aborted"), reason.get("retry_after"))


@dataclass
class ReqState:
    rid: str
    prompt_tokens: int
    created: float = field(default_factory=time.perf_counter)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list]] = field(default_factory=list)
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    first_token_time: float | None = None
    placement: list[list[int]] | None = None  # [instance, tokens] per KV segment (when finished)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    error: EngineError | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    # what the latest event added (for OpenAI-style delta streaming)
    delta_text: str = ""
    delta_ids: list[int] = field(default_factory=list)

    def result(self, return_logprob: bool = False) -> dict[str, Any]:
        """The request as /generate answers it (so far, or finished)."""
        return {
            "text": self.text,
            "output_ids": list(self.output_ids),
            "meta_info": self.meta_info(return_logprob),
        }

    def meta_info(self, return_logprob: bool = False) -> dict[str, Any]:
        meta = {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "e2e_latency": round(time.perf_counter() - self.created, 6),
        }
        if self.placement is not None:
            meta["cp_degree"] = len({inst for inst, _ in self.placement})
            meta["placement"] = self.placement

        if return_logprob:
            meta["output_token_logprobs"] = [
                [lp, t, None] for lp, t in zip(self.token_logprobs, self.output_ids)
            ]
            if self.top_logprobs:
                meta["output_top_logprobs"] = [[[lp, t, None] for lp, t in top] for top in self.top_logprobs]
        return meta


class TokenizerManager:
    def __init__(
        self, server_args: ServerArgs, ports: PortArgs, worker_infos: list[dict], tokenizer: Any
    ) -> None:
        self.server_args = server_args
        self.tokenizer = tokenizer
        self.worker_infos = worker_infos
        self.vocab_size = min(i["vocab_size"] for i in worker_infos)
        self.context_length = min(i["context_length"] for i in worker_infos)
        self.max_total_tokens = min(i["max_total_num_tokens"] for i in worker_infos)
        # the workers' own rules (request.check_generate), against the smallest instance, or the
        # KV the planner can place over several (KV pooling)
        self.limits = RequestLimits(
            self.vocab_size, self.context_length, self.max_total_tokens, tokenizer is not None
        ).with_pool(
            server_args.cp_config(),
            [i["max_total_num_tokens"] for i in worker_infos],
            min(i["page_size"] for i in worker_infos),
        )
        self.metrics = Metrics()
        self.cluster: list[dict] = []
        self.cp_degrees: dict[str, int] = {}  # context-parallel degree -> requests placed (router)
        self.cp_growth_segments: dict[str, int] = {}  # tail quotas placed on the home / moved (router)
        self.disaggregation: dict | None = None  # a decode server's prefill side (router)

        self.dead: str | None = None
        self.states: dict[str, ReqState] = {}
        self.process_pids: dict[str, int] = {}  # every engine process, for /server_info
        self._sync_ctx = zmq.Context()
        self.to_router = push(self._sync_ctx, ports.router)
        self._async_ctx = zmq.asyncio.Context()
        self.inbox = self._async_ctx.socket(zmq.PULL)
        self.inbox.bind(bind_address(ports.tokenizer))
        self.decode = decoder(TOKENIZER_INBOX)
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._handle_loop())

    def close(self) -> None:
        """Stop the output loop and close the sockets (on the loop's thread); a zmq context left
        with open sockets blocks the interpreter's exit."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.inbox.close(linger=0)
        self.to_router.close(linger=0)
        self._async_ctx.term()
        self._sync_ctx.term()

    # --------------------------------------------------------------- requests
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("text", "the server runs with --skip-tokenizer-init; send input_ids")
        return self.tokenizer.encode(text)

    def validate(
        self,
        input_ids: Any,
        sampling_params: Any,
        return_logprob: Any = False,
        top_logprobs_num: Any = 0,
        data_parallel_rank: int | None = None,
    ) -> tuple[list[int], SamplingParams]:
        """The request as the workers will check it (request.check_generate); errors name the
        field. A request pinned to an instance (data_parallel_rank) stays on it: one pool."""
        params = check_generate(
            input_ids, sampling_params, self.limits, return_logprob, top_logprobs_num,
            placed=data_parallel_rank is None,
        )  # fmt: skip
        return input_ids, params

    def max_request_tokens(self) -> int:
        """The most KV tokens (prompt + output) a request the router places may use."""
        return self.limits.kv_capacity(placed=True)[0]

    def check_rids(self, rids: list[str | None]) -> None:
        """Request ids given by the client must not be in flight already (checked before any starts)."""
        taken = next((r for r in rids if r is not None and r in self.states), None)
        if taken is not None:
            raise InvalidRequestError("rid", f"request id {short_repr(taken)} is already in use")

    async def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        rid: str | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncIterator[ReqState]:
        """Yields the request's state after every update; the last one has finished=True.
        Leaving the iteration early (client gone) aborts the request. data_parallel_rank pins the
        request to one instance (as in SGLang) instead of letting the router choose."""
        if self.dead:
            raise EngineError(503, self.dead)
        if self.server_args.disaggregation_mode == "prefill":
            raise EngineError(
                400,
                "this is a prefill server (--disaggregation-mode prefill): send requests to its decode server",
            )
        rid = rid or uuid.uuid4().hex
        self.check_rids([rid])
        state = ReqState(rid, len(input_ids))
        self.states[rid] = state
        self.metrics.in_flight.inc()
        msg = Generate(
            rid,
            input_ids,
            params.to_dict(),
            return_logprob,
            top_logprobs_num if return_logprob else 0,
            data_parallel_rank,
        )
        try:
            self.to_router.send(encode(msg))
            while True:
                await state.event.wait()
                state.event.clear()
                if state.error is not None:
                    raise state.error
                yield state
                state.delta_text, state.delta_ids = "", []
                if state.finished:
                    return
        finally:
            self.states.pop(rid, None)
            self.metrics.in_flight.dec()
            if not state.finished:
                self.abort(rid)
                self._record(state, "error" if state.error else "abort")

    def abort(self, rid: str) -> None:
        self.to_router.send(encode(Abort(rid)))

    def abort_all(self) -> None:
        for rid in list(self.states):
            self.abort(rid)

    def flush_cache(self) -> str | None:
        """Empty every instance's prefix cache; refused (the reason) while requests are in
        flight, as SGLang: their cached prefixes are in use."""
        if self.states:
            return f"cache not flushed: {len(self.states)} requests in flight (retry when they finish)"
        self.to_router.send(encode(FlushCache()))
        return None

    # ---------------------------------------------------------------- inbound
    async def _handle_loop(self) -> None:
        while True:
            msg = decode_or_drop(self.decode, await self.inbox.recv())
            if msg is None:
                continue
            if isinstance(msg, Outputs):
                for out in msg.outputs:
                    self._on_output_safely(out)
            else:  # Cluster
                try:
                    self.cluster = msg.instances
                    self.cp_degrees = msg.cp_degrees
                    self.cp_growth_segments = msg.cp_growth_segments
                    self.disaggregation = msg.disaggregation
                    self.metrics.on_cluster(
                        self.cluster,
                        self.cp_degrees,
                        self.cp_growth_segments,
                        msg.router_queue,
                        msg.disaggregation,
                    )
                except Exception:
                    logger.exception("cluster snapshot not applied")

    def _on_output_safely(self, out: Output) -> None:
        """_on_output; an error fails only that output's request (500), which is then aborted."""
        try:
            self._on_output(out)
        except Exception as e:
            logger.exception("output of request %s not handled", out.rid)
            state = self.states.get(out.rid)
            if state is not None and state.error is None:
                state.error = EngineError(
                    500, f"internal error handling the request's output: {type(e).__name__}: {e}"
                )
                state.event.set()

    def _on_output(self, out: Output) -> None:
        state = self.states.get(out.rid)
        if state is None:
            return  # aborted by the client meanwhile
        request_fault("tokenizer", out.rid)  # tests only (envs.fault_inject)
        if out.ids and state.first_token_time is None:
            state.first_token_time = time.perf_counter()
        state.text += out.text
        state.delta_text += out.text
        state.output_ids += out.ids
        state.delta_ids += out.ids
        state.token_logprobs += out.lp or []
        state.top_logprobs += out.top or []
        state.cached_tokens = max(state.cached_tokens, out.cached_tokens)
        if out.finished:
            reason = out.reason or {}
            outcome = reason.get("type", "unknown")
            if reason.get("type") == "abort" and "status_code" in reason:
                state.error = EngineError.from_reason(reason)
                outcome = "rejected" if state.error.retry_after is not None else "error"
            state.finished = not out.upstream_running  # see Detokenizer.process_safely
            state.finish_reason = reason
            state.placement = out.placement
            if state.finished:
                self._record(state, outcome)
        state.event.set()

    def _record(self, state: ReqState, outcome: str) -> None:
        ttft = state.first_token_time - state.created if state.first_token_time else None
        self.metrics.on_finish(
            outcome, state.prompt_tokens, len(state.output_ids), ttft, time.perf_counter() - state.created
        )

    def on_process_death(self, message: str) -> None:
        """A process of the engine died (or a node was lost): fail everything in flight, refuse
        new work. Later deaths are added to the reason (the first may be a consequence: an
        instance whose peer node vanished fails in its collective before the node is declared
        lost)."""
        if self.dead is None:
            self.dead = message
        elif message not in self.dead and self.dead.count("; ") < 3:
            self.dead = f"{self.dead}; {message}"
        for state in list(self.states.values()):
            state.error = EngineError(503, message)
            state.event.set()
