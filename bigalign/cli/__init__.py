"""The command line: one module per command group; parses, calls bigalign.commands,
prints. ``app`` holds the parser and fit/apply/info/status; ``common`` what the command
modules share (argument types, option groups, printing).

:func:`main` (the ``bigalign`` console script) installs its SIGTERM handler before it imports
anything heavy (numpy, Dask, Zarr take ~0.5 s to load): a SIGTERM at any moment of a run,
start-up included, ends it with exit code 130 and one line, never by the signal.
"""

import sys

__all__ = ["main", "build_parser", "storage_options", "add_storage_option"]

_INTERRUPTED = "bigalign: interrupted; rerun the same command to resume"


def main(argv=None) -> int:
    """Run one command; return its exit code (see :mod:`bigalign.cli.app`)."""
    import signal
    import threading

    from ..errors import EXIT_INTERRUPTED
    from .. import faults

    def interrupted(signum, frame):  # as app's: later SIGTERMs are ignored while unwinding
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt()

    installed = threading.current_thread() is threading.main_thread()
    if installed:
        previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        try:
            faults.point("cli.start")  # handler installed, heavy imports not yet loaded
            from .app import main as run
            return run(argv)
        except KeyboardInterrupt:  # SIGTERM or SIGINT before (or after) app's own handling
            print(_INTERRUPTED, file=sys.stderr)
            return EXIT_INTERRUPTED
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def __getattr__(name):
    if name == "build_parser":
        from .app import build_parser

        return build_parser
    if name in ("storage_options", "add_storage_option"):
        from . import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
