"""KV transfer through NIXL (the `nixl` package; UCX underneath): the prefill side WRITEs slot
runs of every layer into the decode side's registered pool, with a notification the decode side
receives after the data. DRAM pools on CPU, VRAM on GPU."""

from __future__ import annotations

import base64
import logging
import os
from typing import Any

import numpy as np

from nanocp.disaggregation.transfer import KVTransfer, Run
from nanocp.kvcache.pool import KVCachePool


class NixlTransfer(KVTransfer):
    name = "nixl"
    mem_types = ("cpu", "cuda")

    def __init__(self, agent_name: str, pool: KVCachePool) -> None:
        super().__init__(agent_name, pool)
        from nixl._api import nixl_agent, nixl_agent_config

        if not os.environ.get("NIXL_LOG_LEVEL"):  # its INFO lines per agent: warnings only, unless asked
            logging.getLogger("nixl").setLevel(logging.WARNING)
        # no progress thread (it would spin a core per instance): UCX progresses in poll() and
        # notices(), which the worker's loop calls every turn
        self.agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self.buffers = [b for pair in zip(pool.k_buffer, pool.v_buffer) for b in pair]  # k0 v0 k1 v1 ...
        self.agent.register_memory(self.buffers)
        first = self.buffers[0]
        self.mem = "DRAM" if first.device.type == "cpu" else "VRAM"
        self.device_id = 0 if first.device.type == "cpu" else first.device.index
        self.stride = first[0].numel() * first.element_size()  # bytes per slot of one buffer
        self.peers: dict[str, dict[str, Any]] = {}

    @classmethod
    def available(cls) -> bool:
        try:
            import nixl._api  # noqa: F401
        except ImportError:
            return False
        return True

    def endpoint(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "agent": self.agent_name,
            "meta": base64.b64encode(self.agent.get_agent_metadata()).decode(),
            "addrs": [b.data_ptr() for b in self.buffers],
            "device_id": self.device_id,
            "mem": self.mem,
            "layout": self.layout,
        }

    def add_peer(self, endpoint: dict[str, Any]) -> str:
        self.check_layout(endpoint)
        name = endpoint["agent"]
        if name not in self.peers:
            self.agent.add_remote_agent(base64.b64decode(endpoint["meta"]))
        self.peers[name] = endpoint
        return name

    def _descs(self, addrs: list[int], device_id: int, runs: list[Run], side: int) -> np.ndarray:
        rows = [
            (addr + run[side] * self.stride, run[2] * self.stride, device_id)
            for addr in addrs
            for run in runs
        ]
        return np.array(rows, dtype=np.uint64)

    def write(self, peer: str, runs: list[Run], notice: bytes) -> Any:
        remote = self.peers[peer]
        local = self.agent.get_xfer_descs(
            self._descs([b.data_ptr() for b in self.buffers], self.device_id, runs, 0), self.mem
        )
        theirs = self.agent.get_xfer_descs(
            self._descs(remote["addrs"], remote["device_id"], runs, 1), remote["mem"]
        )
        handle = self.agent.initialize_xfer("WRITE", local, theirs, peer, notice)
        state = self.agent.transfer(handle)
        if state == "ERR":
            handle.release()
            raise RuntimeError(f"NIXL could not start a transfer to {peer}")
        return handle

    def poll(self, handle: Any) -> str:
        state = self.agent.check_xfer_state(handle)
        if state != "PROC":
            handle.release()
        return state

    def notices(self) -> list[bytes]:
        return [n for msgs in self.agent.get_new_notifs().values() for n in msgs]
