"""Errors a client caused; the HTTP server maps them to 400 with ``param`` naming the field."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
