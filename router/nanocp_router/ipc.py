"""ZMQ sockets between NanoCP processes, carrying JSON-encoded typed messages (nanocp_router.messages;
no pickle on the wire)."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

logger = logging.getLogger("nanocp.ipc")


@dataclass
class PortArgs:
    """IPC endpoints of one server (ipc:// sockets in a private directory)."""

    ipc_dir: str
    tokenizer: str  # HTTP/tokenizer process pulls outputs and cluster state here
    router: str  # router pulls requests (from the tokenizer) and load reports (from workers)
    detokenizer: str  # detokenizer pulls token outputs from the workers
    workers: list[str] = field(default_factory=list)  # worker i pulls its requests here
    dist_port: int = 0  # TCP port on 127.0.0.1 for torch.distributed rendezvous of the instances

    @classmethod
    def create(cls, dp_size: int) -> PortArgs:
        d = tempfile.mkdtemp(prefix=f"nanocp-{uuid.uuid4().hex[:6]}-")
        ep = lambda name: f"ipc://{os.path.join(d, name)}"  # noqa: E731
        workers = [ep(f"worker{i}") for i in range(dp_size)]
        return cls(d, ep("tokenizer"), ep("router"), ep("detokenizer"), workers, free_tcp_port())

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pull(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    return sock


def push(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def drain(sock: zmq.Socket, decode: msgspec.json.Decoder, timeout_ms: int = 0) -> list[Any]:
    """Every message waiting on sock, decoded (waiting up to timeout_ms for the first one). A
    message the receiver does not accept (kind, field types) is logged and dropped."""
    out = []
    if timeout_ms and not sock.poll(timeout_ms):
        return out
    while True:
        try:
            data = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return out
        msg = decode_or_drop(decode, data)
        if msg is not None:
            out.append(msg)


def decode_or_drop(decode: msgspec.json.Decoder, data: bytes) -> Any | None:
    """The message in `data`, or None (logged) when the receiver does not accept it."""
    try:
        return decode.decode(data)
    except msgspec.DecodeError as e:
        logger.error("dropped a message this process does not accept (%s): %.200r", e, data)
        return None


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
