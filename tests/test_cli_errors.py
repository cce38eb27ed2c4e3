"""Bad flags and environment at the command line: a message naming the flag or variable and what is
allowed, exit 2, no traceback, and nothing recorded or sent."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from tests.emulator_fixtures import EmulatorProcess
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


SECRET = "sk-evo-secret-aaaa1111"


@pytest.mark.parametrize(("env", "named"), [
    ({"EVOLINK_API_KEY": f"{SECRET}\n{SECRET}"}, "EVOLINK_API_KEY contains whitespace or a control character"),
    ({"EVOLINK_API_KEY": f"{SECRET} {SECRET}"}, "EVOLINK_API_KEY contains whitespace or a control character"),
    ({"EVOLINK_API_KEY": f"{SECRET}\x1b"}, "EVOLINK_API_KEY contains whitespace or a control character"),
    ({"EVOLINK_API_KEY": "  "}, "EVOLINK_API_KEY is empty"),
    ({"EVOLINK_API_KEYS": f"{SECRET},x\ny"}, "EVOLINK_API_KEYS: key 2 contains whitespace or a control"),
])
def test_an_unusable_api_key_is_bad_input_that_never_shows_the_key(
        tmp_path: Path, env: dict[str, str], named: str, emulator_process: Callable[..., EmulatorProcess]) -> None:
    manifest = write_job(tmp_path, prompts(2))
    # A live server: without the check, a line break in the key fails in aiohttp as the first call is built.
    base = emulator_process().base_url
    result = CliRunner().invoke(main, ["run", str(manifest), "--api-base", base, "--files-base", base,
                                       "--patience", "1s"], env=env)
    assert result.exit_code == 2, result.output
    assert f"error: {named}" in result.output and "Traceback" not in result.output
    assert SECRET not in result.output and "x\ny" not in result.output
    assert not list(tmp_path.glob("*.batchgen.db*"))


def test_the_emulator_refuses_an_api_key_no_client_could_send() -> None:
    with socket.socket() as busy:  # checked before it listens; were it not, this ends the test, not Ctrl-C
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = CliRunner().invoke(main, ["emulator", "--port", port, "--api-key", "ok", "--api-key", f"{SECRET}\n"])
    assert result.exit_code == 2, result.output
    assert result.output == ("error: --api-key: key 2 contains whitespace or a control character (a line break "
                             "pasted with it?)\n")
