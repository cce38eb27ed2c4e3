"""Request parameters and item fields from what a manifest writes: YAML values, CSV cells and matrix values
turned into the request's types, with the bad value and what is allowed when they do not fit.

Called for every cell of every row, so these are plain functions over plain values.
"""

from __future__ import annotations

import json
import re
from typing import Any

from batchgen.manifest.schema import REQUEST_PARAMS

PARAM_SET = frozenset(REQUEST_PARAMS)
_INT_PARAMS = frozenset({"n", "seed"})
TEXT_PARAMS = frozenset({"model", "size", "mask_url", "quality", "resolution"})


def is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def as_text(value: Any) -> str:
    """An item field as text (metadata, template values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def _parse_url_list(value: Any) -> tuple[str, ...]:
    """image_urls from a YAML list or one CSV cell: a JSON list, or entries separated by `|` or newlines."""
    if isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{text[:60]!r} is not a valid JSON list ({error.msg}); write a JSON list "
                                 'like ["a.png", "b.png"] or separate entries with |') from None
            if not isinstance(items, list):
                raise ValueError("must be a list of URLs or paths")
        else:
            items = re.split(r"[|\r\n]+", text)
    else:
        raise ValueError(f"{value!r} is not a list of URLs or paths")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{json.dumps(item, default=str)} is not a URL or path (text expected)")
        if item.strip():
            out.append(item.strip())
    return tuple(out)


def coerce_param(name: str, value: Any) -> Any:
    """A request parameter from an item field, CSV cell or matrix value, in the request's type; ValueError
    with the bad value and what is allowed. The caller has already dropped unset (empty) values."""
    if name == "prompt":
        if isinstance(value, dict | list):
            raise ValueError("must be text")
        return as_text(value)
    if name in _INT_PARAMS:
        if isinstance(value, bool):
            raise ValueError(f"{as_text(value)} is not a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        text = str(value).strip()
        try:
            return int(text)
        except ValueError:
            raise ValueError(f'"{text}" is not a whole number') from None
    if name == "image_urls":
        return _parse_url_list(value)
    if name == "model_params":
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"{value[:60]!r} is not valid JSON ({error.msg}); write a JSON object") from None
            if isinstance(parsed, dict):
                return parsed
        raise ValueError("must be a JSON object of extra parameters")
    # model, size, mask_url, quality, resolution: text
    if isinstance(value, dict | list):
        raise ValueError("must be text, not a list or mapping")
    return as_text(value).strip()
