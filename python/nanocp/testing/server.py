"""Run `python -m nanocp.launch_server` in a subprocess (tests, benchmarks).

The server runs in its own session (a Ctrl-C of the caller's terminal reaches it only through
`stop`), so the caller must stop it: a `with` block does, and so does any exit of the calling
process, a SIGTERM included (`timeout`, a batch system): the first ServerProcess turns SIGTERM
into SystemExit and registers an atexit hook that stops every server still running. Otherwise
a killed benchmark leaves its servers holding the GPU.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from nanocp_router.ipc import free_tcp_port

_RUNNING: set[ServerProcess] = set()


def _stop_running() -> None:
    for server in list(_RUNNING):
        server.stop()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds `with` blocks, then atexit runs


@functools.cache  # once per process
def _stop_servers_on_exit() -> None:
    """The atexit hook, and SIGTERM -> SystemExit where SIGTERM still has its default action (a
    handler the program installed is left alone)."""
    atexit.register(_stop_running)
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


class ServerProcess:
    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        log_path: str | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        """ready_timeout: how long `with` waits for /health (real-size models on GPUs load and
        capture CUDA graphs for minutes)."""
        self.ready_timeout = ready_timeout
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
        _stop_servers_on_exit()
        self.proc = subprocess.Popen(
            self.command(args),
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _RUNNING.add(self)

    def command(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "nanocp.launch_server", "--port", str(self.port), *args]

    def wait_ready(self, timeout: float | None = None) -> ServerProcess:
        """Wait for /health, at most timeout seconds (default: the constructor's ready_timeout)."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}; log: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout} s; log: {self.log()}")

    def log(self) -> str:
        if not self.log_path:
            return "(no log)"
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        _RUNNING.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NodeProcess(ServerProcess):
    """`launch_server --node-rank R` (R >= 1) of a multi-node server: no HTTP; ready once node 0
    is (node 0 waits for every node's instances before it serves)."""

    def wait_ready(self, timeout: float | None = None) -> NodeProcess:
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with code {self.proc.returncode}; log: {self.log()}")
        return self


def free_port_range(n: int, start: int = 20000, stop: int = 60000) -> int:
    """A port P with P .. P + n - 1 free on the loopback interface (multi-node tests)."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(start, stop - n)
        try:
            socks = []
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")
