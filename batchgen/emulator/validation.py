"""Validation of a generation request, answered the way the API answers: 400 with its error body.

The rules themselves are `GenerationRequest`'s and the catalogue's (one place for each rule); this module
only picks out the request's known fields (the API ignores unknown ones) and names the offending
parameter in the error body.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from batchgen import catalog
from batchgen.models import GenerationRequest

_FIELDS = frozenset(GenerationRequest.model_fields)


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None, fallback_suggestion: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.fallback_suggestion = fallback_suggestion


def parse_generation(body: Any) -> GenerationRequest:
    """The request a JSON body asks for, or InvalidRequest saying which parameter is wrong and why."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", None)
    if "prompt" not in body:
        raise InvalidRequest("prompt is required.", "prompt")
    # null means "the default" for the optional fields, as in the reference's table.
    fields = {k: v for k, v in body.items() if k in _FIELDS and not (v is None and k != "prompt")}
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else _catalog_param(fields)
        message = first["msg"].removeprefix("Value error, ")
        suggestion = catalog.DEFAULT_MODEL if param == "model" else None
        raise InvalidRequest(f"{param}: {message}" if first["loc"] else message, param, suggestion) from None


def _catalog_param(fields: dict[str, Any]) -> str | None:
    """Which parameter a catalogue rule (checked across fields in GenerationRequest) rejected."""
    info = catalog.get(fields.get("model", catalog.DEFAULT_MODEL))
    if info is None:
        return "model"
    if not str(fields.get("prompt", "")).strip():
        return "prompt"
    if fields.get("size") is not None and not info.accepts_size(fields["size"]):
        return "size"
    if fields.get("mask_url") is not None and not info.supports_mask:
        return "mask_url"
    return "image_urls"
