"""Run NanoCP as on a torch without triton (CPU wheels, macOS): a directory put first on
PYTHONPATH whose `triton` package raises ImportError, as a missing package does. Child processes
(the server's spawned workers) inherit it through the environment."""

from __future__ import annotations

import os
from pathlib import Path

_STUB = 'raise ImportError("triton is blocked: NanoCP runs as on a torch without triton")\n'


def no_triton_env(root: str | os.PathLike) -> dict[str, str]:
    """Environment variables that block `import triton` in a subprocess (stub written under root)."""
    pkg = Path(root) / "triton"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(_STUB)
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}
