"""Fault-injection points for crash-safety tests (inert unless BIGALIGN_FAULTS is set).

``BIGALIGN_FAULTS`` is a comma-separated list of rules:

    kill:POINT@K     SIGKILL this process the K-th time POINT is reached (1-based)
    delay:POINT@S    sleep S seconds each time POINT is reached (to widen a window)
    term:POINT@K     SIGTERM this process the K-th time POINT is reached (1-based): a real
                     signal at a known moment, as a scheduler stopping the job would send
                     (the CLI's handler then unwinds the run: exit 130)

Points: ``fit.block`` (a block's statistics computed), ``fit.unit-saved`` (a unit's
statistics stored), ``fit.solved`` (SVD done, transform not yet saved), ``fit.saved``
(transform saved, checkpoint not yet removed), ``apply.region-written`` (a region's data
stored, its done-marker not yet), ``apply.region-done`` (marker stored),
``apply.begun`` (manifest written, output not yet created or checked),
``apply.before-complete`` (all regions done, completion attribute not yet written);
``import.*`` (:mod:`bigalign.commands.ingest`) and ``export.begun``, ``export.file-written`` (a Parquet
file in place, its marker not yet), ``export.file-done``, ``export.before-complete``
(:mod:`bigalign.commands.parquet_export`); ``cli.start`` (the command line's SIGTERM handler
installed, numpy, Dask and Zarr not yet imported).
"""

from __future__ import annotations

import os
import signal
import threading
import time

_counts: dict[str, int] = {}
_lock = threading.Lock()


def _rules():
    spec = os.environ.get("BIGALIGN_FAULTS", "")
    for rule in filter(None, (r.strip() for r in spec.split(","))):
        action, _, rest = rule.partition(":")
        point, _, arg = rest.partition("@")
        yield action, point, arg


def point(name: str) -> None:
    """Mark that execution reached ``name``; act if a rule says so."""
    if "BIGALIGN_FAULTS" not in os.environ:
        return
    with _lock:
        _counts[name] = count = _counts.get(name, 0) + 1
    for action, target, arg in _rules():
        if target != name:
            continue
        if action == "kill" and count == int(arg or 1):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term" and count == int(arg or 1):
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "delay":
            time.sleep(float(arg))
