"""Parsing of the human units batchgen's flags and manifests use: durations ("50m"), rates ("5/s") and
the API's base URLs; and the wording every text output shares: a rate controller's state in one line,
counts with their noun ("1 request", "2 requests") and credits ("2,000,020", "12.8").

The parsers raise ValueError with a message that says what is allowed, so callers can turn it into a
ConfigError or a manifest Problem without rewording it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)?\s*$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|min|m|h|d)")


def parse_duration_s(text: str | float | int) -> float:
    """'50m' → 3000.0; '1h30m', '90s', '2.5h' and bare seconds ('45') also work."""
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"duration {text!r} is negative")
        return float(text)
    m = _DURATION_RE.match(text)
    if m:
        return float(m.group(1)) * _DURATION_UNITS_S[m.group(2) or "s"]
    compact = text.replace(" ", "")
    parts = _DURATION_PART_RE.findall(compact)
    if parts and "".join(a + b for a, b in parts) == compact:
        return sum(float(a) * _DURATION_UNITS_S[b] for a, b in parts)
    raise ValueError(f'duration "{text}" is not understood; use e.g. 90s, 50m, 1h30m, 2h')


@dataclass(frozen=True)
class Rate:
    """`max_rate` requests per `period_s` seconds (aiolimiter's AsyncLimiter takes both)."""

    max_rate: float
    period_s: float

    @property
    def per_second(self) -> float:
        return self.max_rate / self.period_s

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(self.period_s)
        count = f"{self.max_rate:g}"
        return f"{count}/{unit}" if unit else f"{count}/{self.period_s:g}s"


_RATE_PERIODS_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
                   "h": 3600.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


def parse_rate(text: str | float | int) -> Rate:
    """'5/s', '300/min', '1000/h'; a bare number means per second."""
    if isinstance(text, int | float):
        value, period = float(text), 1.0
    else:
        m = _RATE_RE.match(text.lower())
        if m and m.group(2) in _RATE_PERIODS_S:
            value, period = float(m.group(1)), _RATE_PERIODS_S[m.group(2)]
        else:
            try:
                value, period = float(text), 1.0
            except ValueError:
                raise ValueError(f'rate "{text}" is not understood; use e.g. 5/s, 300/min, 1000/h') from None
    if value <= 0:
        raise ValueError(f'rate "{text}" must be above zero')
    return Rate(value, period)


def rate_text(rate: Mapping[str, Any]) -> str:
    """A rate controller's snapshot in a few words: "API 47.5/s of 50/s, limit ~48.1/s, 3 x 429"."""
    learned = rate.get("learned_limit")
    limit = f", limit ~{learned:g}/s" if learned is not None else ""
    return f"API {rate['effective_rate']:g}/s of {rate['configured_rate']:g}/s{limit}, {rate.get('throttles', 0)} x 429"


def parse_http_url(text: str) -> str:
    """An API base URL, unchanged if it is http(s)://host[:port][/path]. Anything else would reach the
    HTTP client only when the first call is sent, where it looks like a network fault and is retried for the
    whole patience instead of being reported as the typo it is."""
    allowed = "use e.g. https://api.evolink.ai or http://127.0.0.1:8765"
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValueError(f"{text!r} contains whitespace or a control character; {allowed}")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0-65535
    except ValueError:
        raise ValueError(f"{text!r} is not a valid URL; {allowed}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{text!r} is not an http(s) URL; {allowed}")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host name; {allowed}")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} has a query or fragment ('?' or '#'): the API's paths are appended to "
                         f"the base; {allowed}")
    return text


def plural(count: int, singular: str, plural_form: str | None = None, *, width: int = 0) -> str:
    """'1 request', '0 requests', '2 images'; `plural_form` for nouns that do not just add an s, `width` right-
    aligns the number in tables. JSON keeps bare numbers: this is for text."""
    noun = singular if count == 1 else plural_form or singular + "s"
    return f"{count:>{width}} {noun}"


def credits_text(value: float) -> str:
    """Credits for people: grouped thousands and at most 2 decimals, never an exponent ('1,000,000',
    '2,000,020', '12.8', '0.5'); `:g` printed a balance of a million as '1e+06'."""
    text = f"{value:,.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
