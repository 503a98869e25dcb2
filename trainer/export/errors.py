"""Errors of the export: what the user can fix (exit 2) and what failed at run time (exit 1)."""

from __future__ import annotations


class ExportError(RuntimeError):
    """The export or its verification failed; nothing was published."""
