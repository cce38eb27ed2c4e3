"""The tolerant reading of the API's answers (`api/answers.py`): pure functions, no server needed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from batchgen.api.answers import (
    Credits,
    TaskSnapshot,
    UploadedFile,
    code_str,
    error_fields,
    number,
    parse_time,
    retry_after_s,
)
from batchgen.errors import TransportError


@pytest.mark.parametrize(("value", "expected"), [
    (3, 3.0), (2.5, 2.5), ("45", 45.0), (" 1.5 ", 1.5), (True, None), ("nan", None), (float("inf"), None),
    ("soon", None), (None, None), ([1], None),
])
def test_a_number_is_read_from_whatever_the_server_sent(value: object, expected: float | None) -> None:
    assert number(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-07-01T12:00:00Z", datetime(2026, 7, 1, 12, tzinfo=UTC)),
    ("2026-07-01T14:00:00+02:00", datetime(2026, 7, 1, 12, tzinfo=UTC)),
    ("2026-07-01T12:00:00", datetime(2026, 7, 1, 12, tzinfo=UTC)),  # naive means UTC
    (1782907200, datetime(2026, 7, 1, 12, tzinfo=UTC)),
    ("yesterday", None), ("", None), (True, None),
])
def test_times_are_aware_utc(value: object, expected: datetime | None) -> None:
    assert parse_time(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (429, "429"), ("insufficient_quota", "insufficient_quota"), (40003.0, "40003"), (True, None), ("", None),
    (1.5, None), (None, None),
])
def test_codes_are_always_strings(value: object, expected: str | None) -> None:
    assert code_str(value) == expected


def test_retry_after_reads_seconds_and_refuses_nonsense() -> None:
    assert retry_after_s("0.3") == 0.3
    assert retry_after_s("-5") == 0.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: go now
    assert retry_after_s("later") is None and retry_after_s("inf") is None and retry_after_s(None) is None


def test_error_bodies_of_every_shape_the_servers_send() -> None:
    assert error_fields('{"error":{"code":"invalid_parameter","message":"bad size"}}') == ("invalid_parameter",
                                                                                          "bad size")
    assert error_fields('{"code":40003,"msg":"quota","success":false}') == ("40003", "quota")
    assert error_fields('{"code":401,"error":"Unauthorized"}') == ("401", "Unauthorized")
    assert error_fields("<html>502</html>") == (None, None)
    assert error_fields("[1, 2]") == (None, None)


def test_a_task_is_read_tolerantly_and_always_has_a_code_when_it_failed() -> None:
    done = TaskSnapshot.from_json({"task_id": "t-1", "status": "COMPLETED",
                                   "result_data": [{"image_url": "https://x/1.png"}, {"image_url": 5}]})
    assert (done.id, done.status, done.final, done.progress, done.results) == ("t-1", "completed", True, 100,
                                                                               ("https://x/1.png",))
    failed = TaskSnapshot.from_json({"id": "t-2", "status": "failed", "error": "boom"})
    assert (failed.error_code, failed.error_message) == ("unknown_error", "boom")
    cancelled = TaskSnapshot.from_json({"id": "t-3", "status": "cancelled"})
    assert cancelled.error_code == "request_cancelled"
    running = TaskSnapshot.from_json({"id": "t-4", "progress": "40", "task_info": {"estimated_time": "12"},
                                      "usage": {"credits_reserved": 1.6}})
    assert (running.status, running.final, running.progress, running.estimated_time_s,
            running.credits_reserved) == ("pending", False, 40, 12.0, 1.6)
    with pytest.raises(TransportError, match="without an id"):
        TaskSnapshot.from_json({"status": "completed"})


def test_credits_left_is_the_tighter_of_the_users_and_the_keys() -> None:
    both = Credits.from_json({"data": {"user": {"remaining_credits": 50}, "token": {"remaining_credits": 8,
                                                                                     "used_credits": 2}}})
    assert (both.remaining, both.used, both.unlimited) == (8.0, 2.0, False)
    unlimited = Credits.from_json({"data": {"user": {"remaining_credits": 50, "used_credits": 7},
                                            "token": {"unlimited_credits": True, "remaining_credits": 0}}})
    assert (unlimited.remaining, unlimited.used, unlimited.unlimited) == (50.0, 7.0, True)
    assert Credits.from_json({}).remaining is None


def test_an_upload_without_an_expiry_expires_72_hours_after_it_was_made() -> None:
    up = UploadedFile.from_json({"file_id": "f", "download_url": "https://f/1", "upload_time": "2026-07-01T12:00:00Z",
                                 "file_size": "10"})
    assert up.file_url == "https://f/1" and up.file_size == 10
    assert up.expires_at == datetime(2026, 7, 4, 12, tzinfo=UTC)
    with pytest.raises(TransportError, match="file_id"):
        UploadedFile.from_json({"file_url": "https://f/1"})
