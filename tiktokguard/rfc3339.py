"""RFC 3339 times, the one form tiktokguard writes: UTC, milliseconds, `Z`
(`2027-06-30T23:59:59.000Z`). The store, the API, the incident events and the CLI all use this
module, so stored times compare correctly as text (SQLite orders them as strings) and what the API
prints can be sent back as a `since` bound without losing the events of that same second.

Parsing accepts any RFC 3339 time with an offset (`Z`, `z`, `+02:00`, a fraction of any length,
`t` or a space between date and time, a leap second read as :59) and returns an aware datetime.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["format_time", "now", "parse", "to_timestamp"]

_FORM = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
EXAMPLE = "2027-06-30T23:59:59Z"


def format_time(value: datetime | float) -> str:
    """UTC, to the millisecond (truncated, never rounded up), with a Z. A float is a Unix time;
    a naive datetime is taken as UTC."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(value, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(text: object) -> datetime:
    """An RFC 3339 time with offset → aware datetime. ValueError says what is wrong."""
    if not isinstance(text, str) or not _FORM.match(text):
        raise ValueError(f"expected an RFC 3339 time with offset, e.g. {EXAMPLE}")
    value = text.replace("z", "Z").replace("Z", "+00:00").replace("t", "T").replace(" ", "T")
    if value[17:19] == "60":  # a leap second: Python's datetime has none; a second early is fine
        value = value[:17] + "59" + value[19:]
    dot = value.find(".")
    if dot >= 0:  # fromisoformat takes 3 or 6 digits; more are cut, fewer padded
        end = dot + 1
        while end < len(value) and value[end].isdigit():
            end += 1
        value = value[:dot + 1] + value[dot + 1:end][:6].ljust(6, "0") + value[end:]
    try:
        parsed = datetime.fromisoformat(value)
        parsed.astimezone(UTC)  # 9999-12-31T23:59:59-23:59 is past year 9999 in UTC
    except ValueError as exc:
        raise ValueError(f"invalid time: {exc}") from None
    except OverflowError:
        raise ValueError("time out of range (years 0001-9999 in UTC)") from None
    return parsed


def to_timestamp(text: str) -> float:
    """A stored or received time → Unix time."""
    return parse(text).timestamp()


def now() -> datetime:
    return datetime.now(UTC)
