"""What a streaming run reports: :class:`RunReport` (apply, import and export return one)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RunReport", "MAX_BAD_ROWS_LISTED"]

#: The output's ``bad_rows`` attribute lists at most this many row numbers (all are counted).
MAX_BAD_ROWS_LISTED = 100_000


@dataclass
class RunReport:
    """What a streaming run did: ``rows`` computed by this run (``rows_total`` in the job),
    seconds, tasks run, units/regions in the job and those found done from an earlier run.
    ``already_complete``: the output was finished with the same inputs and options, so
    nothing was done."""

    rows: int
    seconds: float
    tasks: int
    units_total: int
    units_resumed: int
    rows_total: int = 0
    already_complete: bool = False
    bad_rows: list = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        """Rows computed by this run per second (rows found done are not counted); NaN
        when it computed none (everything was resumed)."""
        return self.rows / self.seconds if self.seconds > 0 and self.rows else float("nan")
