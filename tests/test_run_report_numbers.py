"""How the headline table writes numbers: a value and its interval with one number of decimals."""

from __future__ import annotations

import pytest

from mtrun.run_report import headline_rows


@pytest.mark.parametrize(("value", "low", "high", "expected"), [
    (9.0, 8.0, 10.0, ("9", "[8, 10]")),                  # a median rank: whole numbers stay whole
    (126.0, 112.0, 141.0, ("126", "[112, 141]")),
    (55.66, 51.38, 59.92, ("55.7", "[51.4, 59.9]")),     # from 10 up: one decimal
    (7.14, 4.142, 10.2, ("7.14", "[4.14, 10.20]")),      # below: three significant digits, bounds alike
])
def test_a_value_and_its_interval_share_their_decimals(value, low, high, expected):
    metrics = {"retrieval/t2a/median_rank": value, "retrieval/t2a/median_rank:ci_low": low, "retrieval/t2a/median_rank:ci_high": high}
    ((_, shown, interval),) = headline_rows(metrics)
    assert (shown, interval) == expected


def test_a_spread_over_seeds_is_not_shown_as_an_interval():
    metrics = {"probe/instrument/accuracy": 98.71, "probe/instrument/accuracy:std": 0.177}
    ((label, shown, interval),) = headline_rows(metrics)
    assert label.endswith("(%)") and shown == "98.7" and interval == "sd 0.2 over seeds (not a CI)"
