"""KV transfer through torch.distributed's TCPStore (--disaggregation-transfer-backend torch): the
portable fallback where NIXL/UCX is not installed. Each receiving instance hosts a store; a
sender packs the rows of its slot runs (every layer's K and V) into one message, numbered by
the store's atomic counter, and the receiver copies each message into its pool in order, then
reports the message's notice. Data goes through the host and TCP: slower than NIXL's direct
writes, for testing and small deployments."""

from __future__ import annotations

import socket
import struct
from datetime import timedelta
from typing import Any

import torch

from nanocp.disaggregation.transfer import KVTransfer, Run
from nanocp.kvcache.pool import KVCachePool

_HEAD = struct.Struct("<II")  # notice bytes, runs


class TorchStoreTransfer(KVTransfer):
    name = "torch"
    mem_types = ("cpu", "cuda")

    def __init__(self, agent_name: str, pool: KVCachePool) -> None:
        super().__init__(agent_name, pool)
        self.buffers = [b for pair in zip(pool.k_buffer, pool.v_buffer) for b in pair]  # k0 v0 k1 v1 ...
        self.row_bytes = self.buffers[0][0].numel() * self.buffers[0].element_size()
        self._store: Any = None  # this instance's, hosted on first endpoint()
        self._host = ""
        self._cursor = 0  # messages applied
        self.peers: dict[str, Any] = {}  # name -> the peer's store (client)

    def endpoint(self) -> dict[str, Any]:
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore(
                "0.0.0.0", 0, None, True, timeout=timedelta(seconds=30), wait_for_workers=False
            )
            self._host = socket.gethostbyname(socket.gethostname())
        return {
            "backend": self.name,
            "agent": self.agent_name,
            "host": self._host,
            "port": self._store.port,
            "layout": self.layout,
        }

    def add_peer(self, endpoint: dict[str, Any]) -> str:
        import torch.distributed as dist

        self.check_layout(endpoint)
        name = endpoint["agent"]
        if name not in self.peers:
            self.peers[name] = dist.TCPStore(
                endpoint["host"], endpoint["port"], None, False, timeout=timedelta(seconds=30)
            )
        return name

    def write(self, peer: str, runs: list[Run], notice: bytes) -> Any:
        src = torch.cat([torch.arange(s, s + n) for s, _, n in runs]).to(self.buffers[0].device)
        rows = torch.stack([b.index_select(0, src) for b in self.buffers])  # [2 * layers, tokens, heads, dim]
        dst = torch.tensor([[d, n] for _, d, n in runs], dtype=torch.int64)
        payload = b"".join([
            _HEAD.pack(len(notice), len(runs)), notice, dst.numpy().tobytes(),
            rows.cpu().contiguous().view(torch.uint8).numpy().tobytes(),
        ])  # fmt: skip
        store = self.peers[peer]
        seq = store.add("seq", 1)
        store.set(f"msg/{seq}", payload)
        return None

    def poll(self, handle: Any) -> str:
        return "DONE"  # write() returns once the store holds the message

    def notices(self) -> list[bytes]:
        out = []
        if self._store is None:
            return out
        last = self._store.add("seq", 0)
        while self._cursor < last:
            key = f"msg/{self._cursor + 1}"
            if not self._store.check([key]):  # numbered, not written yet
                break
            out.append(self._apply(self._store.get(key)))
            self._store.delete_key(key)
            self._cursor += 1
        return out

    def _apply(self, payload: bytes) -> bytes:
        n_notice, n_runs = _HEAD.unpack_from(payload)
        at = _HEAD.size
        notice = payload[at : at + n_notice]
        at += n_notice
        runs = torch.frombuffer(bytearray(payload[at : at + 16 * n_runs]), dtype=torch.int64).view(n_runs, 2)
        at += 16 * n_runs
        first = self.buffers[0]
        tokens = int(runs[:, 1].sum())
        rows = torch.frombuffer(bytearray(payload[at:]), dtype=torch.uint8).view(first.dtype)
        rows = rows.view(len(self.buffers), tokens, *first.shape[1:]).to(first.device)
        dst = torch.cat([torch.arange(d, d + n) for d, n in runs.tolist()]).to(first.device)
        for b, r in zip(self.buffers, rows):
            b.index_copy_(0, dst, r)
        return notice
