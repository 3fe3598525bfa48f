"""Journal retention's settings (ADR 0013, "Retention")."""

from __future__ import annotations

import pytest

from services.match.config import MatchSettings
from services.match.retention import Retention


def test_retention_settings_default_and_read_from_the_environment() -> None:
    default = MatchSettings.from_env({})
    assert default.journal_retain == 1_000_000
    assert default.journal_retain_s == 7 * 86_400.0
    assert default.journal_retention_every_s == 300.0
    assert default.journal_readers == ("order.market_cursors", "marketdata.cursors")
    assert default.journal_archive_dir == ""
    assert MatchSettings() == default
    custom = MatchSettings.from_env(
        {
            "CEX_MATCH_JOURNAL_RETAIN": "10",
            "CEX_MATCH_JOURNAL_RETAIN_S": "60",
            "CEX_MATCH_JOURNAL_RETENTION_EVERY_S": "0",
            "CEX_MATCH_JOURNAL_READERS": " order.market_cursors , ",
            "CEX_MATCH_JOURNAL_ARCHIVE_DIR": "/var/lib/cex/archive",
        }
    )
    assert (custom.journal_retain, custom.journal_retain_s) == (10, 60.0)
    assert custom.journal_retention_every_s == 0.0
    assert custom.journal_readers == ("order.market_cursors",)
    assert custom.journal_archive_dir == "/var/lib/cex/archive"
    assert MatchSettings.from_env({"CEX_MATCH_JOURNAL_READERS": "none"}).journal_readers == ()


def test_a_reader_is_a_schema_qualified_table() -> None:
    with pytest.raises(ValueError, match=r"schema\.table"):
        Retention(None, [], retain=1, retain_s=0, readers=["cursors; DROP TABLE x"])  # type: ignore[arg-type]
