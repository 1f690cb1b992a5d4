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

from nanocp_router.layout import NodeLayout
from nanocp_router.messages import Message, Wake, encode

logger = logging.getLogger("nanocp.ipc")


@dataclass
class PortArgs:
    """Endpoints of one server: ipc:// sockets in a private directory on one node; on several,
    TCP ports on node 0 (layout.NodeLayout lists them)."""

    ipc_dir: str | None
    tokenizer: str  # HTTP/tokenizer process pulls outputs and cluster state here
    router: str  # router pulls requests (from the tokenizer) and load reports (from workers)
    detokenizer: str  # detokenizer pulls token outputs from the workers
    workers: list[str] = field(default_factory=list)  # worker i pulls its requests here
    # the instances' torch.distributed rendezvous: tcp://127.0.0.1:P on one node (instance 0
    # hosts it); on several, a TCPStore that node 0's launcher hosts (dist_store)
    dist_init: str = ""
    dist_store: bool = False
    control: str | None = None  # node control (several nodes)
    # several nodes: the router binds the worker inboxes and the workers connect to them, so
    # every socket is on node 0 and the other nodes need only its address
    router_binds_workers: bool = False

    @classmethod
    def create(cls, dp_size: int) -> PortArgs:
        d = tempfile.mkdtemp(prefix=f"nanocp-{uuid.uuid4().hex[:6]}-")
        ep = lambda name: f"ipc://{os.path.join(d, name)}"  # noqa: E731
        workers = [ep(f"worker{i}") for i in range(dp_size)]
        dist = f"tcp://127.0.0.1:{free_tcp_port()}"
        return cls(d, ep("tokenizer"), ep("router"), ep("detokenizer"), workers, dist)

    @classmethod
    def for_layout(cls, layout: NodeLayout) -> PortArgs:
        if not layout.multinode:
            return cls.create(layout.dp_size)
        workers = [f"tcp://{layout.host}:{layout.worker_port(i)}" for i in range(layout.dp_size)]
        return cls(
            None,
            layout.endpoint("tokenizer"),
            layout.endpoint("router"),
            layout.endpoint("detokenizer"),
            workers,
            layout.endpoint("dist"),
            dist_store=True,
            control=layout.endpoint("control"),
            router_binds_workers=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bind_address(endpoint: str) -> str:
    """Where the binding side listens: a tcp:// endpoint on every interface of its node."""
    if endpoint.startswith("tcp://"):
        return "tcp://*:" + endpoint.rpartition(":")[2]
    return endpoint


def pull(ctx: zmq.Context, endpoint: str, bind: bool = True) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.bind(bind_address(endpoint)) if bind else sock.connect(endpoint)
    return sock


def push(ctx: zmq.Context, endpoint: str, bind: bool = False) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(bind_address(endpoint)) if bind else sock.connect(endpoint)
    return sock


def send_work(workers: list[zmq.Socket], inst: int, msg: Message) -> None:
    """Work for one instance; the others get a Wake so that a lockstep cluster idling in its
    slow poll starts the step at once (every instance takes part in every step)."""
    workers[inst].send(encode(msg))
    if len(workers) > 1:
        wake = encode(Wake())
        for i, w in enumerate(workers):
            if i != inst:
                w.send(wake)


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
