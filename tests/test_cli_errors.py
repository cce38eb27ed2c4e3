"""Bad flags and environment at the command line: a message naming the flag or variable and what is
allowed, exit 2, no traceback, and nothing recorded or sent."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from tests.run_support import prompts, write_job


@pytest.mark.parametrize(("args", "env", "named", "value"), [
    (["--api-base", "notaurl"], {}, "--api-base", "'notaurl' is not an http(s) URL"),
    (["--api-base", "ftp://files.example/v1"], {}, "--api-base", "'ftp://files.example/v1' is not an http(s) URL"),
    ([], {"EVOLINK_API_BASE": "notaurl"}, "EVOLINK_API_BASE", "'notaurl' is not an http(s) URL"),
    (["--files-base", "http://"], {}, "--files-base", "'http://' has no host name"),
    ([], {"EVOLINK_FILES_BASE": "127.0.0.1:8765"}, "EVOLINK_FILES_BASE",
     "'127.0.0.1:8765' is not an http(s) URL"),
    (["--api-base", "http://127.0.0.1:99999"], {}, "--api-base", "'http://127.0.0.1:99999' is not a valid URL"),
])
def test_a_malformed_base_url_is_bad_input_before_anything_is_recorded(
        tmp_path: Path, args: list[str], env: dict[str, str], named: str, value: str) -> None:
    manifest = write_job(tmp_path, prompts(2))
    # A short patience: without the check the run would retry the unusable URL, then stop with exit 3.
    result = CliRunner().invoke(main, ["run", str(manifest), "--patience", "1s", *args],
                                env={"EVOLINK_API_KEY": "sk-test", **env})
    assert result.exit_code == 2, result.output
    assert f"error: {named}: {value}" in result.output
    assert "https://" in result.output  # what is allowed
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.batchgen.db*"))  # nothing recorded, so nothing shows as in flight


def test_the_emulator_on_a_busy_port_is_a_message_like_review() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["emulator", "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: cannot listen on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)}; choose "
                             "another --port (0 picks a free one)\n")
