"""Detokenizer process: token ids from the workers -> text deltas for the HTTP process."""

from __future__ import annotations

import logging

import zmq

from nanocp.server_args import ServerArgs
from nanocp.tokenizer.detokenizer import TextStream, load_tokenizer
from nanocp_router.ipc import PortArgs, drain, dumps, pull, push
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
        self.to_tokenizer = push(self.ctx, ports.tokenizer)
        self.streams: dict[str, tuple[TextStream, list[int]]] = {}

    def process(self, out: dict) -> dict:
        rid = out["rid"]
        if rid not in self.streams:
            params = out.get("detok") or {}
            self.streams[rid] = (TextStream(self.tokenizer, **params), [])
        stream, ids = self.streams[rid]
        ids.extend(out["ids"])
        if out["ids"]:
            stream.update(ids)
        if out["finished"]:
            matched = (out["reason"] or {}).get("matched")
            stream.finish(ids, matched if isinstance(matched, str) else None)
            del self.streams[rid]
        result = {k: v for k, v in out.items() if k != "detok"}
        result["text"] = stream.take_delta()
        return result

    def run_forever(self) -> None:
        while True:
            for msg in drain(self.inbox, timeout_ms=1000):
                outs = [self.process(o) for o in msg["outputs"]]
                self.to_tokenizer.send(dumps({"type": "out", "outputs": outs}))


def run_detokenizer_process(server_args: ServerArgs, ports: dict) -> None:
    child_process_setup("detokenizer", server_args.log_level)
    Detokenizer(server_args, PortArgs(**ports)).run_forever()
