"""Shared test fixtures: every test runs with a clean environment and temporary paths.

Emulator fixtures live in tests/emulator_fixtures.py and are registered here, so any test can ask for an
in-process emulator (`emulator`) or one in its own process (`emulator_process`, for SIGKILL tests).
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.emulator_fixtures", "tests.s3_fixtures"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the developer's key, bases or batchgen settings, and none can reach the real API or a
    real bucket (AWS_* is cleared; the S3 tests set fake credentials of their own)."""
    for name in list(os.environ):
        if name.startswith(("EVOLINK_", "BATCHGEN_", "AWS_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
