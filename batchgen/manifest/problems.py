"""Problems in the manifest's words: the capped list a manifest's problems are collected in, and the
translations of pydantic, GenerationRequest and catalogue errors into (place, field, message).

A user fixes a manifest in one pass only if every mistake is listed with its place and in the terms of the
manifest (its keys, its values), not those of the models underneath; past the cap, problems are counted.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from batchgen import catalog
from batchgen.errors import ManifestError, Problem
from batchgen.manifest.schema import ManifestSchema
from batchgen.manifest.yamlsource import at, node_line
from batchgen.models import OutputSettings, QualitySettings, RunSettings

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
                      prefix: tuple[Any, ...] = ()) -> None:
    """Record the errors of `error` as problems, in file order."""
    def line_of(err: Any) -> int:
        return node_line(root, prefix + tuple(err["loc"])) or 0

    for err in sorted(error.errors(), key=line_of):  # in file order, as the user reads them
        loc = prefix + tuple(err["loc"])
        dotted = ".".join(str(x) for x in loc) or None
        if err["type"] == "extra_forbidden":
            parent = _allowed_keys(prefix + tuple(err["loc"][:-1]))
            allowed = f"; allowed keys: {', '.join(parent)}" if parent else ""
            message = f"unknown key{allowed}"
        else:
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict | list):
                message = f"{json.dumps(err['input'], default=str)} is not allowed: {message[0].lower()}{message[1:]}"
        problems.add(file, at(node_line(root, loc)), dotted, message)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` may have, for 'unknown key' messages."""
    from batchgen.manifest.schema import RequestDefaults

    models: dict[tuple[Any, ...], type[BaseModel]] = {(): ManifestSchema, ("defaults",): RequestDefaults,
                                                      ("output",): OutputSettings, ("run",): RunSettings,
                                                      ("quality",): QualitySettings}
    model = models.get(loc)
    return list(model.model_fields) if model else []


def explain(err: Any, n_images: int) -> tuple[str | None, str]:
    """A GenerationRequest field error as (field, message) in the manifest's words."""
    name = str(err["loc"][0])
    if name == "image_urls":
        return name, f"{n_images} reference images; at most {catalog.MAX_IMAGE_URLS} are allowed"
    if name == "n":
        return name, f"{err['input']} is out of range; use {catalog.MIN_N} to {catalog.MAX_N}"
    message: str = err["msg"].removeprefix("Value error, ")
    return name, f"{json.dumps(err.get('input'), default=str)} is not allowed: {message}"


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
