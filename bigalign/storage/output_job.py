"""The output-owned region job: the one sequence that apply, import and export run through.

A command that writes an output region by region (apply: whole output chunks; import:
whole store chunks; export: whole Parquet files) describes its output as a :class:`Target`
and runs::

    with output_job(target, checkpoint, kind, fingerprint, plan, ...) as run:
        plan = Plan(**run.manifest["plan"])          # the stored plan when resuming
        handle, done = run.open(plan.region_rows())  # this run's output, regions done
        ... one task per region not in ``done``: write its data, then its marker ...
        run.finish(handle, plan.region_rows(), completion)

What this module guarantees, once for every command:

* **The output is the unit of exclusion.** The lease is taken at the output's job home
  (:func:`bigalign.storage.job.lease_home`), whatever checkpoint the run names, or
  none (``checkpoint=False``): two runs writing one output cannot both hold it, and every
  write of a run that lost it is refused by the fence.
* **One place classifies an existing output** (:meth:`RegionRun.open`): it is this run's
  (created by the manifest's run id with the planned layout: resume), or it is not (create
  it again and forget the markers). A storage error that is transient is never taken for
  "not this run's": it ends the run with exit 75 and changes nothing believed done.
* **A marker is trusted only with its data behind it.** On resume, the regions recorded as
  done are checked against one listing of the output (:meth:`Target.check`: every chunk or
  file stored, of the exact size where the codecs fix it); a region whose data is missing
  or truncated is written again. Leftovers of killed writers in the output (Zarr's
  ``*.partial`` files, Parquet temporaries) are removed, as they are only ever this job's.
* **Verify, then complete, under the fence.** :meth:`RegionRun.finish` checks that every
  region has this run's marker and its data (the same listing), that the lease is still
  this run's, and that the output still records this run as its writer, before the
  completion mark is written, last.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Optional, Protocol

from ..errors import CheckpointError, TransientError, is_transient
from .job import Job, checkpointed, lease_home

log = logging.getLogger("bigalign")

__all__ = ["Target", "RegionRun", "output_job", "classify", "OutputTakenError"]


class OutputTakenError(CheckpointError):
    """The output no longer records this run as its writer (another run re-created it):
    this run stops without marking it complete."""


class Target(Protocol):
    """An output written region by region, as the region job sees it. ``url``: where it
    is; ``noun``: what a region is called in messages ("regions", "files")."""

    url: str
    noun: str

    def of_run(self, run_id: str) -> Optional[Any]:
        """A handle on the existing output when run ``run_id`` created it with the planned
        layout (a resume writes into it); None when it is absent or not this run's. Raises
        when storage does not answer (never None for "could not tell")."""

    def create(self, run_id: str) -> Any:
        """Create the output afresh (replacing what is there: the caller checked that it
        may), stamped with ``run_id``; return its handle."""

    def owner(self) -> Optional[str]:
        """The run id the output records as its writer now (read afresh from storage)."""

    def check(self, handle, regions: dict[int, tuple[int, int]]) -> set[int]:
        """Of ``regions`` (index -> rows [a, b)), those whose data is not all stored whole,
        from one listing; removes the leftovers of killed writers found in it."""

    def complete(self, handle, record: dict) -> None:
        """Write the completion mark, with ``record`` (the last write of the job)."""


def classify(what: str, fn: Callable[[], Any], *, absent=(FileNotFoundError,)):
    """``fn()``, or None when it raises one of ``absent`` (nothing there) or an error that
    says the thing is not what was looked for; a transient error (storage, connection)
    raises :class:`TransientError` naming ``what``: "could not tell" is never "not there"."""
    try:
        return fn()
    except TransientError:
        raise
    except absent:
        return None
    except Exception as e:
        if is_transient(e):
            raise TransientError(f"{what}: storage did not answer ({type(e).__name__}: {e}); "
                                 "rerun to resume") from e
        log.debug("%s: %s", what, e)
        return None


class RegionRun:
    """One run of a region job: the job (progress and fence), its manifest, the target."""

    def __init__(self, job: Job, manifest: dict, target: Target):
        self.job, self.manifest, self.target = job, manifest, target

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def open(self, expected: dict[int, tuple[int, int]]) -> tuple[Any, set[int]]:
        """This run's output and the regions of ``expected`` found done: (handle, done).
        Creates the output (and forgets any markers) when it is absent or not this run's;
        on resume, trusts a marker only with its data behind it."""
        handle = self.target.of_run(self.run_id)
        if handle is None:
            self.job.check_fence()
            self.job.clear_markers()
            return self.target.create(self.run_id), set()
        done = self.job.done_regions(expected)
        lost = self.target.check(handle, {i: expected[i] for i in sorted(done)})
        if lost:
            a, b = expected[min(lost)]
            log.warning("%d %s recorded as done have data missing or truncated in %s "
                        "(first: rows %d:%d): writing them again", len(lost),
                        self.target.noun, self.target.url, a, b)
            done -= lost
        log.warning("resuming: %d of %d %s done", len(done), len(expected), self.target.noun)
        return handle, done

    def markers(self, expected: dict[int, tuple[int, int]]) -> dict[int, dict]:
        """Every region's marker of this run (with its bad rows); raises CheckpointError
        naming the first region without one. Empty without recorded progress."""
        if not self.job.progress:
            return {}
        found = self.job.region_markers(expected)
        missing = sorted(set(expected) - set(found))
        if missing:
            a, b = expected[missing[0]]
            raise CheckpointError(f"{len(missing)} of {len(expected)} {self.target.noun} of "
                                  f"{self.target.url!r} are not recorded as written "
                                  f"(first: rows {a}:{b}); rerun to resume")
        return found

    def finish(self, handle, expected: dict[int, tuple[int, int]], record: dict) -> None:
        """Verify, then complete: every region's data is stored whole (one listing), the
        lease is still this run's and the output still records this run as its writer;
        then the completion mark, with ``record``, is written last. Call after
        :meth:`markers`."""
        lost = self.target.check(handle, expected)
        if lost:
            a, b = expected[min(lost)]
            raise CheckpointError(f"{len(lost)} of {len(expected)} {self.target.noun} of "
                                  f"{self.target.url!r} are missing or truncated although "
                                  f"they were written (first: rows {a}:{b}; removed or "
                                  "damaged meanwhile?); rerun to write them again")
        self.job.check_fence()
        owner = self.target.owner()
        if owner != self.run_id:
            raise OutputTakenError(
                f"output {self.target.url!r} was re-created by another run ({owner or 'none'}"
                f", not this run {self.run_id[:12]}): this run stops without marking it "
                "complete; rerun the command to resume or finish it")
        self.target.complete(handle, record)


@contextlib.contextmanager
def output_job(target: Target, checkpoint: Optional[str], kind: str, fingerprint: dict,
               plan: dict, *, storage_options: Optional[dict] = None, restart: bool = False,
               replace: bool = False):
    """The checkpointed job (:func:`bigalign.storage.job.checkpointed`) of a region
    job writing ``target``: progress at ``checkpoint`` (None: none recorded), the lease at
    the output's job home. Yields a :class:`RegionRun`."""
    from .locations import canonical_url

    with checkpointed(checkpoint, kind, dict(fingerprint), plan,
                      storage_options=storage_options, restart=restart, replace=replace,
                      lease_url=lease_home(target.url),
                      output=canonical_url(target.url, storage_options)) as (job, manifest):
        yield RegionRun(job, manifest, target)


class ZarrTarget:
    """The part of a :class:`Target` common to Zarr outputs (an apply output, bare or a
    store; an imported store): the ``bigalign`` attribute of the node at ``url`` records
    the writer's run id and, last, ``complete``. Handles are ``(node, embeddings, ids or
    None)``."""

    noun = "regions"

    def __init__(self, url, storage_options: Optional[dict] = None):
        self.url = str(url)
        self.storage_options = storage_options

    def owner(self) -> Optional[str]:
        import zarr

        from .locations import options_for

        def read():
            node = zarr.open(self.url, mode="r",
                             storage_options=options_for(self.url, self.storage_options))
            return (node.attrs.get("bigalign") or {}).get("run_id")
        return classify(f"output {self.url!r}", read)

    def check(self, handle, regions: dict[int, tuple[int, int]]) -> set[int]:
        import numpy as np

        from .stores import list_objects, retrying, unstored_chunks

        _, emb, ids = handle
        lost: set[int] = set()
        if not regions:
            return lost
        index = sorted(regions)
        starts = np.array([regions[i][0] for i in index])
        stops = np.array([regions[i][1] for i in index])
        for arr in (emb, ids):
            if arr is None:
                continue
            kind, entries = retrying(f"cannot list the chunks of {self.url!r}",
                                     lambda: list_objects(arr))
            _remove_partials(arr, entries)
            found = unstored_chunks(arr, entries, sizes=True)
            if found is None or not found[0].size:
                continue
            missing, _, step = found
            # a region holds chunks [a // step, ceil(b / step)): lost if one is missing
            first = np.searchsorted(missing, starts // step)
            hit = (first < missing.size) & \
                (missing[np.minimum(first, missing.size - 1)] < -(-stops // step))
            lost.update(int(index[k]) for k in np.flatnonzero(hit))
        return lost

    def complete(self, handle, record: dict) -> None:
        node = handle[0]
        attrs = dict(node.attrs.get("bigalign", {}))
        attrs.update(record)
        node.attrs["bigalign"] = attrs


def _remove_partials(arr, entries: list) -> None:
    """Remove the temporary files Zarr's local store writes a chunk to before its rename
    (``KEY.HEX.partial``), left by a writer killed mid-write: inside an output this job
    owns, they are its own leftovers."""
    import re

    from .stores import _fs_and_root

    fs, root = _fs_and_root(arr)
    if fs is None:
        return
    for rel, _, _ in entries:
        if re.search(r"\.[0-9a-f]{32}\.partial$", rel):
            try:
                fs.rm_file(f"{root}/{rel}")
                log.info("removed %s/%s, left by a writer killed mid-write", root, rel)
            except FileNotFoundError:
                pass
