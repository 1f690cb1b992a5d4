"""The launchers of a multi-node server talking to each other (layout.NodeLayout; no torch).

Node 0's launcher binds a ROUTER socket on the control port; every other node's launcher
connects a DEALER named after its rank. A node joins with NodeReady once its instances have
loaded; node 0 answers every node with ClusterReady once all instances are ready. With
--router-only node 0 has no torch, so the node of instance 0 hosts the instances' rendezvous
store and says where (NodeStore); node 0 passes it on (DistStore) to every node that said
NodeHello, which start their instances only then. Then both
sides send NodeAlive every HEARTBEAT_S: node 0 reports a node that was silent for NODE_TIMEOUT_S
or sent NodeDown (one of its processes died) as down (the server turns unhealthy); a node stops
its processes when node 0 sends Shutdown or falls silent for NODE_TIMEOUT_S.
Each socket is used by one thread at a time: the launcher's until watch() starts, then the
watcher's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from nanocp_router.ipc import bind_address, decode_or_drop
from nanocp_router.messages import (
    HEAD_CONTROL_INBOX,
    NODE_CONTROL_INBOX,
    ClusterReady,
    DistStore,
    NodeAlive,
    NodeDown,
    NodeHello,
    NodeReady,
    NodeStore,
    Shutdown,
    decoder,
    encode,
)

logger = logging.getLogger("nanocp.nodes")
HEARTBEAT_S = 1.0
NODE_TIMEOUT_S = 5.0


def _identity(node: int) -> bytes:
    return f"node-{node}".encode()


class HeadControl:
    """Node 0's end."""

    def __init__(self, endpoint: str, nnodes: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.bind(bind_address(endpoint))
        self.nodes = range(1, nnodes)
        self.decode = decoder(HEAD_CONTROL_INBOX)
        self.last_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _recv(self, timeout_ms: int) -> Any | None:
        if not self.sock.poll(timeout_ms):
            return None
        _, data = self.sock.recv_multipart()
        msg = decode_or_drop(self.decode, data)
        if msg is not None:
            self.last_seen[msg.node] = time.monotonic()
        return msg

    def _send(self, node: int, msg: Any) -> None:
        self.sock.send_multipart([_identity(node), encode(msg)], flags=zmq.NOBLOCK)

    def wait_ready(self, deadline: float, check: Callable[[], None]) -> dict[int, list[dict]]:
        """Every other node's instances' info, by node. check() runs between polls (it raises
        when a local process died); a NodeDown or the deadline raises RuntimeError."""
        ready: dict[int, list[dict]] = {}
        hello: set[int] = set()
        store: str | None = None
        while len(ready) < len(self.nodes):
            check()
            msg = self._recv(200)
            if isinstance(msg, NodeHello):
                hello.add(msg.node)
                if store is not None:
                    self._send(msg.node, DistStore(store))
            elif isinstance(msg, NodeStore):
                store = msg.address
                logger.info("node %d hosts the instances' store at %s", msg.node, store)
                for node in hello:
                    self._send(node, DistStore(store))
            elif isinstance(msg, NodeReady):
                ready[msg.node] = msg.instances
                logger.info("node %d joined with %d instance(s)", msg.node, len(msg.instances))
            elif isinstance(msg, NodeDown):
                raise RuntimeError(f"node {msg.node} failed to start: {msg.message}")
            if time.monotonic() > deadline:
                missing = sorted(set(self.nodes) - set(ready))
                raise RuntimeError(f"node(s) {missing} did not join within the startup timeout")
        return ready

    def start_cluster(self, instance_tokens: list[int]) -> None:
        for node in self.nodes:
            self._send(node, ClusterReady(instance_tokens))

    def watch(self, on_down: Callable[[str], None]) -> None:
        """From a thread: heartbeats; on_down(message) once for a node that is down."""
        now = time.monotonic()
        for node in self.nodes:
            self.last_seen.setdefault(node, now)

        def run() -> None:
            down: set[int] = set()
            next_beat = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    for node in self.nodes:
                        self._send(node, NodeAlive(0))
                    next_beat = now + HEARTBEAT_S
                msg = self._recv(100)
                reasons = {}
                if isinstance(msg, NodeDown):
                    reasons[msg.node] = f"node {msg.node}: {msg.message}"
                for node in self.nodes:
                    silent = time.monotonic() - self.last_seen[node]
                    if silent > NODE_TIMEOUT_S:
                        reasons.setdefault(node, f"node {node} lost: no heartbeat for {silent:.0f} s")
                for node, reason in reasons.items():
                    if node not in down:
                        down.add(node)
                        logger.error("%s; the server cannot serve requests", reason)
                        on_down(reason)
            for node in self.nodes:  # stopping: the other nodes stop too
                self._send(node, Shutdown("node 0 stopped"))

        self._thread = threading.Thread(target=run, daemon=True, name="nanocp-nodes")
        self._thread.start()

    def close(self) -> None:
        """Tell the other nodes to stop (from the watcher, if it runs) and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        else:
            for node in self.nodes:
                self._send(node, Shutdown("node 0 stopped"))
        self.sock.close()
        self.ctx.term()


class NodeControl:
    """Node r's end (r >= 1)."""

    def __init__(self, endpoint: str, node: int) -> None:
        self.node = node
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, _identity(node))
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.connect(endpoint)
        self.decode = decoder(NODE_CONTROL_INBOX)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _recv(self, timeout_ms: int) -> Any | None:
        if not self.sock.poll(timeout_ms):
            return None
        return decode_or_drop(self.decode, self.sock.recv())

    def ready(self, instances: list[dict]) -> None:
        self.sock.send(encode(NodeReady(self.node, instances)))

    def host_store(self, address: str) -> None:
        self.sock.send(encode(NodeStore(self.node, address)))

    def wait_store(self, deadline: float) -> str:
        """Where the instances' store is (--router-only), from node 0."""
        self.sock.send(encode(NodeHello(self.node)))
        return self._wait(DistStore, deadline, lambda: None, "say where the instances' store is").address

    def wait_cluster(self, deadline: float, check: Callable[[], None]) -> list[int]:
        """Every instance's KV capacity, once node 0 has all instances ready."""
        return self._wait(ClusterReady, deadline, check, "start the cluster").instance_tokens

    def _wait(self, kind: type, deadline: float, check: Callable[[], None], what: str) -> Any:
        """The next `kind` message from node 0; check() between polls; Shutdown or the deadline
        raise RuntimeError."""
        while True:
            check()
            msg = self._recv(200)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Shutdown):
                raise RuntimeError(f"node 0 stopped the server while starting: {msg.reason}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node 0 did not {what} within the startup timeout")

    def report_down(self, message: str) -> None:
        """Before this node stops because one of its processes died (watcher stopped first)."""
        self.sock.send(encode(NodeDown(self.node, message)), flags=zmq.NOBLOCK)

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """From a thread: heartbeats; on_lost(reason) once node 0 stops or falls silent."""

        def run() -> None:
            last, next_beat = time.monotonic(), 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self.sock.send(encode(NodeAlive(self.node)), flags=zmq.NOBLOCK)
                    next_beat = now + HEARTBEAT_S
                msg = self._recv(100)
                if msg is not None:
                    last = time.monotonic()
                if isinstance(msg, Shutdown):
                    on_lost(msg.reason)
                    return
                if time.monotonic() - last > NODE_TIMEOUT_S:
                    on_lost(f"node 0 lost: no heartbeat for {NODE_TIMEOUT_S:.0f} s")
                    return

        self._thread = threading.Thread(target=run, daemon=True, name="nanocp-nodes")
        self._thread.start()

    def stop_watch(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def close(self) -> None:
        self.stop_watch()
        self.sock.close()
        self.ctx.term()
