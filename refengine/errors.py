"""Typed errors of the reference engine: each message is one line saying what, where, and how to fix it."""
from __future__ import annotations


class EngineError(ValueError):
    """A user-facing failure of the engine (the CLI prints the message and exits 2)."""


class ModelNotFoundError(EngineError):
    """A model name or path that resolves to no weight file."""


class WeightsError(EngineError):
    """A weight file that is unreadable, truncated, or does not match its model's tensor inventory."""


class TokenizerError(EngineError):
    """Tokenizer metadata the engine cannot turn into an exact tokenizer."""


def one_line(text: object) -> str:
    """Collapse a message from a library onto one line (the one-line rule of every error)."""
    return " ".join(str(text).split())


__all__ = ["EngineError", "ModelNotFoundError", "TokenizerError", "WeightsError", "one_line"]
