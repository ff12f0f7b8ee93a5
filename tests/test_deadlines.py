"""app.deadlines: budgets, time already spent before the app, and the terminate flag."""

from __future__ import annotations

import time

import pytest

from app.deadlines import Deadline, parse_start, parse_timeout
from app.errors import InvalidRequest


def test_budget_precedence_field_then_header_then_default() -> None:
    assert Deadline.from_request(50, 70, 1000).budget_ms == 50
    assert Deadline.from_request(None, 70, 1000).budget_ms == 70
    assert Deadline.from_request(None, None, 1000).budget_ms == 1000


def test_time_since_nginx_is_subtracted() -> None:
    stamp = f"t={time.time() - 0.300:.3f}"
    deadline = Deadline.from_request(None, None, 1000, parse_start(stamp, time.time()))
    assert 650 < deadline.remaining_ms() < 710
    assert 290 < deadline.elapsed_ms() < 350


@pytest.mark.parametrize("header", [None, "", "t=", "t=abc", "garbage"])
def test_unusable_start_stamp_counts_as_no_wait(header) -> None:
    assert parse_start(header, time.time()) == 0.0


def test_start_stamp_in_the_future_or_far_past_is_ignored() -> None:
    now = time.time()
    assert parse_start(f"t={now + 5:.3f}", now) == 0.0
    assert parse_start(f"t={now - 3600:.3f}", now) == 0.0
    assert parse_start(f"t={now - 2:.3f}", now) == pytest.approx(2.0, abs=0.01)


def test_timeout_header_is_validated() -> None:
    assert parse_timeout(None) is None
    assert parse_timeout(" 250 ") == 250
    for bad in ("0", "-5", "abc", "1.5", "600001"):
        with pytest.raises(InvalidRequest) as info:
            parse_timeout(bad)
        assert info.value.field == "X-Request-Timeout-Ms"


def test_expire_sets_the_ort_terminate_flag() -> None:
    deadline = Deadline(10_000)
    assert not deadline.expired and not deadline.run_options.terminate
    deadline.expire()
    assert deadline.expired and deadline.run_options.terminate


def test_a_past_deadline_is_expired() -> None:
    assert Deadline(1, already_waited_s=0.5).expired
