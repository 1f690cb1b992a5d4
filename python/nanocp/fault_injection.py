"""Test-only fault injection: NANOCP_FAULT_INJECT (envs.fault_inject) makes one instance's step,
or one process's handling of one request, raise InjectedFault, so that tests can check how each
fault is contained. Unset (production) every check is a dict lookup that finds nothing."""

from __future__ import annotations

import functools

from nanocp import envs

STEP_POINTS = ("forward", "sample")  # inside an instance's step, keyed by (instance, step)
LOOP_POINTS = ("worker", "router", "tokenizer", "detokenizer")  # a process handling a request


class InjectedFault(RuntimeError):
    """Raised where NANOCP_FAULT_INJECT asks for a fault."""


@functools.cache
def _faults() -> frozenset[tuple[str, str]]:
    faults = set()
    for item in filter(None, (x.strip() for x in envs.fault_inject().split(","))):
        point, _, key = item.partition(":")
        if point not in STEP_POINTS + LOOP_POINTS or not key:
            raise ValueError(f"NANOCP_FAULT_INJECT: cannot parse {item!r} (see nanocp.envs.fault_inject)")
        faults.add((point, key))
    return frozenset(faults)


def step_fault(point: str, instance: int, step: int) -> None:
    """Raise if a fault is asked for at `point` of `instance`'s `step`-th non-idle forward."""
    if _faults() and (point, f"{instance}:{step}") in _faults():
        raise InjectedFault(f"injected fault: {point} of instance {instance}, step {step}")


def request_fault(point: str, rid: str) -> None:
    """Raise if a fault is asked for while process `point` handles request `rid`."""
    if _faults() and (point, rid) in _faults():
        raise InjectedFault(f"injected fault: {point} handling request {rid}")
