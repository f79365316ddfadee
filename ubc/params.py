"""Query parameters of the read routes that need more than FastAPI's type check.

Python and the databases have narrower ranges than the HTTP query string: a date like
``9999-12-31`` overflows as soon as a day is added to it, and an integer beyond a signed
64-bit BIGINT fails in the driver (SQLite's ``OverflowError``, PostgreSQL's
``NumericValueOutOfRange``). Both are the caller's range errors: 400, never a 500.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from ubc.errors import BadRequest

# The largest value of a BIGINT column (sequence numbers, posting ids, cursors).
MAX_DB_INT = 2**63 - 1
# The days a day-range parameter may name: no ledger existed before 1970, and the last day
# leaves room for the exclusive end (the next midnight) that a query on it needs.
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9999, 12, 30)


def parse_cursor(value: str | None, *, name: str = "cursor") -> int | None:
    """The position a paging cursor names, or None; 400 unless it is ASCII digits within
    a BIGINT (a cursor this server made always is)."""
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_DB_INT:
        raise BadRequest(f"invalid {name}", detail={name: value})
    return int(value)


def day_range(
    since: date | None,
    until: date | None,
    *,
    default_days: int = 30,
    today: date | None = None,
) -> tuple[date, date]:
    """``since`` ≤ ``until``, each defaulted (``until`` ``today``, which is the caller's
    clock's day, else the wall clock's; ``since`` ``default_days`` days back, both
    included) and within :data:`FIRST_DAY`…:data:`LAST_DAY`; 400 naming the parameter
    otherwise."""
    for name, day in (("since", since), ("until", until)):
        if day is not None and not FIRST_DAY <= day <= LAST_DAY:
            raise BadRequest(
                f"{name} must be a day from {FIRST_DAY} to {LAST_DAY}",
                detail={name: str(day), "first": str(FIRST_DAY), "last": str(LAST_DAY)},
            )
    until = until or today or datetime.now(UTC).date()
    since = since or max(FIRST_DAY, until - timedelta(days=default_days - 1))
    if since > until:
        raise BadRequest("since is after until", detail={"since": str(since), "until": str(until)})
    return since, until
