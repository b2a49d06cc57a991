"""When to retry and how long to wait: pure functions."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from fusion_cli.llm.retry import RetryPolicy, parse_retry_after, retryable_status


@pytest.mark.parametrize("value, expected", [("1", 1.0), ("0", 0.0), (" 2.5 ", 2.5), ("-3", 0.0)])
def test_retry_after_in_seconds(value, expected):
    assert parse_retry_after(value, now=0.0) == expected


def test_retry_after_as_an_http_date():
    assert parse_retry_after(formatdate(1000, usegmt=True), now=990.0) == 10.0
    assert parse_retry_after(formatdate(1000, usegmt=True), now=2000.0) == 0.0  # already past


@pytest.mark.parametrize("value", [None, "", "soon", "nan"])
def test_unreadable_retry_after_is_ignored(value):
    assert parse_retry_after(value, now=0.0) is None


def test_backoff_grows_with_full_jitter_and_stays_under_its_cap():
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0)
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        waits = [policy.backoff(retry) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered


@pytest.mark.parametrize("status, retry", [(429, True), (500, True), (502, True), (529, True),
                                           (400, False), (401, False), (404, False), (422, False)])
def test_which_statuses_are_retried(status, retry):
    assert retryable_status(status) is retry
