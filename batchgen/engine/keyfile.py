"""Where a run's API keys come from: `--keys-file`, `EVOLINK_API_KEYS` or `EVOLINK_API_KEY` (issue 15).

One key has always come from `EVOLINK_API_KEY`; that keeps working exactly as before. A team with several
keys (several accounts or projects) lists them either comma-separated in `EVOLINK_API_KEYS`, or one a line
in a keys file, where each key may carry a label (shown instead of its fingerprint in warnings, events and
`batchgen status`) and its own rate::

    # team keys; '#' starts a comment, blank lines are fine
    sk-evo-aaaa...  label=team-a rate=10/s
    sk-evo-bbbb...  label=team-b
    sk-evo-cccc...

The first of `--keys-file`, `EVOLINK_API_KEYS`, `EVOLINK_API_KEY` that is given is used. A key is a secret:
mistakes (all of them at once) name the file, the line and the field, and never echo a key; a keys file
that its group or others can read earns a warning (it is not refused: the user may have reasons, e.g. a
shared group).

A key's identity anywhere batchgen writes (store, events, status) is its fingerprint — the first 12 hex
digits of its sha256 — with the label beside it for people. The fingerprint, not the label, ties an
attempt to a key, so renaming a label between runs loses nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from batchgen.errors import ConfigError
from batchgen.units import Rate, parse_rate

KEYS_ENV = "EVOLINK_API_KEYS"
KEY_ENV = "EVOLINK_API_KEY"
_LABEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
_OPTIONS = ("label", "rate")


def key_problem(key: str) -> str | None:
    """What makes `key` unusable, or None: one rule for every source of keys. A key travels in an HTTP header,
    where a line break (a key pasted with its newline) or another control character is refused only when the
    first call is built; spaces cannot be part of a key either. The answer never contains the key."""
    if not key:
        return "is empty"
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        return "contains whitespace or a control character (a line break pasted with it?)"
    return None


def fingerprint(key: str) -> str:
    """The first 12 hex digits of the key's sha256: names a key without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class KeySpec:
    """One API key of a run, with what the keys file said about it."""

    key: str = field(repr=False)
    label: str | None = None
    rate: Rate | None = None  # None: the run's --rate / run.rate

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    @property
    def name(self) -> str:
        """What messages call the key: its label, else its fingerprint."""
        return self.label or self.fingerprint


@dataclass(frozen=True)
class KeySource:
    keys: list[KeySpec]
    warnings: list[str]
    origin: str  # "--keys-file PATH", EVOLINK_API_KEYS or EVOLINK_API_KEY


def load_keys(keys_file: Path | None = None, keys_env: str | None = None,
              key_env: str | None = None) -> KeySource | None:
    """The keys of a run, from the first source given (None when there is none); ConfigError (exit 2)
    names the source, line and field of a mistake, never a key."""
    if keys_file is not None:
        return _from_file(Path(keys_file))
    if keys_env is not None and keys_env.strip():
        keys = [part.strip() for part in keys_env.split(",")]
        problems = []
        for pos, key in enumerate(keys, start=1):
            problem = key_problem(key)
            if problem is not None:
                hint = "keys are comma-separated" if key else "separate keys with single commas"
                problems.append(f"{KEYS_ENV}: key {pos} {problem}; {hint}")
        if not problems:
            problems = _duplicates([(f"{KEYS_ENV}: key {pos}", KeySpec(k)) for pos, k in enumerate(keys, start=1)])
        _raise_all(problems, KEYS_ENV)
        return KeySource([KeySpec(k) for k in keys], [], KEYS_ENV)
    if key_env:
        problem = key_problem(key_env.strip())
        if problem is not None:
            raise ConfigError(f"{KEY_ENV} {problem}; set it to the key alone (several keys: {KEYS_ENV})")
        return KeySource([KeySpec(key_env.strip())], [], KEY_ENV)
    return None


def _from_file(path: Path) -> KeySource:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the keys file: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the keys file is not UTF-8 text") from None
    warnings = []
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(f"{path} can be read by other users (mode {stat.S_IMODE(mode):o}); it holds API keys: "
                        f"chmod 600 {path}")
    # Every bad line is reported at once (like a manifest's problems): a file is fixed in one go, not one
    # line per run.
    problems: list[str] = []
    entries: list[tuple[str, KeySpec]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            where = f"{path} line {number}"
            spec = _parse_line(line, where, problems)
            if spec is not None:
                entries.append((where, spec))
    if not entries and not problems:
        raise ConfigError(f"{path}: the keys file has no keys (one key a line, '#' for comments)")
    problems += _duplicates(entries)
    _raise_all(problems, f"{path}: the keys file")
    return KeySource([spec for _, spec in entries], warnings, f"--keys-file {path}")


def _parse_line(line: str, where: str, problems: list[str]) -> KeySpec | None:
    """One line's key and options, or None after adding what is wrong with it to `problems`."""
    key, *options = line.split()
    if "=" in key:
        problems.append(f"{where}: the line must start with the key; found an option ({key.split('=')[0]}=) first")
        return None
    found = len(problems)
    problem = key_problem(key)
    if problem is not None:
        problems.append(f"{where}: the key {problem}")
    values: dict[str, str] = {}
    for option in options:
        name, eq, value = option.partition("=")
        if not eq or name not in _OPTIONS:
            shown = name if eq else "(text without '=')"
            problems.append(f"{where}: unknown field {shown}; after the key only label=NAME and rate=N/s (or "
                            "N/min) are allowed")
        elif name in values:
            problems.append(f"{where}: {name} is given twice")
        else:
            values[name] = value
    label = values.get("label")
    if label is not None and not _LABEL_RE.match(label):
        problems.append(f"{where}: label: use 1-40 letters, digits, '.', '_' or '-'")
    rate = None
    if "rate" in values:
        try:
            rate = parse_rate(values["rate"])
        except ValueError as error:
            problems.append(f"{where}: rate: {error}")
    return KeySpec(key, label, rate) if len(problems) == found else None


def _duplicates(entries: list[tuple[str, KeySpec]]) -> list[str]:
    problems = []
    seen_keys: dict[str, str] = {}
    seen_labels: dict[str, str] = {}
    for where, spec in entries:
        if spec.key in seen_keys:
            problems.append(f"{where}: the same key as {seen_keys[spec.key]}")
        else:
            seen_keys[spec.key] = where
        if spec.label is not None:
            if spec.label in seen_labels:
                problems.append(f"{where}: label: {spec.label} is already used by {seen_labels[spec.label]}")
            else:
                seen_labels[spec.label] = where
    return problems


def _raise_all(problems: list[str], source: str) -> None:
    """One problem is the message; several are listed under one line that counts them (exit 2)."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{source} has {len(problems)} problems; nothing was sent:\n"
                          + "\n".join(f"  {problem}" for problem in problems))


def environ_keys() -> tuple[str | None, str | None]:
    """(EVOLINK_API_KEYS, EVOLINK_API_KEY) from the environment."""
    return os.environ.get(KEYS_ENV) or None, os.environ.get(KEY_ENV) or None
