"""Plain JSON values from bigalign's results (numpy scalars and arrays, NaN/Inf), for the
command line's ``--json`` output and the JSON files commands write."""

from __future__ import annotations

import math

__all__ = ["json_safe"]


def json_safe(obj):
    """JSON-safe: NaN/Inf become null, numpy scalars and arrays plain numbers and lists,
    anything else unknown its str()."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
