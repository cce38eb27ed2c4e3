"""Problems in the manifest's words: the capped list a manifest's problems are collected in, and the
translations of pydantic, GenerationRequest and catalogue errors into (place, field, message).

A user fixes a manifest in one pass only if every mistake is listed with its place and in the terms of the
manifest (its keys, its values), not those of the models underneath; past the cap, problems are counted.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, ValidationError

from batchgen import catalog
from batchgen.errors import ManifestError, Problem
from batchgen.manifest.schema import ManifestSchema
from batchgen.manifest.yamlsource import at, existing_depth, node_line
from batchgen.models import GenerationRequest

if TYPE_CHECKING:
    import yaml

MAX_PROBLEMS = 50


class Problems:
    """A capped list of problems with a count of the ones beyond the cap."""

    def __init__(self, cap: int = MAX_PROBLEMS) -> None:
        self.cap = cap
        self.items: list[Problem] = []
        self.rest = 0

    def add(self, file: str, location: str | None, field_name: str | None, message: str) -> None:
        if len(self.items) < self.cap:
            self.items.append(Problem(file, location, field_name, message))
        else:
            self.rest += 1

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise ManifestError(list(self.items), truncated=self.rest)


def pydantic_problems(error: ValidationError, file: str, root: yaml.Node | None, problems: Problems,
                      prefix: tuple[Any, ...] = (), schema: type[BaseModel] = ManifestSchema) -> None:
    """Record the errors of `error` as problems, in file order; `schema` is the model the document was
    validated against (a manifest by default; the emulator's scenario files use it too), for the keys an
    'unknown key' message lists.

    A value that fits no branch of a union (a matrix value that is a list, say) fails once per branch, each
    error under a location with the branch's name appended (`matrix.style.0.str`, `...int`); those are one
    mistake, so they become one problem at the value's real place, naming every type it could have been."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for err in error.errors():
        loc = prefix + tuple(err["loc"])
        place = loc[:existing_depth(root, loc)]
        key = place if err["type"] != "missing" and len(place) < len(loc) else loc
        groups.setdefault(key, []).append(err)
    found: list[tuple[int, tuple[Any, ...], str]] = []
    for place, errs in groups.items():
        if len(errs) > 1 and all(len(prefix) + len(e["loc"]) > len(place) for e in errs):
            found.append((node_line(root, place) or 0, place, _words(errs, place, schema)))
        else:
            for err in errs:
                loc = prefix + tuple(err["loc"])
                found.append((node_line(root, loc) or 0, loc, _words([err], loc, schema)))
    for line, loc, message in sorted(found, key=lambda f: f[0]):  # in file order, as the user reads them
        problems.add(file, at(line or None), ".".join(str(x) for x in loc) or None, message)


# What a pydantic type error expected, in the manifest's words.
_EXPECTED: dict[str, str] = {
    "string_type": "text",
    "int_type": "a whole number", "int_parsing": "a whole number", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "dict_type": "a mapping (key: value)",
    "list_type": "a list", "tuple_type": "a list",
}
# What a value at these places must be, where the type alone says too little (None: any key or index).
_SHAPES: dict[tuple[Any, ...], str] = {
    ("matrix",): "a mapping of parameter or field name to a list of values (style: [studio, lifestyle])",
    ("matrix", None): "a list of values ([a, b])",
    ("matrix", None, None): "one value: text, a number or true/false",
    ("items",): "a list of items, each a mapping of fields (- {id: a, prompt: ...})",
}
_RANGES: dict[str, str] = {"greater_than_equal": "at least {ge}", "greater_than": "more than {gt}",
                           "less_than_equal": "at most {le}", "less_than": "less than {lt}"}


def _words(errs: list[Any], loc: tuple[Any, ...], schema: type[BaseModel]) -> str:
    """One problem's message from its pydantic errors (several for a value no branch of a union takes)."""
    err = errs[0]
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _allowed_keys(schema, loc[:-1])
        return "unknown key" + (f"; allowed keys: {', '.join(parent)}" if parent else "")
    if kind == "missing":
        return "is required"
    expected = [_expected(e["type"], loc, schema) for e in errs]
    if all(expected):
        shape = next((v for k, v in _SHAPES.items() if len(k) == len(loc) and all(
            a is None or a == b for a, b in zip(k, loc, strict=True))), None)
        message = f"expected {shape or _one_of(list(dict.fromkeys(x for x in expected if x)))}, got {_got(value)}"
        if kind == "string_type" and isinstance(value, int | float):
            message += " (put it in quotes if it is meant as text)"
        return message
    if kind in ("literal_error", "enum"):
        return f"{_shown(value)} is not allowed; use {ctx.get('expected', 'one of the listed values')}"
    if kind in _RANGES:
        bound = _RANGES[kind].format(**{k: _number(v) for k, v in ctx.items()})
        return f"{_shown(value)} is too {'small' if kind.startswith('greater') else 'large'}; use {bound}"
    if kind == "too_long" and "max_length" in ctx:
        return f"has {ctx.get('actual_length', 'too many')} entries; at most {ctx['max_length']} are allowed"
    message = err["msg"].removeprefix("Value error, ")
    return f"{_shown(value)} is not allowed: {message[0].lower()}{message[1:]}"


def _expected(kind: str, loc: tuple[Any, ...], schema: type[BaseModel]) -> str | None:
    if kind in ("model_type", "model_attributes_type"):
        keys = _allowed_keys(schema, loc)
        return f"a mapping (keys: {', '.join(keys)})" if keys else "a mapping (key: value)"
    return _EXPECTED.get(kind)


def _one_of(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _shown(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it (JSON, near enough to YAML's flow style), cut short."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _got(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {_shown(value)}"
    if isinstance(value, str):
        return f"the text {_shown(value)}"
    if isinstance(value, list | tuple):
        return f"a list: {_shown(value)}"
    if isinstance(value, dict):
        return f"a mapping: {_shown(value)}"
    return _shown(value)


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _allowed_keys(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` may have, for 'unknown key' messages: the fields of the model found by
    following `loc` through `schema`'s annotations (a list's items by index); none where `loc` leads to no
    model (a free mapping such as the matrix)."""
    kind: Any = schema
    for part in loc:
        model = _model_in(kind)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            kind = model.model_fields[part].annotation
        elif isinstance(part, int) and (items := [a for a in get_args(kind) if a is not type(None)]):
            kind = items[0]
        else:
            return []
    model = _model_in(kind)
    return list(model.model_fields) if model else []


def _model_in(kind: Any) -> type[BaseModel] | None:
    """The pydantic model a field's annotation is (or holds, as `Model | None`), else None."""
    for candidate in (kind, *get_args(kind)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def explain(err: Any, n_images: int) -> tuple[str | None, str]:
    """A GenerationRequest field error as (field, message) in the manifest's words."""
    name = str(err["loc"][0])
    if name == "image_urls":
        return name, f"{n_images} reference images; at most {catalog.MAX_IMAGE_URLS} are allowed"
    if name == "n":
        return name, f"{err['input']} is out of range; use {catalog.MIN_N} to {catalog.MAX_N}"
    return name, _words([err], tuple(err["loc"]), GenerationRequest)


def in_manifest_words(name: str, message: str) -> tuple[str, str]:
    """A catalogue problem under its field: 'size "9:7" is not accepted ...' reads 'size: "9:7" is not ...'."""
    rest = message.removeprefix(name + " ")
    return name, rest if rest.startswith('"') else message


def locations(places: list[tuple[str, str]], limit: int = 5) -> str:
    """'rows 3, 17' / 'line 4' from [(file, 'row 3'), (file, 'row 17')]."""
    locs = [loc for _, loc in places if loc]
    if not locs:
        return places[0][0] if places else ""
    kind = locs[0].split(" ")[0]
    nums = [loc.split(" ", 1)[1] for loc in locs]
    shown = ", ".join(nums[:limit]) + (f" and {len(nums) - limit} more" if len(nums) > limit else "")
    return f"{kind}s {shown}" if len(nums) > 1 else f"{kind} {shown}"
