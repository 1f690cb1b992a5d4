"""Where a server's processes run across nodes, and the TCP ports between them (plain Python).

One node (--nnodes 1): everything on this machine, ipc:// sockets, a free loopback port for
the instances' torch.distributed rendezvous.

Several nodes (--nnodes N --node-rank R --dist-init-addr HOST:PORT, the same flags on every
node): node 0 (HOST) runs the HTTP server, tokenizer, router and detokenizer, plus its share of
the instances unless --router-only; the other nodes run only instances, numbered globally
(--dp-size is the total; every instance node runs dp_size / instance nodes of them). Every
socket is on node 0, so the other nodes need only HOST:

  PORT        torch.distributed store of the instances (hosted by node 0's launcher; with
              --router-only by the launcher of instance 0's node, at PORT on its own address)
  PORT + 1    router inbox (requests from the tokenizer, reports from the instances)
  PORT + 2    detokenizer inbox (token outputs of the instances)
  PORT + 3    tokenizer inbox (outputs and cluster state for the HTTP server)
  PORT + 4    node control (nodes join, heartbeats, shutdown)
  PORT + 10 + i   instance i's inbox (the router pushes its requests there)
"""

from __future__ import annotations

from dataclasses import dataclass

PORT_OFFSETS = {"dist": 0, "router": 1, "detokenizer": 2, "tokenizer": 3, "control": 4}
WORKER_PORT_OFFSET = 10


class LayoutError(ValueError):
    """A bad multi-node layout; the message names the flag."""


def parse_addr(addr: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be a name, an IPv4 or a bracketed IPv6 address)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LayoutError(f"--dist-init-addr must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class NodeLayout:
    nnodes: int
    node_rank: int
    dp_size: int
    router_only: bool = False  # node 0 runs no instances
    host: str = "127.0.0.1"  # node 0's address (--dist-init-addr)
    base_port: int = 0

    @classmethod
    def create(
        cls,
        nnodes: int,
        node_rank: int,
        dp_size: int,
        dist_init_addr: str | None,
        router_only: bool = False,
        nproc_per_node: int | None = None,
    ) -> NodeLayout:
        """Check the flags against each other (LayoutError naming the flag)."""
        if not 0 <= node_rank < nnodes:
            raise LayoutError(f"--node-rank must be in [0, --nnodes) = [0, {nnodes}), got {node_rank}")
        if router_only and nnodes < 2:
            raise LayoutError("--router-only needs --nnodes >= 2 (the instances run on the other nodes)")
        if nnodes == 1:
            return cls(1, 0, dp_size)
        if dist_init_addr is None:
            raise LayoutError(f"--nnodes {nnodes} needs --dist-init-addr HOST:PORT (node 0's address)")
        host, port = parse_addr(dist_init_addr)
        last = port + WORKER_PORT_OFFSET + dp_size - 1
        if not 1 <= port or last > 65535:
            raise LayoutError(
                f"--dist-init-addr port {port}: the server uses ports {port}..{last} on node 0 (must be <= 65535)"
            )
        layout = cls(nnodes, node_rank, dp_size, router_only, host, port)
        per_node, nodes = layout.instances_per_node, layout.instance_nodes
        if dp_size % nodes:
            raise LayoutError(
                f"--dp-size {dp_size} cannot be split evenly over {nodes} instance node(s) "
                f"(--nnodes {nnodes}{', --router-only' if router_only else ''})"
            )
        if nproc_per_node is not None and nproc_per_node != per_node:
            raise LayoutError(
                f"--nproc-per-node {nproc_per_node} != --dp-size {dp_size} / {nodes} instance node(s) = {per_node}"
            )
        return layout

    @property
    def multinode(self) -> bool:
        return self.nnodes > 1

    @property
    def instance_nodes(self) -> int:
        return self.nnodes - int(self.router_only)

    @property
    def instances_per_node(self) -> int:
        return self.dp_size // self.instance_nodes

    def instances_of(self, node: int) -> range:
        if self.router_only and node == 0:
            return range(0)
        k = self.instances_per_node
        first = (node - int(self.router_only)) * k
        return range(first, first + k)

    @property
    def local_instances(self) -> range:
        return self.instances_of(self.node_rank)

    @property
    def is_head(self) -> bool:
        """This node runs the HTTP server, tokenizer, router and detokenizer."""
        return self.node_rank == 0

    def port(self, name: str) -> int:
        return self.base_port + PORT_OFFSETS[name]

    def worker_port(self, instance: int) -> int:
        return self.base_port + WORKER_PORT_OFFSET + instance

    def endpoint(self, name: str) -> str:
        return f"tcp://{self.host}:{self.port(name)}"

    def describe(self) -> str:
        """The plan, one line per node (--dry-run prints it)."""
        lines = [f"{self.nnodes} node(s), {self.dp_size} instance(s)"]
        for node in range(self.nnodes):
            inst = self.instances_of(node)
            parts = ["HTTP server, tokenizer, router, detokenizer"] if node == 0 else []
            if len(inst):
                parts.append(f"instances {inst.start}..{inst.stop - 1}")
            here = " (this node)" if node == self.node_rank else ""
            lines.append(f"  node {node}{here}: {'; '.join(parts)}")
        if self.multinode:
            p = self.base_port
            lines.append(
                f"  ports on node 0 ({self.host}): {p} instances' torch.distributed store, {p + 1} router, "
                f"{p + 2} detokenizer, {p + 3} tokenizer, {p + 4} node control, "
                f"{self.worker_port(0)}..{self.worker_port(self.dp_size - 1)} instance inboxes"
            )
        return "\n".join(lines)
