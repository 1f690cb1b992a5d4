"""Per-step timing of one instance (--step-trace-file): where a lockstep step's time goes.

Sections: attention (own requests), moe_compute (local experts), moe_comm (MoE collectives,
which includes waiting for the slowest instance: the EP straggler shows up here on the others).
On GPU every section boundary synchronizes, so tracing slows the run; it is off by default.
Steps replayed from CUDA graphs have their time only (no sections; "cuda_graph": true).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import orjson
import torch

SECTIONS = ("attention", "moe_compute", "moe_comm")


class StepTracer:
    def __init__(self, path: str, instance: int, device: torch.device) -> None:
        self.file = open(path, "ab")  # noqa: SIM115 (kept open for the life of the worker)
        self.instance = instance
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.current: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._step_start = 0.0

    def begin_step(self) -> None:
        self.sync()
        self.current.clear()
        self._step_start = time.perf_counter()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.current[name] += time.perf_counter() - t0

    def end_step(self, info: dict[str, Any]) -> None:
        self.sync()
        step_s = time.perf_counter() - self._step_start
        record = {"instance": self.instance, "step": self.steps, "t": time.time(), **info, "step_s": step_s}
        for name in SECTIONS:
            record[f"{name}_s"] = self.current.get(name, 0.0)
            self.totals[name] += record[f"{name}_s"]
        self.totals["step"] += step_s
        self.steps += 1
        self.file.write(orjson.dumps(record) + b"\n")
        self.file.flush()

    def summary(self) -> dict[str, float]:
        return {"steps": self.steps, **{f"{k}_s": round(v, 6) for k, v in self.totals.items()}}


def trace_section(name: str):
    """A tracer section if this step is traced, else a no-op context."""
    from nanocp.engine.forward_batch import current_forward_batch

    batch = current_forward_batch()
    tracer = batch.tracer if batch is not None else None
    return tracer.section(name) if tracer is not None else contextlib.nullcontext()
