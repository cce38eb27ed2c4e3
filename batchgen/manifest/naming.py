"""Templates: the `{field}` strings that become prompts and output file names.

One small template language serves both, so a user learns it once: `{name}` inserts a field, `{{` and `}}`
are literal braces, and nothing else is allowed — no attribute or index access (`{a.b}`, `{a[0]}`), no
conversions or format specs — because templates are filled from CSV cells that nobody vetted, and
`str.format` with those features can reach into Python objects.

File names get one more guarantee: `image_relpath()` returns a relative POSIX path that stays inside the
output folder, or raises ValueError. Field values are untrusted, so a `/` (or `\\`, `:` and other characters
that mean something to a file system) inside a value is replaced by `_` — only the template's own `/` makes
sub-folders — and a result that would still escape (absolute, `..`, empty segments, control characters) is
refused rather than repaired. The manifest checks every name up front with this function and the downloader
names files with it, so the two always agree.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

# Characters a field value may not bring into a file name: separators, Windows-reserved characters,
# and control characters (NUL, newline, ...). Each becomes "_".
_UNSAFE_IN_VALUE = '/\\:*?"<>|' + "".join(chr(c) for c in range(32)) + "\x7f"
_VALUE_TABLE = str.maketrans({c: "_" for c in _UNSAFE_IN_VALUE})
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# Leaves room for the extension the downloader appends, within the common 255-byte limit per segment.
MAX_SEGMENT_BYTES = 200
MAX_PATH_CHARS = 1024

# Fields every file-name template can use besides the item's own fields and matrix variables.
BUILTIN_FIELDS: tuple[str, ...] = ("id", "variant", "model", "key", "index")
# Fields every prompt template can use besides the item's own fields and matrix variables (the item id).
PROMPT_BUILTIN_FIELDS: tuple[str, ...] = ("id",)


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and field names, alternating (`parts[i]` is literal for even i)."""

    source: str
    parts: tuple[str, ...]
    fields: tuple[str, ...]

    def render(self, values: Mapping[str, str]) -> str:
        """Fill the template; KeyError(name) for a field `values` lacks."""
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(values[parts[i]])
            out.append(parts[i + 1])
        return "".join(out)


@functools.lru_cache(maxsize=256)
def compile_template(text: str) -> Template:
    """Parse a template once; ValueError says what is wrong and what is allowed."""
    parts: list[str] = []
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:
        raise ValueError(f'template "{text}" is malformed ({error}); write {{field}} for a field and '
                         "{{ or }} for a literal brace") from None
    literal = ""
    for lit, name, spec, conversion in parsed:
        literal += lit
        if name is None:
            continue
        if not name or not name.isidentifier() or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f'template "{text}" has {shown}; only plain {{field}} names are allowed '
                             "(no attribute, index, conversion or format spec)")
        parts.append(literal)
        parts.append(name)
        fields.append(name)
        literal = ""
    parts.append(literal)
    return Template(source=text, parts=tuple(parts), fields=tuple(dict.fromkeys(fields)))


def sanitize_value(value: str) -> str:
    """A field value made safe to sit inside one path segment (it can no longer add a `/`)."""
    return value.translate(_VALUE_TABLE)


# Anything check_relpath might object to; a path without any of it (the usual case) needs no further look.
_SUSPECT_RE = re.compile(r"^$|^/|/$|//|^[A-Za-z]:|(?:^|/)\.\.?(?:/|$)|[\x00-\x1f\x7f\\]|^ | $| /|/ ")


def check_relpath(path: str) -> str:
    """Return `path` if it is a safe relative POSIX path inside the output folder, else raise ValueError."""
    if len(path) <= MAX_SEGMENT_BYTES // 4 and not _SUSPECT_RE.search(path):
        return path  # short (no segment can be too long in UTF-8) and nothing suspect
    return _check_relpath_slow(path)


def _check_relpath_slow(path: str) -> str:
    if not path:
        raise ValueError("the file name is empty")
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"the file name is {len(path)} characters long; at most {MAX_PATH_CHARS} are allowed")
    if path.startswith("/") or _DRIVE_RE.match(path):
        raise ValueError(f'"{path}" is an absolute path; file names must stay inside the output folder')
    if "\\" in path:
        raise ValueError(f'"{path}" contains a backslash; use / for sub-folders')
    if _CONTROL_RE.search(path):
        raise ValueError(f"{path!r} contains a control character")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            what = "an empty folder name" if not segment else f'a "{segment}" segment'
            raise ValueError(f'"{path}" has {what}; file names must stay inside the output folder')
        if segment != segment.strip():
            raise ValueError(f'"{path}" has a folder or file name that starts or ends with a space')
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise ValueError(f'"{segment[:40]}..." is longer than {MAX_SEGMENT_BYTES} bytes')
    return path


def variant_text(variant: Mapping[str, str]) -> str:
    """`{variant}`: each matrix value preceded by `_`, in the order of the variable names, not of the
    manifest's matrix: a request's variant comes back from the store with its keys sorted, and the names
    planned at expansion must be the ones written at download."""
    return "".join("_" + variant[k] for k in sorted(variant))


def template_values(
    *, item_id: str, variant: Mapping[str, str], metadata: Mapping[str, str], model: str, key: str, index: int
) -> dict[str, str]:
    """The sanitised fields a file-name template can use; built-ins win over item fields of the same name."""
    values = {k: sanitize_value(v) for k, v in metadata.items()}
    for k, v in variant.items():
        values[k] = sanitize_value(v)
    values["id"] = sanitize_value(item_id)
    values["variant"] = sanitize_value(variant_text(variant))
    values["model"] = sanitize_value(model)
    values["key"] = key
    values["index"] = str(index)
    return values


def image_relpath(
    template: str,
    *,
    item_id: str,
    variant: Mapping[str, str],
    metadata: Mapping[str, str],
    model: str,
    key: str,
    index: int,
) -> str:
    """The output path of image `index` (1-based) of a request, relative to the output folder, without an
    extension (the downloader appends the real image type). ValueError if it would leave the folder or a
    field is missing."""
    values = template_values(item_id=item_id, variant=variant, metadata=metadata, model=model, key=key,
                             index=index)
    return _render_path(compile_template(template), values)


def _render_path(tpl: Template, values: Mapping[str, str]) -> str:
    try:
        path = tpl.render(values)
    except KeyError as error:
        name = error.args[0]
        raise ValueError(f"file name template uses {{{name}}}, which this item does not have; "
                         f"available: {', '.join(sorted(values))}") from None
    return check_relpath(path)


def check_filename_template(template: str) -> Template:
    """Static checks of a file-name template (syntax, and a literal part that escapes on its own, such as
    "/abs/{id}" or "../{id}"); values are checked per request by image_relpath."""
    tpl = compile_template(template)
    if not tpl.fields:
        raise ValueError(f'file name template "{template}" has no {{field}}: every image would get the '
                         "same name; use e.g. {id}{variant}_{index}")
    check_relpath(tpl.render(dict.fromkeys(tpl.fields, "x")))
    return tpl


class NameRenderer:
    """`image_relpath` for many requests with one template: the same rules and result, with the template
    parsed once and the item's fields sanitised once for all of its images. For the manifest's hot loop."""

    def __init__(self, template: str) -> None:
        self.template = compile_template(template)

    def paths(
        self, *, item_id: str, variant: Mapping[str, str], metadata: Mapping[str, str], model: str, key: str,
        n: int,
    ) -> list[str]:
        """The paths of images 1..n, exactly as image_relpath gives them one by one (tested), sanitising
        only the fields the template uses."""
        values: dict[str, str] = {}
        for name in self.template.fields:
            if name == "index":
                continue
            if name == "id":
                raw: str = item_id
            elif name == "variant":
                raw = variant_text(variant)
            elif name == "model":
                raw = model
            elif name == "key":
                values[name] = key
                continue
            else:
                found = variant.get(name)
                if found is None:
                    found = metadata.get(name)
                if found is None:
                    # Let the one slow path build the message with every available field.
                    return [image_relpath(self.template.source, item_id=item_id, variant=variant,
                                          metadata=metadata, model=model, key=key, index=1)]
                raw = found
            values[name] = raw.translate(_VALUE_TABLE)
        out = []
        for index in range(1, n + 1):
            values["index"] = str(index)
            out.append(check_relpath(self.template.render(values)))
        return out
