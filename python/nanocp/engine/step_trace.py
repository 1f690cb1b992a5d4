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
        global _CURRENT
        _CURRENT = self
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
        self.cancel_step()
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

    def cancel_step(self) -> None:
        """No step of this tracer is in progress any more (it ended, or failed)."""
        global _CURRENT
        if _CURRENT is self:
            _CURRENT = None

    def summary(self) -> dict[str, float]:
        return {"steps": self.steps, **{f"{k}_s": round(v, 6) for k, v in self.totals.items()}}


_CURRENT: StepTracer | None = None  # the tracer of the step in progress (begin_step .. end_step)


def trace_section(name: str):
    """A section of the traced step in progress, else a no-op context."""
    return _CURRENT.section(name) if _CURRENT is not None else contextlib.nullcontext()
