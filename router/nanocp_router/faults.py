"""Test-only fault injection: NANOCP_FAULT_INJECT (nanocp.envs.fault_inject) makes one
instance's step, or one process's handling of one request, raise InjectedFault, so that tests
can check how each fault is contained. Each process configures it once at start (`configure`;
the router gets the spec from the launcher: it does not import nanocp). Unconfigured or empty
(production), every check is a set lookup that finds nothing."""

from __future__ import annotations

STEP_POINTS = ("forward", "sample")  # inside an instance's step, keyed by (instance, step)
# a process handling a request; transfer: a prefill instance writing a request's KV
LOOP_POINTS = ("worker", "router", "tokenizer", "detokenizer", "transfer")

_FAULTS: frozenset[tuple[str, str]] = frozenset()


class InjectedFault(RuntimeError):
    """Raised where NANOCP_FAULT_INJECT asks for a fault."""


def configure(spec: str) -> None:
    """Arm the faults of `spec` (see nanocp.envs.fault_inject) in this process."""
    global _FAULTS
    faults = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        point, _, key = item.partition(":")
        if point not in STEP_POINTS + LOOP_POINTS or not key:
            raise ValueError(f"NANOCP_FAULT_INJECT: cannot parse {item!r} (see nanocp.envs.fault_inject)")
        faults.add((point, key))
    _FAULTS = frozenset(faults)


def step_fault(point: str, instance: int, step: int) -> None:
    """Raise if a fault is asked for at `point` of `instance`'s `step`-th non-idle forward."""
    if _FAULTS and (point, f"{instance}:{step}") in _FAULTS:
        raise InjectedFault(f"injected fault: {point} of instance {instance}, step {step}")


def request_fault(point: str, rid: str) -> None:
    """Raise if a fault is asked for while process `point` handles request `rid`."""
    if _FAULTS and (point, rid) in _FAULTS:
        raise InjectedFault(f"injected fault: {point} handling request {rid}")
