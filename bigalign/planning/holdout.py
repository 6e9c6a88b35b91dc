"""Which pairs a fit holds out to choose a map family or parameter: pure functions over
shapes, no I/O.

A held-out set must be spread over the rows (a corpus is often sorted: by date, source or
category, and a tail split would score the families on another distribution) yet cheap to
read out of core (one row here and there would read a whole chunk per row). So it is a
few windows of consecutive rows at seeded random places: ``windows`` of them, each at
most ``ceil(rows / windows)`` rows, never overlapping, sorted. Reading them costs at most
two chunks per window, whatever the corpus's size.
"""

from __future__ import annotations

import numpy as np

__all__ = ["holdout_rows", "holdout_windows", "window_count", "WINDOWS", "MIN_PAIRS"]

#: Windows of held-out rows (fewer when the held-out set is smaller).
WINDOWS = 16
#: The fewest pairs a fit can hold some out of (2 held out, 2 fitted).
MIN_PAIRS = 4


def holdout_rows(n: int, share: float, max_rows: int) -> int:
    """How many of ``n`` pairs to hold out: ``share`` of them, at most ``max_rows``, at
    least 2, and never more than half (the rest is fitted)."""
    if n < MIN_PAIRS:
        raise ValueError(f"{n} pairs are too few to hold any out (at least {MIN_PAIRS} are "
                         "needed)")
    return int(min(max(round(n * share), 2), max_rows, n // 2))


def holdout_windows(start: int, stop: int, count: int, seed: int = 0,
                    windows: int = WINDOWS) -> list[tuple[int, int]]:
    """``count`` rows of [start, stop) in at most ``windows`` disjoint windows of
    consecutive rows, at seeded random places: a sorted list of (a, b), a < b, whose
    lengths sum to ``count``. The same arguments give the same windows."""
    n = stop - start
    if not 0 < count < n:
        raise ValueError(f"cannot hold out {count} of {n} rows")
    k = max(1, min(windows, count))
    sizes = [count // k + (i < count % k) for i in range(k)]
    free = n - count  # rows not held out, shared out as gaps before, between and after
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, free + 1, size=k))  # gap i ends at cuts[i] free rows
    out, pos, used = [], start, 0
    for size, cut in zip(sizes, cuts):
        pos += int(cut) - used
        used = int(cut)
        out.append((pos, pos + size))
        pos += size
    return out


def window_count(count: int, windows: int = WINDOWS) -> int:
    """How many windows :func:`holdout_windows` makes for ``count`` rows."""
    return max(1, min(windows, count)) if count > 0 else 0

