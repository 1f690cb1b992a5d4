"""Detokenizer process: token ids from the workers -> text deltas for the HTTP process."""

from __future__ import annotations

import logging

import msgspec
import zmq

from nanocp import envs
from nanocp.server_args import ServerArgs
from nanocp.tokenizer.detokenizer import TextStream, load_tokenizer
from nanocp_router import faults
from nanocp_router.faults import request_fault
from nanocp_router.ipc import PortArgs, drain, pull, push
from nanocp_router.messages import DETOKENIZER_INBOX, Output, Outputs, decoder, encode
from nanocp_router.process import child_process_setup

logger = logging.getLogger("nanocp.detokenizer")


class Detokenizer:
    def __init__(self, server_args: ServerArgs, ports: PortArgs) -> None:
        self.tokenizer = (
            None
            if server_args.skip_tokenizer_init
            else load_tokenizer(server_args.tokenizer_path, server_args.trust_remote_code)
        )
        self.ctx = zmq.Context()
        self.inbox = pull(self.ctx, ports.detokenizer)
        self.decode = decoder(DETOKENIZER_INBOX)
        self.to_tokenizer = push(self.ctx, ports.tokenizer)
        self.streams: dict[str, tuple[TextStream, list[int]]] = {}
        self.failed: set[str] = set()  # requests failed here whose worker still runs them (until aborted)

    def process_safely(self, out: Output) -> Output | None:
        """process(out); an error fails only that request: its client gets a 500, and the output says
        `upstream_running` while the worker still runs it, so that the HTTP side aborts it there.
        Its later outputs are dropped. None: nothing to send."""
        rid = out.rid
        if rid in self.failed:
            if out.finished:
                self.failed.discard(rid)
            return None
        try:
            return self.process(out)
        except Exception as e:
            logger.exception("detokenizer: output of request %s failed", rid)
            self.streams.pop(rid, None)
            running = not out.finished
            if running:
                self.failed.add(rid)
            reason = {"type": "abort", "status_code": 500, "message": f"detokenizer: {type(e).__name__}: {e}"}
            return Output.failed(
                rid, reason, out.prompt_tokens, out.completion_tokens, upstream_running=running
            )

    def process(self, out: Output) -> Output:
        rid = out.rid
        request_fault("detokenizer", rid)  # tests only (envs.fault_inject)
        if rid not in self.streams:
            self.streams[rid] = (TextStream(self.tokenizer, **(out.detok or {})), [])
        stream, ids = self.streams[rid]
        ids.extend(out.ids)
        if out.ids:
            stream.update(ids)
        if out.finished:
            matched = (out.reason or {}).get("matched")
            stream.finish(ids, matched if isinstance(matched, str) else None)
            del self.streams[rid]
        return msgspec.structs.replace(out, detok=None, text=stream.take_delta())

    def run_forever(self) -> None:
        while True:
            for msg in drain(self.inbox, self.decode, timeout_ms=1000):
                outs = [r for r in map(self.process_safely, msg.outputs) if r is not None]
                if outs:
                    self.to_tokenizer.send(encode(Outputs(outs)))


def run_detokenizer_process(server_args: ServerArgs, ports: dict) -> None:
    child_process_setup("detokenizer", server_args.log_level)
    faults.configure(envs.fault_inject())  # tests only
    Detokenizer(server_args, PortArgs(**ports)).run_forever()
