"""Errors a user can act on. The CLI prints their message (no traceback) and exits with status 2."""

from __future__ import annotations


class ConversionError(ValueError):
    """Base class: the input cannot be converted as asked."""


class CheckpointFormatError(ConversionError):
    """A weights file is missing, truncated, corrupt or of an unsupported kind."""


class KeyMismatchError(ConversionError):
    """Missing or unexpected checkpoint keys; the message lists them."""


class ShapeMismatchError(ConversionError):
    """A tensor's shape differs from what the config implies; the message gives the key and both shapes."""


class ConfigMismatchError(KeyMismatchError, ShapeMismatchError):
    """The config describes a different model than the weights (layer count, sizes, vocabulary)."""


def listing(items: list[str], limit: int = 20) -> str:
    """`[a, b, ...]` with at most `limit` entries and a count of the rest."""
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"
