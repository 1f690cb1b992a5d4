"""A checkpoint's config.json (plain Python: the launcher checks the model's split with it)."""

from __future__ import annotations

import os
from typing import Any


def load_hf_config(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(f"--model-path {model_path!r} has no config.json")
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
