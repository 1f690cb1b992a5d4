"""Incremental detokenization and stop-string matching for one request."""

from __future__ import annotations

from typing import Any


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def eos_token_ids(tokenizer: Any, hf_config: Any, model_path: str | None) -> set[int]:
    """EOS ids from the tokenizer, config.json and generation_config.json."""
    ids: set[int] = set()

    def add(x: Any) -> None:
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, (list, tuple)):
            ids.update(i for i in x if isinstance(i, int))

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(hf_config, "eos_token_id", None))
    if model_path:
        try:
            from transformers import GenerationConfig

            add(GenerationConfig.from_pretrained(model_path).eos_token_id)
        except OSError:
            pass
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A delta is only emitted once it no longer ends in an incomplete UTF-8 sequence ("\\ufffd"),
    so multi-byte characters split across tokens are never shown half-decoded.
    """

    def __init__(
        self, tokenizer: Any, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.kwargs)

    def step(self, ids: list[int]) -> str:
        """ids: all output ids so far; returns the text newly made readable."""
        prefix = self.decode(ids[self.prefix_offset : self.read_offset])
        full = self.decode(ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            self.text += delta
            return delta
        return ""

    def finish(self, ids: list[int]) -> str:
        """Flush whatever is left (possibly ending in a replacement character)."""
        delta = self.decode(ids[self.prefix_offset :])[
            len(self.decode(ids[self.prefix_offset : self.read_offset])) :
        ]
        self.prefix_offset = self.read_offset = len(ids)
        self.text += delta
        return delta


class TextStream:
    """The output text of one request: incremental decoding, stop-string detection, trimming.

    While the request runs, a tail that may be the beginning of a stop string is held back, so
    every delta handed out is final: the deltas add up to the finished (stop-trimmed) text.
    Without a tokenizer (--skip-tokenizer-init, or a scheduler that only needs stop detection for
    requests that have stop strings) it produces no text.
    """

    def __init__(
        self,
        tokenizer: Any | None,
        stop_strs: list[str] | None = None,
        no_stop_trim: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.detok = (
            IncrementalDetokenizer(tokenizer, skip_special_tokens, spaces_between_special_tokens)
            if tokenizer is not None
            else None
        )
        self.stop_strs = list(stop_strs or [])
        self.no_stop_trim = no_stop_trim
        self.finished = False
        self._emitted = 0

    def update(self, ids: list[int]) -> str | None:
        """Decode up to the newest token; returns a stop string if one now occurs in the text."""
        if self.detok is None:
            return None
        prev_len = len(self.detok.text)
        if self.detok.step(ids) and self.stop_strs:
            hit = find_stop_str(self.detok.text, self.stop_strs, prev_len)
            return hit[1] if hit else None
        return None

    def finish(self, ids: list[int], stop_str: str | None = None) -> None:
        """Flush the decoder; cut the text before `stop_str` (the stop string that ended it)."""
        self.finished = True
        if self.detok is None:
            return
        self.detok.finish(ids)
        if stop_str is not None and not self.no_stop_trim:
            pos = self.detok.text.find(stop_str)
            if pos != -1:
                self.detok.text = self.detok.text[:pos]

    @property
    def text(self) -> str:
        """The text that may be shown now (all of it once finished)."""
        if self.detok is None:
            return ""
        text = self.detok.text
        if not self.finished and self.stop_strs:
            hold = max(
                (k for s in self.stop_strs for k in range(1, len(s)) if text.endswith(s[:k])), default=0
            )
            text = text[: len(text) - hold]
        return text

    def take_delta(self) -> str:
        """Text made visible since the previous call."""
        text = self.text
        delta, self._emitted = text[self._emitted :], len(text)
        return delta


def find_stop_str(text: str, stop_strs: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop string occurring in text at or after search_from (minus its length)."""
    best: tuple[int, str] | None = None
    for s in stop_strs:
        pos = text.find(s, max(0, search_from - len(s) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, s)
    return best
