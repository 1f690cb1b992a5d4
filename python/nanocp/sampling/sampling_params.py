"""SamplingParams with SGLang's names and defaults, validated with errors that name the field.

Every value a client can send is checked here, whatever its type: null means the default (OpenAI
semantics), numbers must be finite, integers fit in 64 bits (what goes over the wire to the
workers), and lists are bounded. Error messages quote a value shortened (reprlib), never whole.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field, fields
from typing import Any

from nanocp.errors import InvalidRequestError

_EPS = 1e-6
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 256  # stop strings are matched against every new token's text


def short_repr(value: Any) -> str:
    """A value as an error message may quote it: bounded in length and depth."""
    return reprlib.repr(value)


class SamplingParamsError(InvalidRequestError):
    """An invalid sampling parameter; ``param`` names it."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: int = 1
    stop_strs: list[str] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None) -> SamplingParams:
        # null means "the default" (OpenAI semantics); an omitted field is the same
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if "seed" in params and "sampling_seed" not in params:  # OpenAI / vLLM spelling
            params["sampling_seed"] = params.pop("seed")
        names = {f.name for f in fields(cls) if f.init}
        unknown = sorted(str(k)[:100] for k in set(params) - names)
        if unknown:
            raise SamplingParamsError(
                unknown[0] or '""',
                f"unknown sampling parameter (known: {', '.join(sorted(names))})",  # an empty key is named too
            )
        return cls(**params)

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise SamplingParamsError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SamplingParamsError(
                "min_new_tokens", f"must be in [0, max_new_tokens], got {self.min_new_tokens}"
            )
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise SamplingParamsError("top_k", f"must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise SamplingParamsError(
                "repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}"
            )
        if self.n != 1:
            raise SamplingParamsError("n", f"only n=1 is supported, got {self.n}")
        self.stop_strs = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in self.stop_strs):
            raise SamplingParamsError("stop", "stop strings must be non-empty")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.temperature < _EPS:  # greedy, as SGLang: temperature 0 means top-1
            self.temperature, self.top_k = 1.0, 1

    def _check_types(self) -> None:
        ints = ("max_new_tokens", "min_new_tokens", "top_k", "n")
        floats = (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        )
        for name in ints:
            check_int(name, getattr(self, name))
        for name in floats:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SamplingParamsError(name, f"must be a number, got {short_repr(v)}")
            if not math.isfinite(v):
                raise SamplingParamsError(name, f"must be a finite number, got {v}")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"must be a boolean, got {short_repr(getattr(self, name))}")
        if self.sampling_seed is not None:
            check_int("sampling_seed", self.sampling_seed)
        stop = self.stop
        if stop is not None and not (
            isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            raise SamplingParamsError(
                "stop", f"must be a string or a list of strings, got {short_repr(stop)}"
            )
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        ids = self.stop_token_ids
        if ids is not None and not (
            isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise SamplingParamsError("stop_token_ids", f"must be a list of integers, got {short_repr(ids)}")

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (normalised), e.g. to send the request to a worker."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def verify(self, vocab_size: int) -> None:
        """Checks that need the model."""
        bad = next((t for t in self.stop_token_ids or [] if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise SamplingParamsError(
                "stop_token_ids", f"token id {short_repr(bad)} outside the vocabulary [0, {vocab_size})"
            )

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


def check_int(name: str, value: Any, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """`value` is an integer (not a bool) in [lo, hi]; the error names `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"must be an integer, got {short_repr(value)}")
    if not lo <= value <= hi:
        raise SamplingParamsError(name, f"must be an integer in [{lo}, {hi}], got {short_repr(value)}")
    return value
