"""Exceptions users see. The CLI maps BigalignError to exit code 2 with its message."""

from __future__ import annotations


class BigalignError(Exception):
    """Base class: a problem bigalign can explain (bad input, refused resume, ...)."""


class InputError(BigalignError, ValueError):
    """Bad input found up front: path, array kind, shape, dtype, row range, existing output."""


class NonFiniteError(InputError):
    """A block holds NaN or Inf, or a zero-norm row where rows are normalised; names the row."""


class ChunkReadError(BigalignError, OSError):
    """A chunk could not be read or written after retries; names the array and rows."""


class CheckpointError(BigalignError):
    """Progress cannot be resumed: inputs or options changed, or another run holds the lock."""
