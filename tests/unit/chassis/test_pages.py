"""Lists paged by (time, id) (chassis/pages.py): what auth and funding page by."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.chassis import ExchangeError, page_token, time_key_after, time_keyed_page

REASON = "TEST_BAD_TOKEN"
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def _rows(n: int) -> list[tuple[datetime, str]]:
    return [(T0 - timedelta(seconds=i), f"id{i}") for i in range(n)]


def test_a_short_list_is_the_last_page() -> None:
    rows = _rows(3)
    assert time_keyed_page(rows, 3, "things", lambda r: r) == (rows, "")


def test_a_longer_list_is_cut_and_its_token_goes_on_after_the_last_row_shown() -> None:
    rows = _rows(4)  # fetched one more than the page
    page, token = time_keyed_page(rows, 3, "things", lambda r: r)
    assert page == rows[:3]
    assert time_key_after(token, "things", reason=REASON) == rows[2]


def test_no_token_is_the_first_page() -> None:
    assert time_key_after("", "things", reason=REASON) is None


@pytest.mark.parametrize(
    "token",
    [
        page_token("others", T0.isoformat(), "id0"),  # another list's token
        page_token("things", "not a time", "id0"),
        page_token("things", T0.isoformat()),  # no id
    ],
)
def test_a_token_that_is_not_this_lists_is_invalid(token: str) -> None:
    with pytest.raises(ExchangeError) as raised:
        time_key_after(token, "things", reason=REASON)
    assert raised.value.reason == REASON
    assert [v.field for v in raised.value.violations] == ["page_token"]
