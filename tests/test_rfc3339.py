"""The one RFC 3339 form (UTC, milliseconds, Z), and the store's migration of older times to it."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiktokguard import rfc3339
from tiktokguard.devices.store import MIGRATIONS, SqliteStore


def test_format_is_utc_milliseconds_with_z() -> None:
    assert rfc3339.format_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339.format_time(1.0009) == "1970-01-01T00:00:01.000Z"  # truncated, not rounded
    plus_two = datetime(2027, 6, 30, 23, 59, 59, 123456, timezone(timedelta(hours=2)))
    assert rfc3339.format_time(plus_two) == "2027-06-30T21:59:59.123Z"
    assert rfc3339.format_time(datetime(2027, 1, 1)) == "2027-01-01T00:00:00.000Z"  # naive: UTC


@pytest.mark.parametrize("text, expected", [
    ("2027-06-30T23:59:59Z", datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)),
    ("2027-06-30t23:59:59z", datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)),
    ("2027-06-30 23:59:59+00:00", datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)),
    ("2027-06-30T23:59:59.5Z", datetime(2027, 6, 30, 23, 59, 59, 500000, tzinfo=UTC)),
    ("2027-06-30T23:59:59.123456789Z", datetime(2027, 6, 30, 23, 59, 59, 123456, tzinfo=UTC)),
    ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),  # leap second
    ("2027-07-01T01:59:59+02:00", datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)),
])
def test_parse_accepts_rfc3339_with_any_offset_and_fraction(text: str,
                                                           expected: datetime) -> None:
    assert rfc3339.parse(text) == expected


@pytest.mark.parametrize("text", [
    "2027-06-30", "2027-06-30T23:59:59", "yesterday", "2027-13-01T00:00:00Z",
    "9999-12-31T23:59:59-23:59", "2027-06-30T23:59:59.Z", None, 17,
])
def test_parse_rejects_what_is_not_an_rfc3339_time_with_offset(text: object) -> None:
    with pytest.raises(ValueError):
        rfc3339.parse(text)


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9998, 12, 31),
                    timezones=st.just(UTC)))
def test_format_then_parse_loses_only_what_is_below_a_millisecond(moment: datetime) -> None:
    again = rfc3339.parse(rfc3339.format_time(moment))
    assert timedelta(0) <= moment - again < timedelta(milliseconds=1)


@given(st.lists(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9998, 12, 31),
                             timezones=st.just(UTC)), min_size=2, max_size=2))
def test_formatted_times_sort_as_text_as_they_do_in_time(pair: list[datetime]) -> None:
    # The store compares times as text: the order of the text must be the order in time.
    a, b = (rfc3339.format_time(m) for m in pair)
    truncated = [m.replace(microsecond=m.microsecond // 1000 * 1000) for m in pair]
    assert (a < b) == (truncated[0] < truncated[1])


async def test_a_store_from_before_the_one_form_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:2]:  # the schema as the previous release left it
        db.executescript(script)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO devices VALUES ('d1', 'phone', '[]', '[]', 'c', 's', 't', '', "
               "'2027-06-30T23:59:59+02:00', 1, '2026-11-26T16:45:46.123456+00:00', "
               "'2026-11-26T16:45:46+00:00', 0)")
    for second in ("2026-11-26T16:45:46Z", "2026-11-26T16:45:47Z"):  # audit: to the second
        db.execute("INSERT INTO audit (at, actor, action, device_id) VALUES (?, 'it', 'create', "
                   "'d1')", (second,))
    db.execute("INSERT INTO api_tokens VALUES ('it', 'admin', 'x', '2026-11-26T16:45:46Z')")
    db.close()

    store = await SqliteStore.open(path)
    try:
        (device,) = await store.load_devices()
        assert device.expires_at == datetime(2027, 6, 30, 21, 59, 59, tzinfo=UTC)
        assert device.created_at == datetime(2026, 11, 26, 16, 45, 46, 123000, tzinfo=UTC)
        at = [entry["at"] for entry in await store.audit()]
        assert at == ["2026-11-26T16:45:46.000Z", "2026-11-26T16:45:47.000Z"]
        # A bound in the one form now finds the entries of its own second.
        since = rfc3339.format_time(rfc3339.parse("2026-11-26T16:45:47Z"))
        assert [e["at"] for e in await store.audit(since=since)] == [at[1]]
    finally:
        await store.close()
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT created_at FROM api_tokens").fetchone()[0] == \
        "2026-11-26T16:45:46.000Z"
    assert raw.execute("SELECT expires_at FROM devices").fetchone()[0] == \
        "2027-06-30T21:59:59.000Z"
    raw.close()
