"""Errors about input data, importable without torch (the CLI catches them before loading it)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names the file."""
