"""Incremental detokenization and stop-string matching for one request."""

from __future__ import annotations

from typing import Any


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


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


class NullDetokenizer:
    """Stands in when the server runs without a tokenizer (--skip-tokenizer-init): no text."""

    text = ""

    def step(self, ids: list[int]) -> str:
        return ""

    def finish(self, ids: list[int]) -> str:
        return ""


def find_stop_str(text: str, stop_strs: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop string occurring in text at or after search_from (minus its length)."""
    best: tuple[int, str] | None = None
    for s in stop_strs:
        pos = text.find(s, max(0, search_from - len(s) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, s)
    return best
