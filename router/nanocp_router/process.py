"""Set-up shared by every NanoCP child process (no torch here)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time


def child_process_setup(name: str, log_level: str = "info") -> None:
    """Ignore Ctrl-C (the parent shuts children down in order), exit if the parent dies (no
    orphans), and log with the process name."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(),
        format=f"[%(asctime)s {name}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("nanocp").setLevel(log_level.upper())  # --log-level, not the env default
    parent = os.getppid()

    def watch_parent() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True, name="parent-watch").start()
