"""Exceptions users see, and the one place that maps an exception to a process exit code.

Exit codes of the command line (:func:`exit_code`)::

    0    done, or already done
    1    unexpected error: a bug (a traceback is printed)
    2    usage, bad input or a refused run (the message says what and where)
    3    unfinished (``bigalign status`` / ``info`` on a run in flight or interrupted)
    4    ``realign``'s quality gate failed: the candidate was not published (a retry gives
         the same verdict, so a scheduler should fail the job, not retry it)
    75   transient failure after retries (EX_TEMPFAIL): storage or the Dask scheduler did not
         answer, or the cluster's workers were lost (:class:`ClusterLostError`); a scheduler
         should retry the same command, which resumes
    130  interrupted by SIGINT or SIGTERM; rerun the same command to resume
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_UNFINISHED = 3
EXIT_GATE = 4  # realign: the quality gate failed, nothing was published
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130


class BigalignError(Exception):
    """Base class: a problem bigalign can explain (bad input, refused resume, ...)."""


class InputError(BigalignError, ValueError):
    """Bad input found up front: path, array kind, shape, dtype, row range, existing output."""


class DamagedOutputError(InputError):
    """A finished output (marked complete) lacks part of what its record lists: a Parquet
    file of an export, a chunk of an apply output or store, a transform's arrays. A rerun
    refuses it (exit 2) rather than calling it done; ``info``/``status`` report it (exit 3);
    ``--overwrite`` writes it again. ``lost``: what is missing, in words (when known)."""

    lost = None


class NonFiniteError(InputError):
    """A block holds NaN or Inf, or a zero-norm row where rows are normalised; names the row."""


class ChunkReadError(BigalignError, OSError):
    """A chunk could not be read or written (corrupt, missing, forbidden, or storage that
    kept failing after retries); names the array and rows."""


class CheckpointError(BigalignError):
    """Progress cannot be resumed: inputs or options changed, or another run holds the lock."""


class GateFailedError(BigalignError):
    """``realign``: the candidate transform failed its quality gate and was not published
    (exit code 4). Deterministic: rerunning the same run gives the same verdict."""


class TransientError(BigalignError):
    """Storage (or the cluster) did not answer even after retries: nothing is wrong with the
    inputs, and the same command may succeed later (it resumes). Exit code 75."""


class ClusterLostError(TransientError):
    """The dask.distributed cluster went away under a run (exit code 75): its scheduler could
    not be reached or was lost, every worker that ran a task died
    (``distributed.scheduler.allowed-failures`` + 1 times), or the scheduler had no worker for
    the stall timeout. Work finished before is kept: a rerun resumes. Raised by
    :mod:`bigalign.execution.cluster` with a message naming the scheduler."""


class TransientChunkReadError(ChunkReadError, TransientError):
    """A chunk read or write kept failing with a transient error (connection refused or
    reset, timeout, server error) after retries."""


#: OS errors that a retry does not cure: the path, the permissions or the disk are wrong.
_PERSISTENT_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)
_PERSISTENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                      errno.EEXIST, errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG,
                      getattr(errno, "EDQUOT", errno.ENOSPC)}
#: botocore's connection errors are not OSErrors (s3fs lets some through untranslated)
_FOREIGN_TRANSIENT = {("botocore.exceptions", "ConnectionError"),
                      ("botocore.exceptions", "HTTPClientError")}


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: a connection or timeout error, an OS error other
    than a wrong path / permission / full disk, or a :class:`TransientError`. Bigalign's own
    other errors (bad input, NaN rows, corrupt chunks, refused resumes) are deterministic."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, BigalignError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, _PERSISTENT_OSERRORS) and exc.errno not in _PERSISTENT_ERRNOS
    return any((c.__module__, c.__name__) in _FOREIGN_TRANSIENT for c in type(exc).__mro__)


#: what a full disk or quota looks like in the text of errors that carry no errno (polars'
#: ComputeError from its Rust writer: "No space left on device (os error 28)")
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "(os error 28)",
                   "(os error 122)")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` says the disk (or the user's quota) is full: an OSError with errno
    ENOSPC or EDQUOT, or an error of a library that reports it only in its message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(exc).lower()
    return any(t in text for t in _DISK_FULL_TEXT)


def is_persistent_os_error(exc: BaseException) -> bool:
    """An OS error about the path, permissions or disk: the user must fix something."""
    return isinstance(exc, OSError) and not is_transient(exc)


def exit_code(exc: BaseException) -> int:
    """The process exit code for an exception that ended a command (see module doc)."""
    if isinstance(exc, KeyboardInterrupt):  # SIGINT, and SIGTERM via the CLI's handler
        return EXIT_INTERRUPTED
    if is_transient(exc):
        return EXIT_TEMPFAIL
    if isinstance(exc, GateFailedError):
        return EXIT_GATE
    if isinstance(exc, BigalignError) or is_persistent_os_error(exc):
        return EXIT_USAGE
    return EXIT_BUG
