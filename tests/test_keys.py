"""Where keys come from (EVOLINK_API_KEYS, --keys-file, EVOLINK_API_KEY), how the pool assigns work, and the
store's m006 (key fingerprints on attempts and uploads, the keys table) — issue 15."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import sqlite_utils
from click.testing import CliRunner, Result

from batchgen.cli import main
from batchgen.engine.keyfile import KeySpec, fingerprint, load_keys
from batchgen.engine.keypool import KeyPool, KeyState, PooledKey
from batchgen.engine.ratelimit import AdaptiveLimiter
from batchgen.errors import ConfigError
from batchgen.store.sqlite import NewAttempt, Store, UploadRecord, idempotency_key
from batchgen.store.sqlite_migrations import NAMES, migration_set
from batchgen.units import parse_rate

KEY_A, KEY_B, KEY_C = "sk-evo-secret-aaaa1111", "sk-evo-secret-bbbb2222", "sk-evo-secret-cccc3333"


def keys_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(text)
    os.chmod(path, mode)
    return path


# --- sources ---------------------------------------------------------------------------------------


def test_keys_file_with_labels_rates_comments_and_blank_lines(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"# team keys\n\n{KEY_A} label=team-a rate=10/s\n  {KEY_B}   # no label\n"
                               f"{KEY_C} rate=300/min\n")
    source = load_keys(path)
    assert source is not None and source.warnings == []
    assert [k.key for k in source.keys] == [KEY_A, KEY_B, KEY_C]
    assert [k.label for k in source.keys] == ["team-a", None, None]
    assert source.keys[0].rate == parse_rate("10/s") and source.keys[1].rate is None
    assert source.keys[2].rate is not None and source.keys[2].rate.per_second == 5
    assert source.keys[0].name == "team-a" and source.keys[1].name == fingerprint(KEY_B)
    assert KEY_A not in repr(source.keys[0])


def test_a_keys_file_others_can_read_is_used_with_a_warning(tmp_path: Path) -> None:
    source = load_keys(keys_file(tmp_path, KEY_A + "\n", mode=0o644))
    assert source is not None and len(source.keys) == 1
    assert "can be read by other users" in source.warnings[0] and "chmod 600" in source.warnings[0]


@pytest.mark.parametrize(("text", "expected"), [
    (f"{KEY_A}\n{KEY_B} colour=red\n", "line 2: unknown field colour"),
    (f"{KEY_A} rate=fast\n", "line 1: rate: rate \"fast\" is not understood"),
    (f"{KEY_A} {KEY_B}\n", "line 1: unknown field (text without '=')"),
    (f"{KEY_A} label=a/b\n", "line 1: label: use 1-40 letters"),
    (f"{KEY_A} label=x\n{KEY_B} label=x\n", "line 2: label: x is already used by"),
    (f"{KEY_A}\n# c\n{KEY_A}\n", "line 3: the same key as"),
    ("label=team-a\n", "line 1: the line must start with the key"),
    ("# nothing\n\n", "has no keys"),
    (f"{KEY_A} rate=1/s rate=2/s\n", "line 1: rate is given twice"),
    (f"{KEY_A}\n{KEY_B}\x1b[0m\n", "line 2: the key contains whitespace or a control character"),
])
def test_bad_keys_files_name_file_line_and_field_never_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = keys_file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    message = str(caught.value)
    assert expected in message and str(path) in message
    assert caught.value.exit_code == 2
    for key in (KEY_A, KEY_B):
        assert key not in message


def test_every_bad_line_of_a_keys_file_is_listed_at_once(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"# team keys\n{KEY_A} label=team-a\n{KEY_B} colour=red\n\n"
                               f"{KEY_C} rate=fast label=a/b\nlabel=team-d\n{KEY_A} label=team-a\n")
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: the keys file has 6 problems; nothing was sent:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        f"{path} line {n}" for n in (3, 5, 5, 6, 7, 7)]
    assert "unknown field colour" in lines[1] and "label: use 1-40" in lines[2] and "rate: rate" in lines[3]
    assert "must start with the key" in lines[4] and f"the same key as {path} line 2" in lines[5]
    assert f"label: team-a is already used by {path} line 2" in lines[6]
    assert not any(key in str(caught.value) for key in (KEY_A, KEY_B, KEY_C))


def test_environment_sources_and_their_order(tmp_path: Path) -> None:
    source = load_keys(None, f" {KEY_A}, {KEY_B} ", KEY_C)
    assert source is not None and [k.key for k in source.keys] == [KEY_A, KEY_B]  # EVOLINK_API_KEYS first
    single = load_keys(None, None, KEY_C)
    assert single is not None and [k.key for k in single.keys] == [KEY_C]
    filed = load_keys(keys_file(tmp_path, KEY_B + "\n"), KEY_A, KEY_C)
    assert filed is not None and [k.key for k in filed.keys] == [KEY_B]  # --keys-file wins
    assert load_keys(None, None, None) is None
    with pytest.raises(ConfigError, match="key 2 is empty"):
        load_keys(None, f"{KEY_A},,{KEY_B}")
    with pytest.raises(ConfigError, match="key 2 contains whitespace or a control character"):
        load_keys(None, f"{KEY_A},{KEY_B}\a")
    with pytest.raises(ConfigError, match=r"(?s)has 2 problems.*key 2 is empty.*key 4 contains whitespace"):
        load_keys(None, f"{KEY_A},,{KEY_B},{KEY_C} x")  # every bad key at once
    with pytest.raises(ConfigError, match=r"^EVOLINK_API_KEY contains whitespace or a control character") as caught:
        load_keys(None, None, f"{KEY_A}\n{KEY_B}\n")  # the same rule for the single key
    assert KEY_A not in str(caught.value) and KEY_B not in str(caught.value)
    with pytest.raises(ConfigError, match="key 2: the same key as EVOLINK_API_KEYS: key 1"):
        load_keys(None, f"{KEY_A},{KEY_A}")


def run_with_keys_file(tmp_path: Path, text: str) -> tuple[Path, Result]:
    """`batchgen run` of a one-row job with this keys file: (the file, the CLI's result)."""
    manifest = tmp_path / "job.csv"
    manifest.write_text("prompt\na cat\n")
    path = keys_file(tmp_path, text)
    return path, CliRunner().invoke(main, ["run", str(manifest), "--keys-file", str(path)])


def test_cli_bad_keys_file_is_exit_2_without_traceback_or_key(tmp_path: Path) -> None:
    _, result = run_with_keys_file(tmp_path, f"{KEY_A} label=ok\n{KEY_B} rate=zero\n")
    assert result.exit_code == 2, result.output
    assert "line 2: rate" in result.output and "Traceback" not in result.output
    assert KEY_A not in result.output and KEY_B not in result.output
    assert not (tmp_path / "job.batchgen.db").exists()  # nothing was opened or changed


def test_cli_lists_every_bad_line_of_a_keys_file(tmp_path: Path) -> None:
    path, result = run_with_keys_file(tmp_path, f"{KEY_A} rate=zero\n{KEY_B}\n{KEY_C} label=x y\n")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {path}: the keys file has 2 problems; nothing was sent:\n")
    assert f"  {path} line 1: rate" in result.output and f"  {path} line 3: unknown field" in result.output
    assert "line 2" not in result.output and "Traceback" not in result.output
    assert KEY_A not in result.output and KEY_B not in result.output
    assert not (tmp_path / "job.batchgen.db").exists()  # nothing was opened or changed


# --- the pool ----------------------------------------------------------------------------------------


def pool_of(*rates: float, balances: tuple[float | None, ...] = ()) -> KeyPool:
    keys = []
    for i, rate in enumerate(rates):
        spec = KeySpec(f"sk-evo-pool-{i:04d}-secret", label=f"k{i}")
        key = PooledKey(spec, client=None, limiter=AdaptiveLimiter(parse_rate(rate)))  # type: ignore[arg-type]
        key.balance = balances[i] if i < len(balances) else None
        keys.append(key)
    return KeyPool(keys)


async def test_assignment_follows_the_keys_rates() -> None:
    pool = pool_of(10, 5, 5)
    now = asyncio.get_running_loop().time()
    picked = [pool.pick(1.0, now).name for _ in range(400)]  # type: ignore[union-attr]
    assert picked.count("k0") == 200 and picked.count("k1") == 100 and picked.count("k2") == 100


async def test_assignment_respects_balances_and_skips_keys_that_left() -> None:
    pool = pool_of(5, 5, 5, balances=(2.0, None, 100.0))
    now = asyncio.get_running_loop().time()
    first = [pool.pick(1.0, now).name for _ in range(30)]  # type: ignore[union-attr]
    assert first.count("k0") == 2  # its balance covers two
    assert pool.fail(pool.keys[1], KeyState.REVOKED, "revoked") is True
    assert pool.fail(pool.keys[1], KeyState.OUT_OF_CREDITS, "later") is False  # revoked stays revoked
    rest = {pool.pick(1.0, now).name for _ in range(10)}  # type: ignore[union-attr]
    assert rest == {"k2"}
    pool.fail(pool.keys[2], KeyState.OUT_OF_CREDITS, "402")
    assert pool.pick(1.0, now) is None  # k0 is still active, but its balance is used up
    assert [k.name for k in pool.active] == ["k0"]
    assert pool.keys[2].can_poll and not pool.keys[1].can_poll


def test_one_key_pool_owns_attempts_from_before_fingerprints() -> None:
    single = pool_of(5)
    assert single.single and single.get(None) is single.keys[0]
    assert pool_of(5, 5).get(None) is None
    assert single.get("0" * 12) is None


# --- the store -----------------------------------------------------------------------------------------


def test_m006_upgrade_keeps_data_and_records_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    migration_set().apply(db, stop_before="m006_key_fingerprints")
    db.execute("INSERT INTO requests (key, item_id, params, model) VALUES ('k1', 'i1', '{}', 'z-image-turbo')")
    db.execute("INSERT INTO uploads (file_id, sha256, file_url, expires_at, uploaded_at) "
               "VALUES ('f-old', 'abc', 'http://x/f-old', 1e12, 1)")
    db.conn.commit()
    before = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.close()
    fp = fingerprint(KEY_A)
    with Store(path) as store:
        assert "m006_key_fingerprints" in store.applied_migrations()
        assert store.schema_version() == len(NAMES) > before  # m006 and every later step
        # One key (legacy=True) owns the upload made before fingerprints; a pool's key does not.
        old = store.uploads.current("abc", fp)
        assert old is not None and old.file_id == "f-old"
        assert store.uploads.current("abc", fp, legacy=False) is None
        store.uploads.record(UploadRecord("f-new", "abc", "http://x/f-new", 1e12, 1, "image/png", None, 2,
                                         key_fp=fp))
        assert store.uploads.current("abc", fingerprint(KEY_B), legacy=False) is None
        assert [u.file_id for u in store.uploads.live(fp, legacy=False)] == ["f-new"]
        ids = store.start_attempts([NewAttempt("k1", 1, "z-image-turbo", 0.5, key_fp=fp, scoped=True)])
        rows = store.open_attempts()
        assert rows[0][1].key_fp == fp and rows[0][1].id == ids[0]
        assert rows[0][1].idempotency_key == idempotency_key("k1", 1, store.store_id, fp)
        assert fp in rows[0][1].idempotency_key
        store.key_states.record(fp, "team-a", "active", balance=12.5)
        store.key_states.record(fp, "team-a", "revoked", "Invalid API key")
        usage = store.key_states.usage()
        assert usage == [{"fingerprint": fp, "label": "team-a", "state": "revoked", "reason": "Invalid API key",
                          "balance": 12.5, "requests": 1, "credits_used": 0.0, "credits_reserved": 0.5,
                          "open": 1}]


def test_one_key_keeps_the_idempotency_key_format(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.conn.execute("INSERT INTO requests (key, item_id, params, model) VALUES ('k1', 'i1', '{}', 'm')")
        store.start_attempts([NewAttempt("k1", 1, "m", 0.5, key_fp=fingerprint(KEY_A), scoped=False)])
        att = store.open_attempts()
        assert att == [] or att[0][1].idempotency_key == f"bg1-{store.store_id}-k1-a1"
        key = store.conn.execute("SELECT idempotency_key FROM attempts").fetchone()[0]
        assert key == f"bg1-{store.store_id}-k1-a1"
