"""Start the engine's processes (detokenizer, router, one worker per instance), supervise them,
and serve HTTP until SIGINT/SIGTERM; then stop every child (no orphans)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import threading
import time
from multiprocessing.connection import wait

from nanocp import envs
from nanocp.server_args import ServerArgs
from nanocp_router.ipc import PortArgs

logger = logging.getLogger("nanocp.launch")


def check_layout(server_args: ServerArgs) -> None:
    """Fail before starting any process when the model cannot be split as asked."""
    from nanocp.models.loader import load_hf_config

    cfg = load_hf_config(server_args.model_path, server_args.trust_remote_code)
    experts = getattr(cfg, "num_experts", 0) or 0
    ep = server_args.ep_size
    if ep > 1 and experts % ep:
        raise RuntimeError(
            f"--ep-size {ep} cannot split the model's {experts} experts evenly (num_experts % ep_size != 0)"
        )


class EngineProcesses:
    def __init__(self, server_args: ServerArgs) -> None:
        from nanocp.scheduler.worker import run_worker_process
        from nanocp.tokenizer.detokenizer_process import run_detokenizer_process
        from nanocp_router.router import run_router_process

        check_layout(server_args)
        self.server_args = server_args
        self.ports = PortArgs.create(server_args.dp_size)
        ctx = mp.get_context("spawn")
        ports = self.ports.to_dict()
        self.procs: dict[str, mp.Process] = {}
        self.procs["detokenizer"] = ctx.Process(
            target=run_detokenizer_process, args=(server_args, ports), name="nanocp-detokenizer", daemon=True
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
            ),
            name="nanocp-router",
            daemon=True,
        )
        self.ready_conns = []
        for i in range(server_args.dp_size):
            reader, writer = ctx.Pipe()  # ready -> launcher; the cluster's instances -> worker
            self.procs[f"instance {i}"] = ctx.Process(
                target=run_worker_process,
                args=(server_args, i, ports, writer),
                name=f"nanocp-worker{i}",
                daemon=True,
            )
            self.ready_conns.append(reader)
        self._stopping = False

    def start(self) -> list[dict]:
        """Start every process; wait for the workers to load. Returns the workers' info."""
        for p in self.procs.values():
            p.start()
        infos: list[dict | None] = [None] * len(self.ready_conns)
        pending = dict(enumerate(self.ready_conns))
        timeout = envs.startup_timeout_s()
        deadline = time.monotonic() + timeout
        while pending:
            for i, conn in list(pending.items()):
                if conn.poll(0.2):
                    msg = conn.recv()
                    if not msg["ok"]:
                        logger.error("instance %d failed to start:\n%s", i, msg["traceback"])
                        raise RuntimeError(f"instance {i} failed to start: {msg['error']}")
                    infos[i] = {k: v for k, v in msg.items() if k != "ok"}
                    del pending[i]
                    logger.info(
                        "instance %d ready: %d KV tokens on %s", i, msg["max_total_num_tokens"], msg["device"]
                    )
                elif not self.procs[f"instance {i}"].is_alive():
                    code = self.procs[f"instance {i}"].exitcode
                    raise RuntimeError(f"instance {i} died while starting (exit code {code})")
            for name in ("router", "detokenizer"):
                if not self.procs[name].is_alive():
                    raise RuntimeError(
                        f"the {name} process died while starting (exit code {self.procs[name].exitcode})"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"instances {sorted(pending)} not ready after {timeout:.0f} s")
        cluster = {"instance_tokens": [i["max_total_num_tokens"] for i in infos]}  # type: ignore[index]
        for conn in self.ready_conns:  # what every worker waits for before it serves
            conn.send(cluster)
        return infos  # type: ignore[return-value]

    def watch(self, on_death) -> None:
        """Call on_death(message) from a thread as soon as any child process exits."""

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
                    on_death(msg)

        threading.Thread(target=run, daemon=True, name="nanocp-supervisor").start()

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
        shutil.rmtree(self.ports.ipc_dir, ignore_errors=True)


def launch_server(server_args: ServerArgs) -> None:
    import asyncio

    from nanocp_router import faults

    faults.configure(envs.fault_inject())  # tests only: the tokenizer's faults (HTTP process)

    import uvicorn

    from nanocp.server.http_server import create_app
    from nanocp.server.tokenizer_manager import TokenizerManager
    from nanocp.tokenizer.detokenizer import load_tokenizer

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
