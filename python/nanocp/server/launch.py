"""Start the engine's processes (detokenizer, router, one worker per instance), supervise them,
and serve HTTP until SIGINT/SIGTERM; then stop every child (no orphans). With several nodes
(nanocp_router.layout), node 0 does this for the whole server and the other nodes only run
their instances (serve_instances)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import threading
import time
from multiprocessing.connection import wait
from typing import TYPE_CHECKING

from nanocp import envs
from nanocp.server_args import ServerArgs
from nanocp_router.ipc import PortArgs

if TYPE_CHECKING:
    from nanocp_router.nodes import HeadControl, NodeControl

logger = logging.getLogger("nanocp.launch")


def check_layout(server_args: ServerArgs) -> None:
    """Fail before starting any process when the model cannot be split as asked."""
    from nanocp.models.config import load_hf_config

    cfg = load_hf_config(server_args.model_path, server_args.trust_remote_code)
    experts = getattr(cfg, "num_experts", 0) or 0
    ep = server_args.ep_size
    if ep > 1 and experts % ep:
        raise RuntimeError(
            f"--ep-size {ep} cannot split the model's {experts} experts evenly (num_experts % ep_size != 0)"
        )


class EngineProcesses:
    """This node's processes: on node 0 the detokenizer and the router, and the node's instances
    (server_args.layout). With several nodes, node 0's launcher hosts the instances'
    torch.distributed store and the nodes' control socket (nanocp_router.nodes)."""

    def __init__(self, server_args: ServerArgs) -> None:
        from nanocp.tokenizer.detokenizer_process import run_detokenizer_process
        from nanocp_router.router import run_router_process

        check_layout(server_args)
        self.server_args = server_args
        self.layout = layout = server_args.layout
        self.ports = PortArgs.for_layout(layout)
        ctx = mp.get_context("spawn")
        self._ports = ports = self.ports.to_dict()  # the processes' copy (start() may set dist_init)
        self.procs: dict[str, mp.Process] = {}
        self.disagg = server_args.disagg_config()  # the router's copy (start() adds the prefill servers)
        # node 0 of a decode server: finds its prefill servers and checks their KV layout
        self._finds_prefill = layout.is_head and server_args.disaggregation_mode == "decode"
        self.head: HeadControl | None = None
        self.node: NodeControl | None = None
        self._store = None
        if layout.is_head:
            self.procs["detokenizer"] = ctx.Process(
                target=run_detokenizer_process,
                args=(server_args, ports),
                name="nanocp-detokenizer",
                daemon=True,
            )
            self.procs["router"] = ctx.Process(
                target=run_router_process,
                args=(
                    ports,
                    server_args.dp_size,
                    server_args.load_balance_method,
                    server_args.cp_config(),
                    server_args.log_level,
                    server_args.max_queued_requests,
                    envs.fault_inject(),
                    self.disagg,
                ),
                name="nanocp-router",
                daemon=True,
            )
        self.ready_conns = {}
        if len(layout.local_instances):  # (a router-only node never imports the model code)
            from nanocp.scheduler.worker import run_worker_process
        for i in layout.local_instances:
            reader, writer = ctx.Pipe()  # ready -> launcher; the cluster's instances -> worker
            self.procs[f"instance {i}"] = ctx.Process(
                target=run_worker_process,
                args=(server_args, i, ports, writer),
                name=f"nanocp-worker{i}",
                daemon=True,
            )
            self.ready_conns[i] = reader
        self._stopping = False

    def start(self) -> list[dict]:
        """Start this node's processes; wait until every instance of the server has loaded.
        Returns every instance's info (node 0; another node: its own instances')."""
        layout = self.layout
        timeout = envs.startup_timeout_s()
        deadline = time.monotonic() + timeout
        if layout.multinode and layout.is_head:
            from nanocp_router.nodes import HeadControl

            if not layout.router_only:  # else the node of instance 0 hosts it (no torch here)
                self._store = _host_store(layout.port("dist"))
            self.head = HeadControl(self.ports.control, layout.nnodes)
        elif layout.multinode:
            from nanocp_router.nodes import NodeControl

            self.node = NodeControl(self.ports.control, layout.node_rank)
            if layout.router_only and 0 in layout.local_instances:
                self._store = _host_store(layout.base_port)
                address = f"{_address_towards(layout.host, layout.port('control'))}:{layout.base_port}"
                self.node.host_store(address)
                self._ports["dist_init"] = f"tcp://{address}"
            elif layout.router_only:
                self._ports["dist_init"] = f"tcp://{self.node.wait_store(deadline)}"
        if self._finds_prefill:
            self.disagg.update(find_prefill_servers(self.server_args, deadline))
        for p in self.procs.values():
            p.start()
        infos = self._wait_local(deadline, timeout)
        if self.head is not None:
            for node_infos in self.head.wait_ready(deadline, self._check_alive).values():
                infos.update({info["instance"]: info for info in node_infos})
        if self.node is not None:
            self.node.ready([infos[i] for i in sorted(infos)])
            tokens = self.node.wait_cluster(deadline, self._check_alive)
        else:
            tokens = [infos[i]["max_total_num_tokens"] for i in range(layout.dp_size)]
            if self.head is not None:
                self.head.start_cluster(tokens)
        if self._finds_prefill:
            check_prefill_layout(self.disagg["servers"], [infos[i] for i in sorted(infos)])
        for conn in self.ready_conns.values():  # what every worker waits for before it serves
            conn.send({"instance_tokens": tokens})
        return [infos[i] for i in sorted(infos)]

    def _wait_local(self, deadline: float, timeout: float) -> dict[int, dict]:
        infos: dict[int, dict] = {}
        pending = dict(self.ready_conns)
        while pending:
            for i, conn in list(pending.items()):
                if conn.poll(0.2):
                    msg = conn.recv()
                    if not msg["ok"]:
                        logger.error("instance %d failed to start:\n%s", i, msg["traceback"])
                        self._report_down(f"instance {i} failed to start: {msg['error']}")
                        raise RuntimeError(f"instance {i} failed to start: {msg['error']}")
                    infos[i] = {k: v for k, v in msg.items() if k != "ok"} | {"node": self.layout.node_rank}
                    del pending[i]
                    logger.info(
                        "instance %d ready: %d KV tokens on %s", i, msg["max_total_num_tokens"], msg["device"]
                    )
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"instances {sorted(pending)} not ready after {timeout:.0f} s")
        return infos

    def _check_alive(self) -> None:
        """Raise if a process of this node died while the server starts."""
        for name, p in self.procs.items():
            if not p.is_alive():
                what = f"{name} died while starting (exit code {p.exitcode})"
                self._report_down(what)
                raise RuntimeError(what if name.startswith("instance") else f"the {what}")

    def _report_down(self, message: str) -> None:
        if self.node is not None:
            self.node.report_down(message)

    def watch(self, on_death) -> None:
        """Call on_death(message) from a thread as soon as any child process exits, or (node 0)
        another node is down, or (another node) node 0 stopped or was lost."""

        def run() -> None:
            sentinels = {p.sentinel: name for name, p in self.procs.items()}
            while sentinels and not self._stopping:
                for s in wait(list(sentinels), timeout=0.5):
                    name = sentinels.pop(s)
                    if self._stopping:
                        return
                    p = self.procs[name]
                    p.join(timeout=1)  # the sentinel fires before exitcode is set
                    msg = f"{name} (pid {p.pid}) died with exit code {p.exitcode}; the server cannot serve requests"
                    logger.error(msg)
                    if self.node is not None:
                        self.node.stop_watch()
                        self._report_down(msg)
                    on_death(msg)

        threading.Thread(target=run, daemon=True, name="nanocp-supervisor").start()
        if self.head is not None:
            self.head.watch(on_death)
        if self.node is not None:
            self.node.watch(on_death)

    def shutdown(self) -> None:
        self._stopping = True
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            if p.pid is None:  # never started (start() failed before it)
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        for control in (self.head, self.node):
            if control is not None:
                control.close()
        if self.ports.ipc_dir is not None:
            shutil.rmtree(self.ports.ipc_dir, ignore_errors=True)


def _host_store(port: int):
    """The instances' torch.distributed store, hosted by this launcher (several nodes)."""
    import torch.distributed as dist

    return dist.TCPStore("0.0.0.0", port, None, True, wait_for_workers=False)


def _address_towards(host: str, port: int) -> str:
    """This machine's address on the route to host (what the other nodes can reach it by)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


def find_prefill_servers(server_args: ServerArgs, deadline: float) -> dict:
    """A decode server's prefill servers (--disaggregation-prefill-url), each waited for until it
    serves /server_info: where its router takes prompts, and where they answer this server."""
    import json
    import urllib.request
    import uuid
    from urllib.parse import urlsplit

    from nanocp_router.ipc import free_tcp_port

    servers = []
    for url in server_args.prefill_urls:
        waited = 0.0
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"--disaggregation-prefill-url {url}: no prefill server there ({e})"
                    ) from None
                if waited % 10 == 0:
                    logger.info("waiting for the prefill server at %s (%s)", url, e)
                time.sleep(1)
                waited += 1
        mode = info.get("disaggregation_mode")
        if mode != "prefill":
            raise RuntimeError(
                f"--disaggregation-prefill-url {url} runs --disaggregation-mode {mode}, not a prefill server"
            )
        backend = info.get("disaggregation_transfer_backend")
        if backend != server_args.disaggregation_transfer_backend:
            raise RuntimeError(
                f"--disaggregation-prefill-url {url} uses --disaggregation-transfer-backend {backend}; this "
                f"server uses {server_args.disaggregation_transfer_backend}"
            )
        host = urlsplit(url).hostname
        servers.append({
            "url": url,
            "inbox": f"tcp://{host}:{info['disaggregation_bootstrap_port']}",
            "kv_layout": info["instances"][0].get("kv_layout"),
        })  # fmt: skip
        logger.info("prefill server %s: %d instances", url, len(info["instances"]))
    port = free_tcp_port()
    host = _address_towards(urlsplit(server_args.prefill_urls[0]).hostname, 80)
    return {
        "decode_id": uuid.uuid4().hex,
        "reply_port": port,
        "reply_to": f"tcp://{host}:{port}",
        "servers": servers,
    }


def check_prefill_layout(servers: list[dict], infos: list[dict]) -> None:
    """The prefill servers' KV must fit this server's pools row for row."""
    ours = infos[0].get("kv_layout")
    for s in servers:
        if s["kv_layout"] != ours:
            raise RuntimeError(
                f"--disaggregation-prefill-url {s['url']}: its KV layout {s['kv_layout']} differs from this "
                f"server's {ours} (run the same model with the same --dtype on both)"
            )


def serve_instances(server_args: ServerArgs) -> None:
    """A node other than node 0: run its instances until node 0 stops (or is lost), one of them
    dies (node 0 is told), or SIGINT/SIGTERM."""
    import signal

    engine = EngineProcesses(server_args)
    stopped = threading.Event()
    reason: list[str] = []

    def stop(msg: str) -> None:
        reason.append(msg)
        stopped.set()

    signal.signal(signal.SIGTERM, lambda *_: stop("SIGTERM"))
    try:
        engine.start()
        engine.watch(stop)
        layout = server_args.layout
        inst = layout.local_instances
        logger.info("node %d serving instances %d..%d for node 0 at %s", layout.node_rank, inst.start,
                    inst.stop - 1, layout.host)  # fmt: skip
        while not stopped.wait(0.5):
            pass
        logger.info("stopping: %s", reason[0])
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
        logger.info("shut down")


def launch_server(server_args: ServerArgs) -> None:
    import asyncio

    from nanocp_router import faults

    faults.configure(envs.fault_inject())  # tests only: the tokenizer's faults (HTTP process)

    import uvicorn

    from nanocp.server.http_server import create_app
    from nanocp.server.tokenizer_manager import TokenizerManager
    from nanocp.tokenizer.detokenizer import load_tokenizer

    if not server_args.layout.is_head:
        return serve_instances(server_args)
    engine = EngineProcesses(server_args)
    try:
        infos = engine.start()
        tokenizer = (
            None
            if server_args.skip_tokenizer_init
            else load_tokenizer(server_args.tokenizer_path, server_args.trust_remote_code)
        )
        manager = TokenizerManager(server_args, engine.ports, infos, tokenizer)
        manager.process_pids = {name: p.pid for name, p in engine.procs.items()}
        app = create_app(manager)
        config = uvicorn.Config(
            app,
            host=server_args.host,
            port=server_args.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)

        async def serve() -> None:
            loop = asyncio.get_running_loop()
            engine.watch(lambda msg: loop.call_soon_threadsafe(manager.on_process_death, msg))
            logger.info(
                "NanoCP serving %s on http://%s:%d",
                server_args.served_model_name,
                server_args.host,
                server_args.port,
            )
            await server.serve()

        asyncio.run(serve())
    finally:
        engine.shutdown()
        logger.info("shut down")
