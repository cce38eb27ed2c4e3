"""Manifests: a YAML or CSV job turned into a stream of validated, keyed generation requests.

A catalogue team writes "every product in this CSV, in two styles and three aspect ratios" once; this module
expands it into exact API requests and stops every bad one before it can cost a credit. Three things shape
the code:

* **Every problem, with its place.** A user fixes a manifest in one pass only if all mistakes are listed,
  each with file, line or CSV row, field, the bad value and what is allowed. File-level mistakes (YAML
  syntax, a bad value the rows depend on, a missing or empty CSV) raise from `open_manifest`, together
  with the settings' problems (unknown keys, `run`, `output`); row mistakes are
  collected (up to `MAX_PROBLEMS`, with a count of the rest) while `Manifest.requests()` streams, and
  `raise_if_problems()` raises them together. A consumer that writes iterates inside one transaction and
  rolls back when that raises, so bad input changes nothing. Lines come from the YAML's node tree
  (`yamlsource.py`); the capped list and the wording of pydantic and catalogue errors are in `problems.py`.
* **A million rows in flat memory.** Rows stream from the CSV and are never held (its header is read and
  checked up front, `csvsource.py`); duplicate item ids and duplicate output files are found from one 64-bit
  hash per id/name in an `array('q')` (8 bytes each, `duplicates.py`), checked at the end, and only
  colliding hashes are looked at again to name the rows.
* **Speed without a second rule book.** Pydantic-validating each row would cap expansion at a few thousand
  rows a second. The rules live in `GenerationRequest` (catalogue, sizes, n, masks, editing models): each
  distinct parameter combination (model, size, n, number of images, mask or not) is validated once through
  it and the verdict cached; the prompt's length is checked against the same catalogue constant; only then
  is the request built with `model_construct`. Cells become parameters through plain functions
  (`values.py`).

This module keeps what ties those parts together: opening a manifest, the YAML settings checks, the matrix
and `validate` (whose totals are `summary.py`'s `ValidationSummary`). The per-item expansion, the rule
cache and the reference checks are `expand.py`'s `Manifest`.

Row numbers are what a spreadsheet shows: the header is row 1, the first data row is row 2.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from batchgen import catalog
from batchgen.errors import ManifestError, Problem
from batchgen.manifest import naming
from batchgen.manifest.csvsource import ID_FIELD_CANDIDATES as ID_FIELD_CANDIDATES
from batchgen.manifest.csvsource import CsvSource, auto_id_field, csv_id_name, open_csv
from batchgen.manifest.expand import Inline, Manifest, RefError, Variant, resolve_ref, stat_part
from batchgen.manifest.problems import MAX_PROBLEMS as MAX_PROBLEMS
from batchgen.manifest.problems import Problems, pydantic_problems
from batchgen.manifest.schema import MATRIX_PARAMS, REQUEST_PARAMS, ManifestSchema
from batchgen.manifest.summary import ModelTotals as ModelTotals
from batchgen.manifest.summary import ValidationSummary
from batchgen.manifest.values import PARAM_SET, as_text, coerce_param
from batchgen.manifest.yamlsource import at, child, node_line, parse_yaml
from batchgen.models import (
    JobSpec,
    is_remote,
)
from batchgen.units import parse_duration_s, parse_rate

# MAX_PROBLEMS, ID_FIELD_CANDIDATES and ModelTotals are imported "as" themselves above: public names of this
# module before they moved, so they stay importable from here (read from their new modules: rebinding them
# here changes nothing).

YAML_SUFFIXES = (".yaml", ".yml")
CSV_SUFFIXES = (".csv",)
_RESERVED_MATRIX = frozenset({"id", "variant", "key", "index"})
_NAME_RE = re.compile(r"^[\w][\w.\- ]*$")


# --- opening --------------------------------------------------------------------------------------------


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return "yaml"
    if suffix in CSV_SUFFIXES:
        return "csv"
    raise ManifestError([Problem(str(path), None, None, f'"{path.suffix}" is not a manifest type; use a .yaml, '
                                 ".yml or .csv file")])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError([Problem(str(path), None, None, "does not exist")]) from None
    except IsADirectoryError:
        raise ManifestError([Problem(str(path), None, None, "is a folder, not a manifest file")]) from None
    except UnicodeDecodeError as error:
        # The line and the byte, so the user can find the one character their editor saved in another encoding.
        raw = error.object if isinstance(error.object, bytes) else b""
        line = raw.count(b"\n", 0, error.start) + 1
        bad = raw[error.start:error.start + 1]
        raise ManifestError([Problem(str(path), f"line {line}", None, f"is not UTF-8 text (byte 0x{bad.hex().upper()}: "
                                     f"{error.reason}); save the file as UTF-8")]) from None
    except OSError as error:
        raise ManifestError([Problem(str(path), None, None, f"cannot be read: {error.strerror}")]) from None


@dataclass
class _Parsed:
    """A YAML manifest after the schema and settings checks (what load_job needs and a bit more)."""

    job: JobSpec
    schema: ManifestSchema
    root: yaml.Node | None
    text: str
    problems: list[Problem] = field(default_factory=list)  # settings problems found with keep_going


def _is_setting_error(e: Any) -> bool:
    """A schema error that cannot change what the items expand to: an unknown key anywhere, a bad `name`,
    `run`, `output` or `quality` value."""
    return e["type"] == "extra_forbidden" or bool(e["loc"] and e["loc"][0] in ("name", "run", "output", "quality"))


def _validate_schema(data: dict[str, Any], file: str, root: yaml.Node | None,
                     problems: Problems) -> tuple[ManifestSchema, bool]:
    """Validate the YAML against the schema, recording every error; returns the schema of what is left and
    whether the items must not be expanded.

    Every erroneous key is reported, dropped and validation repeated, so the settings' problems (and the
    checks the caller makes on them) come in the same pass as the rest. A bad value of a key the rows
    depend on (`defaults`, `prompt`, `items`, `items_csv`, `id_field`, `matrix`) would make every item's
    report a cascade of the same mistake, so then the items are not expanded (True). pydantic reports
    every error of a pass, so the second pass normally succeeds; each pass drops at least one key, so an
    error is never recorded twice.
    """
    cascade = False
    while True:
        try:
            return ManifestSchema.model_validate(data), cascade
        except ValidationError as error:
            pydantic_problems(error, file, root, problems)
            cascade = cascade or not all(_is_setting_error(e) for e in error.errors())
            data = copy.deepcopy(data)
            dropped = [_drop(data, tuple(e["loc"])) for e in error.errors()]
            if not any(dropped):
                problems.raise_if_any()  # nothing left to drop: what was found is all there is
                raise


def _drop(data: Any, loc: tuple[Any, ...]) -> bool:
    """Remove the key of the deepest mapping on `loc` (a pydantic error location) so its default applies: an
    error inside a list, a union branch or a mapping's key drops the whole value that holds it. False when
    there was nothing to remove."""
    holder: dict[Any, Any] | None = None
    key: Any = None
    for part in loc:
        if isinstance(data, dict) and part in data:
            holder, key, data = data, part, data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            break
    if holder is None:
        return False
    del holder[key]
    return True


def _parse_yaml_manifest(path: Path, keep_going: bool = False) -> _Parsed:
    """Parse and check a YAML manifest's settings; every settings problem is found before any raises. Without
    `keep_going` any problem raises; with it, problems that leave the items' expansion meaningful are
    returned in `_Parsed.problems` (a bad value the rows depend on still raises, see `_validate_schema`)."""
    file = str(path)
    text = _read_text(path)
    data, root, duplicates = parse_yaml(text, file)
    problems = Problems()
    problems.items.extend(duplicates)  # listed with the other problems; the YAML itself is readable
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ManifestError([Problem(file, at(node_line(root, ())), None, "the manifest must be a mapping of "
                                     "keys (name, defaults, prompt, items or items_csv, matrix, output, run)")])
    schema, cascade = _validate_schema(data, file, root, problems)
    name = schema.name if schema.name is not None else path.stem
    if not _NAME_RE.match(name):
        problems.add(file, at(node_line(root, ("name",))), "name", f'"{name}" is not a usable job name; use '
                     "letters, digits, spaces, '.', '-' and '_', starting with a letter or digit")
    run = schema.run
    try:
        parse_rate(run.rate)
    except ValueError as error:
        problems.add(file, at(node_line(root, ("run", "rate"))), "run.rate", str(error))
    for setting in ("max_wait", "patience"):
        try:
            parse_duration_s(getattr(run, setting))
        except ValueError as error:
            problems.add(file, at(node_line(root, ("run", setting))), f"run.{setting}", str(error))
    for i, model in enumerate(run.fallback_models):
        if catalog.get(model) is None:
            problems.add(file, at(node_line(root, ("run", "fallback_models", i))), "run.fallback_models",
                         f'"{model}" is not in the catalogue; use one of '
                         + catalog.describe_choices(catalog.names(), limit=20))
    try:
        naming.check_filename_template(schema.output.filename)
    except ValueError as error:
        problems.add(file, at(node_line(root, ("output", "filename"))), "output.filename", str(error))
        problems.raise_if_any()  # every row's names would repeat this mistake
    if cascade or not keep_going:
        problems.raise_if_any()
    job = JobSpec(name=name, manifest_path=path.absolute(), output=schema.output, run=run,
                  quality=schema.quality)
    return _Parsed(job=job, schema=schema, root=root, text=text, problems=list(problems.items))


def load_job(path: Path) -> JobSpec:
    """The job's settings only (fast, no expansion): name, output and run settings, paths absolute.
    ManifestError if the file or its settings are bad."""
    path = Path(path)
    if _kind(path) == "csv":
        return JobSpec(name=path.stem, manifest_path=path.absolute())
    return _parse_yaml_manifest(path).job


def open_manifest(path: Path) -> Manifest:
    """Open a manifest for expansion; raises ManifestError at once for file-level problems (syntax, a bad
    value the rows depend on, a missing or empty CSV, no prompt, template fields no item can have), with
    the settings' problems found beside them."""
    path = Path(path)
    if _kind(path) == "csv":
        if not path.exists():
            raise ManifestError([Problem(str(path), None, None, "does not exist")])
        job = JobSpec(name=path.stem, manifest_path=path.absolute())
        problems = Problems()
        src = open_csv(path, str(path), id_field=None, matrix_names=frozenset(), problems=problems,
                       display_of_manifest=str(path))
        if src is not None and not any(name == "prompt" for name, _ in src.param_cols):
            problems.add(str(path), "row 1", "prompt", "the CSV has no prompt column; a CSV job needs one "
                         f"(columns found: {', '.join(src.header)})")
        problems.raise_if_any()
        return Manifest(job, display=str(path), defaults={}, template=None, variants=[Variant({}, {})],
                        id_field=csv_id_name(src), source=src, fingerprint_parts=[], csv_job=True)
    parsed = _parse_yaml_manifest(path, keep_going=True)
    return _build_yaml_manifest(path, parsed)


def _build_yaml_manifest(path: Path, parsed: _Parsed) -> Manifest:
    file = str(path)
    schema, root, job = parsed.schema, parsed.root, parsed.job
    problems = Problems()
    problems.items.extend(parsed.problems)

    def line(*loc: Any) -> str | None:
        return at(node_line(root, loc))

    # Template.
    if schema.prompt is not None and schema.defaults.prompt is not None:
        problems.add(file, line("defaults", "prompt"), "defaults.prompt", "the prompt template is given twice "
                     "(prompt: and defaults.prompt:); keep one")
    template_text = schema.prompt if schema.prompt is not None else schema.defaults.prompt
    template_line = line("prompt") if schema.prompt is not None else line("defaults", "prompt")
    template: naming.Template | None = None
    if template_text is not None:
        try:
            template = naming.compile_template(template_text)
        except ValueError as error:
            problems.add(file, template_line, "prompt", str(error))

    # Defaults: everything but the prompt template; local references relative to the manifest.
    defaults: dict[str, Any] = {}
    fingerprint_parts = [hashlib.sha256(parsed.text.encode()).hexdigest()]
    for name in REQUEST_PARAMS:
        value = getattr(schema.defaults, name)
        if name == "prompt" or value is None:
            continue
        defaults[name] = tuple(value) if name == "image_urls" else value
    for name in ("image_urls", "mask_url"):
        if name in defaults:
            try:
                if name == "image_urls":
                    defaults[name] = tuple(resolve_ref(r, job.base_dir, name) for r in defaults[name])
                else:
                    defaults[name] = resolve_ref(defaults[name], job.base_dir, name)
            except RefError as error:
                problems.add(file, line("defaults", name), f"defaults.{name}", error.message)
    for ref in [*defaults.get("image_urls", ()), *([defaults["mask_url"]] if "mask_url" in defaults else [])]:
        if not is_remote(ref):
            fingerprint_parts.append(stat_part(Path(ref)))

    # Matrix.
    variants = _build_variants(schema, file, line, problems)
    matrix_names = frozenset(schema.matrix)

    # Items.
    if schema.items is not None and schema.items_csv is not None:
        problems.add(file, line("items_csv"), "items_csv", "give items or items_csv, not both")
    source: CsvSource | Inline | None = None
    id_name: str | None = None
    if schema.items_csv is not None:
        csv_path = job.base_dir / schema.items_csv
        display = os.path.normpath(os.path.join(os.path.dirname(file), schema.items_csv))
        if not csv_path.is_file():
            problems.add(file, line("items_csv"), "items_csv", f'"{schema.items_csv}" does not exist (looked '
                         f"for {display})")
        else:
            src = open_csv(csv_path, display, id_field=schema.id_field, matrix_names=matrix_names,
                           problems=problems, display_of_manifest=file, id_line=line("id_field"))
            if src is not None:
                source, id_name = src, csv_id_name(src)
                columns = {name for name, _ in src.meta_cols}
                has_prompt = any(name == "prompt" for name, _ in src.param_cols)
                if template is None and not has_prompt:
                    problems.add(file, line("prompt"), "prompt", f"missing: set prompt: (a template) or give "
                                 f"{display} a prompt column (columns found: {', '.join(src.header)})")
                if template is not None:
                    known = columns | matrix_names | set(naming.PROMPT_BUILTIN_FIELDS)
                    params = {name for name, _ in src.param_cols}
                    for f in dict.fromkeys(template.fields):
                        if f in params:
                            # A column named like a request parameter sets that parameter; it is no template field.
                            problems.add(file, template_line, "prompt",
                                         f"the template uses {{{f}}}, but {display}'s {f} column sets the "
                                         f"request's {f} itself, so it is no template field; rename the column "
                                         f"(e.g. to subject) or drop the manifest's prompt to use it as it is")
                        elif f not in known:
                            problems.add(file, template_line, "prompt",
                                         f"the template uses {{{f}}}, which is neither a column of {display} "
                                         f"nor a matrix variable; columns: {', '.join(sorted(columns))}")
                fn_tpl = naming.compile_template(job.output.filename)
                known_names = columns | matrix_names | set(naming.BUILTIN_FIELDS)
                for f in fn_tpl.fields:
                    if f not in known_names:
                        problems.add(file, line("output", "filename"), "output.filename",
                                     f"the template uses {{{f}}}, which is neither a column of {display}, a "
                                     f"matrix variable nor one of {', '.join(naming.BUILTIN_FIELDS)}")
    elif schema.items is not None:
        items_node = child(root, "items")
        lines: list[int] = []
        field_lines: list[dict[str, int]] = []
        for i in range(len(schema.items)):
            node = items_node.value[i] if isinstance(items_node, yaml.SequenceNode) else None
            lines.append(node.start_mark.line + 1 if node is not None else 0)
            field_lines.append({str(k.value): k.start_mark.line + 1 for k, _ in node.value}
                               if isinstance(node, yaml.MappingNode) else {})
        source = Inline(items=schema.items, lines=lines, field_lines=field_lines)
        if not schema.items:
            problems.add(file, line("items"), "items", "is empty; list at least one item")
        id_name = schema.id_field or auto_id_field(
            {str(k) for it in schema.items if isinstance(it, dict) for k in it})
    else:
        # No items: the job is one item (named after the job), so the template can use only the matrix
        # variables and the built-in fields.
        if template is None:
            problems.add(file, None, "prompt", "missing: set prompt: (the prompt, or a template for items)")
        else:
            unknown = [f for f in dict.fromkeys(template.fields)
                       if f not in matrix_names and f not in naming.PROMPT_BUILTIN_FIELDS]
            if unknown:
                builtins = ", ".join("{" + f + "}" for f in naming.PROMPT_BUILTIN_FIELDS)
                problems.add(file, template_line, "prompt", "the template uses "
                             + ", ".join("{" + f + "}" for f in unknown)
                             + f", which is neither a matrix variable nor {builtins}, and the manifest has no "
                             "items to take it from; add items: or items_csv:, or add it to the matrix")
    if len(problems.items) > len(parsed.problems):
        problems.raise_if_any()  # the items cannot be expanded meaningfully
    manifest = Manifest(job, display=file, defaults=defaults, template=template, variants=variants,
                        id_field=id_name, source=source, fingerprint_parts=fingerprint_parts,
                        settings_problems=parsed.problems)
    return manifest


def _build_variants(schema: ManifestSchema, file: str, line: Callable[..., str | None],
                    problems: Problems) -> list[Variant]:
    """The matrix as a list of combinations (one empty combination without a matrix)."""
    axes: list[list[tuple[str, str, Any]]] = []
    for name, values in schema.matrix.items():
        where = line("matrix", name)
        if not name.isidentifier():
            problems.add(file, where, f"matrix.{name}", "is not a usable variable name; use letters, digits and "
                         "_ (it is written {" + name + "} in templates)")
            continue
        if name in _RESERVED_MATRIX:
            problems.add(file, where, f"matrix.{name}", f"{name} is a built-in file-name field; choose another "
                         "name")
            continue
        if name in PARAM_SET and name not in MATRIX_PARAMS:
            problems.add(file, where, f"matrix.{name}", f"{name} cannot vary in the matrix; allowed parameters: "
                         f"{', '.join(sorted(MATRIX_PARAMS))} (vary the prompt through the template)")
            continue
        if not values:
            problems.add(file, where, f"matrix.{name}", "is an empty list; give at least one value")
            continue
        axis: list[tuple[str, str, Any]] = []
        seen: set[str] = set()
        for i, value in enumerate(values):
            text = as_text(value).strip()
            if text in seen:
                problems.add(file, line("matrix", name, i), f"matrix.{name}", f'lists "{text}" twice')
                continue
            seen.add(text)
            param_value: Any = None
            if name in MATRIX_PARAMS:
                try:
                    param_value = coerce_param(name, value)
                except ValueError as error:
                    problems.add(file, line("matrix", name, i), f"matrix.{name}", str(error))
                    continue
            axis.append((name, text, param_value))
        axes.append(axis)
    variants = []
    for combo in itertools.product(*axes):
        texts = {name: text for name, text, _ in combo}
        params = {name: pv for name, _, pv in combo if name in MATRIX_PARAMS}
        variants.append(Variant(texts, params))
    return variants


# --- validate -------------------------------------------------------------------------------------------


def validate(path: Path) -> ValidationSummary:
    """Expand everything, check everything, send nothing; ManifestError with every problem found."""
    manifest = open_manifest(Path(path))
    summary = ValidationSummary(job=manifest.job.name, max_credits=manifest.job.run.max_credits)
    for planned in manifest.requests():
        summary.add(planned.request)
    manifest.raise_if_problems()
    return summary
