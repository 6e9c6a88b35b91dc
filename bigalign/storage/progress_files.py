"""A job's progress files: fit units (``units/``) and apply markers (``done/``), each
stamped with its run, rows and count *in its name*; :class:`ProgressFiles` is the part of
:class:`bigalign.storage.job.Job` that writes, lists and reads them::

    units/000000012_RUN_START_STOP_N.npz
                           fit: merged float64 statistics of unit 12 (rows START:STOP, N
                           pairs) of run RUN, also stamped inside the file
    done/000000012_RUN_START_STOP_B
                           apply: marker of region 12 (rows START:STOP, B bad rows) of run
                           RUN, written after the region's data; its JSON body lists the
                           bad rows

**Names carry the stamps.** Resume, verification and ``status`` decide what is done from
*one listing* of ``units/`` or ``done/`` (pages of 1000 names on object stores), never one
read per file: at 10^5 markers one GET each would take longer than the listing by three
orders of magnitude. A file is written whole under its final name, so a name that is
listed vouches for its run, its rows and (units) its pair count exactly as the stamps inside
it do; the contents are read only where they are needed: a unit's statistics when a resumed
fit merges them (checked against the name; a mismatch recomputes the unit), and a marker's
list of bad rows when its name says it has some. Markers stay one per region (a group
marker written when a whole group is done would lose the group on a kill); the planner
bounds their number instead (:mod:`bigalign.planning.plan`). Files named the older way (no stamps in
the name) are never trusted, and are removed with the rest.
"""

from __future__ import annotations

import io
import json
import re
import time
import warnings
from typing import Optional

import numpy as np

from ..errors import CheckpointError
from ..maths.stats import Moments


#: ``done/`` marker names: index, run id, rows and count of bad rows.
_MARKER = re.compile(r"(\d{9,})_([0-9A-Za-z-]+)_(\d+)_(\d+)_(\d+)")
#: ``units/`` names: index, run id, rows and pair count.
_UNIT = re.compile(r"(\d{9,})_([0-9A-Za-z-]+)_(\d+)_(\d+)_(\d+)\.npz")


def _parse(pattern, name: str) -> Optional[tuple]:
    """(index, run id, start, stop, count) from a stamped file name, or None."""
    m = pattern.fullmatch(name)
    if m is None:
        return None
    return int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5])


def _marker_name(index: int, run_id: str, start: int, stop: int, bad: int) -> str:
    return f"{index:09d}_{run_id}_{start}_{stop}_{bad}"


def _unit_name(index: int, run_id: str, start: int, stop: int, n: int) -> str:
    return f"{index:09d}_{run_id}_{start}_{stop}_{n}.npz"


def _mtime(info: dict) -> float:
    """Modification time (seconds since the epoch) of a listing entry: ``mtime`` on file
    systems, ``LastModified`` on object stores; 0 when neither is there."""
    t = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if t is None:
        return 0.0
    if hasattr(t, "timestamp"):
        return float(t.timestamp())
    try:
        return float(t)
    except (TypeError, ValueError):
        return 0.0


def _temp_of(name: str, base: str) -> bool:
    """Is ``name`` the temporary file of ``base`` (``BASE.tmp-HEX``, :meth:`Job.put_file`)?"""
    return name.startswith(base + ".tmp-") and \
        re.fullmatch(r"[0-9a-f]+", name[len(base) + 5:]) is not None


def _stamped_by(pattern, name: str, runs: set) -> bool:
    """Is ``name`` (or the file it is the temporary of) a unit or marker file name of
    ``pattern`` stamped with one of the run ids ``runs``?"""
    base = name.split(".tmp-")[0]
    if base != name and not _temp_of(name, base):
        return False
    parsed = _parse(pattern, base)
    return parsed is not None and parsed[1] in runs


class ProgressFiles:
    """Fit units and apply markers of a :class:`bigalign.storage.job.Job` (a mixin: it
    uses the job's run id, its fenced writes and its listings)."""

    # ---- fit units ----------------------------------------------------------------
    def _unit_path(self, index: int, start: int, stop: int, n: int) -> str:
        return self._path("units", _unit_name(index, self.run_id or "", start, stop, n))

    def save_unit(self, index: int, moments: Moments, start: int, stop: int) -> Moments:
        """Store a finished unit's statistics, stamped with the run id, row range and pair
        count (in its name and inside). Without recorded progress: the fence check only."""
        if not self.progress:
            self.check_fence()
            return moments
        buf = io.BytesIO()
        np.savez(buf, saved_at=time.time(), run_id=np.str_(self.run_id or ""),
                 rows=np.array([start, stop], dtype=np.int64), **moments.to_arrays())
        self.fenced_put(self._unit_path(index, start, stop, int(moments.n)), buf.getvalue())
        return moments

    def load_unit(self, index: int, start: int, stop: int) -> Moments:
        """The stored statistics of unit ``index`` (rows [start, stop)) of this run; raises
        CheckpointError saying why when there are none or they do not match."""
        raw = self.get_file(self._unit_path(index, start, stop, stop - start))
        if raw is None:
            problems = [p for p in (self._unit_name_problem(n, index, start, stop)
                                    for n in self.list_names("units")) if p]
            why = problems[0] if problems else "is recorded as done but missing"
            raise CheckpointError(f"{self.url}: unit {index} {why}")
        try:
            with np.load(io.BytesIO(raw)) as z:
                problem = self._unit_problem(z, start, stop)
                if problem:
                    raise CheckpointError(f"{self.url}: unit {index} {problem}; pass --restart")
                return Moments.from_arrays(z)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.url}: unit {index} is unreadable ({e})") from None

    def _unit_name_problem(self, name: str, index: int, start: int,
                           stop: int) -> Optional[str]:
        """Why the unit file ``name`` cannot be unit ``index`` (rows [start, stop)) of this
        run, or None; names of other units give None too (nothing to say about them)."""
        parsed = _parse(_UNIT, name)
        if parsed is None:
            if name.endswith(".npz") and name[:9].isdigit() and int(name[:9]) == index:
                return "has no run stamp in its name (written by another version)"
            return None
        i, run, a, b, n = parsed
        if i != index:
            return None
        if run != self.run_id:
            return f"belongs to run {run[:12]}, not {str(self.run_id)[:12]}"
        if [a, b] != [start, stop]:
            return f"covers rows {[a, b]}, not {[start, stop]}"
        if n != stop - start:
            return f"holds {n} pairs for {stop - start} rows"
        return None

    def _unit_problem(self, z, start: int, stop: int) -> Optional[str]:
        """Why a stored unit cannot be used for rows [start, stop) of this run, or None."""
        if "cross" not in z.files or "run_id" not in z.files or "rows" not in z.files:
            return "has no run stamp (written by another version)"
        if str(z["run_id"]) != self.run_id:
            return f"belongs to run {str(z['run_id'])[:12]}, not {str(self.run_id)[:12]}"
        if [int(v) for v in z["rows"]] != [start, stop]:
            return f"covers rows {[int(v) for v in z['rows']]}, not {[start, stop]}"
        if int(z["n"]) != stop - start:
            return f"holds {int(z['n'])} pairs for {stop - start} rows"
        return None

    def done_units(self, expected: dict[int, tuple[int, int]]) -> set[int]:
        """Units of ``expected`` (index -> (start, stop)) whose stored statistics belong to
        this run and cover exactly their rows, by their names in one listing of ``units/``
        (no file is read). Anything else (a stale file of an earlier run, a wrong range or
        pair count, an older name) is ignored with a warning and recomputed; a file whose
        contents turn out not to match its name is recomputed when the fit loads it."""
        done: set = set()
        if not self.progress:
            return done
        seen: dict[int, str] = {}
        for name in sorted(self.list_names("units")):
            parsed = _parse(_UNIT, name)
            index = parsed[0] if parsed else (int(name[:9]) if name[:9].isdigit() and
                                               name.endswith(".npz") else None)
            if index is None or index not in expected:
                continue
            problem = self._unit_name_problem(name, index, *expected[index])
            if problem is None:
                done.add(index)
            else:
                seen.setdefault(index, problem)
        for index, problem in sorted(seen.items()):
            if index not in done:
                warnings.warn(f"{self.url}: unit {index} {problem}; recomputing it")
        return done

    # ---- apply regions ------------------------------------------------------------
    def mark_done(self, index: int, start: int, stop: int, bad: Optional[list] = None) -> None:
        """Record region ``index`` (rows [start, stop)) as written; call after its data.
        ``bad``: the global numbers of rows written as NaN/zero (``--bad-rows``). Without
        recorded progress: the fence check only."""
        if not self.progress:
            self.check_fence()
            return
        bad = list(bad or [])
        info = {"run_id": self.run_id, "start": start, "stop": stop, "t": time.time(),
                "bad_rows": bad}
        name = _marker_name(index, self.run_id or "", start, stop, len(bad))
        self.fenced_put(self._path("done", name), json.dumps(info).encode())

    def _markers(self, expected: Optional[dict[int, tuple[int, int]]] = None) -> dict[int, dict]:
        """This run's markers from one listing of ``done/``: index -> {start, stop, t,
        bad_count}, only those of ``expected`` (index -> (start, stop)) with exactly those
        rows when given."""
        found: dict = {}
        if not self.progress:
            return found
        for name, entry in self._list_detail("done").items():
            parsed = _parse(_MARKER, name)
            if parsed is None or parsed[1] != self.run_id:
                continue
            index, _, start, stop, nbad = parsed
            if expected is not None and list(expected.get(index, ())) != [start, stop]:
                continue
            found[index] = {"run_id": self.run_id, "start": start, "stop": stop,
                            "t": _mtime(entry), "bad_count": nbad, "name": name}
        return found

    def region_markers(self, expected: dict[int, tuple[int, int]]) -> dict[int, dict]:
        """Markers of ``expected`` regions (index -> (start, stop)) written by this run for
        exactly those rows: index -> marker ({run_id, start, stop, t, bad_rows}). One
        listing; a marker's file is read only when its name says it holds bad rows."""
        found = self._markers(expected)
        for info in found.values():
            info["bad_rows"] = []
            if info["bad_count"]:
                try:
                    body = json.loads(self.get_file(self._path("done", info["name"])) or b"{}")
                    info["bad_rows"] = list(body.get("bad_rows", []))
                except ValueError:
                    pass
        return found

    def done_regions(self, expected: dict[int, tuple[int, int]]) -> set[int]:
        """Regions of ``expected`` with a marker of this run: one listing, no reads."""
        return set(self._markers(expected))
