"""Launch-time state the kernels share: programmatic dependent launch (PDL) for the decode
path, and device counters the kernels leave zeroed.

A decode step at batch 1-2 is ~12 kernels per layer of a few microseconds each, so the time
between one kernel's last block and the next kernel's first matters. With PDL (Hopper) a kernel
launched with `launch_pdl` may start while its predecessor drains: each of these kernels first
waits for its predecessor's results (`griddepcontrol.wait`, so it reads nothing earlier), then
lets its own successor launch. Kernels not launched this way keep the usual stream order, so the
chain may mix them freely. The model runner turns it on from Hopper (NANOCP_PDL forces it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PDL = False  # set_pdl(): by the model runner from NANOCP_PDL


def set_pdl(requested: bool | None, device: torch.device) -> None:
    """PDL on or off for the kernels launched from now on; None: on from Hopper (sm90) up."""
    global PDL
    PDL = torch.cuda.get_device_capability(device)[0] >= 9 if requested is None else requested


def pdl_args(t: torch.Tensor) -> dict:
    """Launch kwargs: the kernel's PDL constexpr, and the launch attribute when it is on."""
    return {"PDL": True, "launch_pdl": True} if PDL and t.is_cuda else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr, RELEASE: tl.constexpr = True):
    """First statement of a PDL-aware kernel: wait for the predecessor, release the successor
    (RELEASE False: the successor launches when this kernel has finished, as without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if RELEASE:
            tl.extra.cuda.gdc_launch_dependents()


_COUNTERS: dict[tuple, torch.Tensor] = {}


def zeroed_counters(name: str, n: int, device: torch.device) -> torch.Tensor:
    """n int32 counters that are 0 between launches: the kernel using them zeroes them after use,
    so no call pays a fill launch. One buffer per (name, device, stream, n): launches on one
    stream run in order."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (name, device, stream, n)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _COUNTERS[key]
