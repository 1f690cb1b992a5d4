"""The registries of backend names: the only lists of --attention-backend, --moe-a2a-backend and
--disaggregation-transfer-backend values (the CLI's choices come from here). Plain Python: a name registered as "module:Class" is
imported only when its class is asked for, so parsing flags (and a router-only node) imports no
torch; what a backend can do is declared on its class."""

from __future__ import annotations

import importlib
from typing import Any


class Registry:
    def __init__(self, flag: str, entries: dict[str, str]) -> None:
        self.flag = flag
        self.entries: dict[str, Any] = dict(entries)  # name -> class, or "module:Class" until imported

    def register(self, name: str, target: Any = None) -> Any:
        """register(name, cls_or_path), or as a class decorator: @registry.register(name)."""
        if target is not None:
            self.entries[name] = target
            return target
        return lambda cls: self.register(name, cls)

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def get(self, name: str) -> Any:
        if name not in self.entries:
            raise ValueError(
                f"{self.flag} {name!r} is not available here (available: {', '.join(self.entries)})"
            )
        target = self.entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = self.entries[name] = getattr(importlib.import_module(module), attr)
        return target

    def classes(self) -> dict[str, Any]:
        """Every backend's class by name (imports them all)."""
        return {name: self.get(name) for name in self.entries}


ATTENTION_BACKENDS = Registry(
    "--attention-backend",
    {
        "torch": "nanocp.layers.attention.torch_backend:TorchAttnBackend",
        "triton": "nanocp.layers.attention.triton_backend:TritonAttnBackend",
        "flashinfer": "nanocp.layers.attention.flashinfer_backend:FlashInferAttnBackend",
    },
)
MOE_A2A_BACKENDS = Registry(
    "--moe-a2a-backend",
    {
        "allgather": "nanocp.distributed.moe_comm:AllGatherMoE",
        "all_to_all": "nanocp.distributed.moe_comm:AllToAllMoE",
        "ipc": "nanocp.distributed.moe_comm:IpcMoE",
        "deepep": "nanocp.distributed.moe_comm:DeepEPMoE",
    },
)
KV_TRANSFER_BACKENDS = Registry(
    "--disaggregation-transfer-backend",
    {
        "nixl": "nanocp.disaggregation.nixl:NixlTransfer",
        "torch": "nanocp.disaggregation.torch_store:TorchStoreTransfer",
    },
)
