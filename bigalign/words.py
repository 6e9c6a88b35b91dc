"""How counts and figures are written in messages, in one place: ``counted(1, "region")``
is "1 region", ``counted(3, "region")`` "3 regions" (never "1 regions"), and
:func:`significant` prints a float to about four significant digits for people (``--json``
keeps every digit). Imports nothing: the command line's parser uses it before numpy loads."""

from __future__ import annotations

from typing import Optional

__all__ = ["counted", "significant"]


def counted(n: int, one: str, many: Optional[str] = None) -> str:
    """``n`` with its noun, thousands separated: "1 query", "2,000 queries". ``many``
    defaults to ``one + "s"``."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def significant(x, digits: int = 4) -> str:
    """``x`` (a float, or None) to ``digits`` significant digits: 0.01234567 -> "0.01235",
    1.2345678e-09 -> "1.235e-09"; None -> "?"."""
    if x is None:
        return "?"
    return f"{float(x):.{digits}g}"
