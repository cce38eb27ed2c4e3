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

This module keeps what ties those parts together: opening a manifest, the YAML settings checks, the matrix,
the per-item expansion and `validate` (whose totals are `summary.py`'s `ValidationSummary`).

Row numbers are what a spreadsheet shows: the header is row 1, the first data row is row 2.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from batchgen import catalog
from batchgen.errors import ManifestError, Problem
from batchgen.manifest import naming
from batchgen.manifest.csvsource import ID_FIELD_CANDIDATES as ID_FIELD_CANDIDATES
from batchgen.manifest.csvsource import CsvSource, auto_id_field, csv_id_name, open_csv
from batchgen.manifest.duplicates import HashLog
from batchgen.manifest.localfiles import ReferenceChecker
from batchgen.manifest.problems import MAX_PROBLEMS as MAX_PROBLEMS
from batchgen.manifest.problems import Problems, explain, in_manifest_words, locations, pydantic_problems
from batchgen.manifest.schema import MATRIX_PARAMS, REQUEST_PARAMS, ManifestSchema
from batchgen.manifest.summary import ModelTotals as ModelTotals
from batchgen.manifest.summary import ValidationSummary
from batchgen.manifest.values import PARAM_SET, TEXT_PARAMS, as_text, coerce_param, is_unset
from batchgen.manifest.yamlsource import at, child, node_line, parse_yaml
from batchgen.models import (
    KEY_SCHEME,
    GenerationRequest,
    JobSpec,
    PlannedRequest,
    is_remote,
    request_key_for_fields,
)
from batchgen.units import parse_duration_s, parse_rate

# MAX_PROBLEMS, ID_FIELD_CANDIDATES and ModelTotals are imported "as" themselves above: public names of this
# module before they moved, so they stay importable from here (read from their new modules: rebinding them
# here changes nothing).

_M = TypeVar("_M", bound=BaseModel)

# Bumped when expansion changes in a way that could change requests, so fingerprints change with it.
EXPANSION_VERSION = "1"
YAML_SUFFIXES = (".yaml", ".yml")
CSV_SUFFIXES = (".csv",)
_RESERVED_MATRIX = frozenset({"id", "variant", "key", "index"})
_NAME_RE = re.compile(r"^[\w][\w.\- ]*$")
# Cached verdicts per parameter combination / reference; cleared if a file of unique junk grows them.
_CACHE_LIMIT = 20_000


# --- the expansion ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Variant:
    values: dict[str, str]  # matrix variable -> value as text (the request's `variant`)
    params: dict[str, Any]  # the request parameters it sets


@dataclass
class _Inline:
    """Inline YAML items: each a mapping, with its line and the line of each of its keys."""

    items: list[Any]
    lines: list[int]
    field_lines: list[dict[str, int]]


class Manifest:
    """An opened manifest: the job's settings and a stream of its requests (see the module docstring)."""

    def __init__(self, job: JobSpec, *, display: str, defaults: dict[str, Any], template: naming.Template | None,
                 variants: list[_Variant], id_field: str | None, source: CsvSource | _Inline | None,
                 fingerprint_parts: list[str], settings_problems: list[Problem] | None = None) -> None:
        self.job = job
        # Problems in the manifest's settings, reported together with the items' problems.
        self._settings_problems = list(settings_problems or [])
        self.display = display
        self.problems: list[Problem] = []
        self.truncated = 0
        self._defaults = defaults
        self._template = template
        self._variants = variants
        self._id_field = id_field
        self._source = source
        self._fingerprint_parts = fingerprint_parts
        self._names = naming.NameRenderer(job.output.filename)
        self._checker = ReferenceChecker()
        self._combo_verdicts: dict[tuple[Any, ...], tuple[tuple[str | None, str], ...]] = {}
        self._refs: dict[tuple[str, str], str] = {}
        self._variant_names = frozenset(variants[0].values) if variants else frozenset()

    # --- public ---------------------------------------------------------------------------------------

    def requests(self) -> Iterator[PlannedRequest]:
        """Every valid request, in manifest order. Invalid rows land in `.problems` (capped; the count of the
        rest in `.truncated`); duplicate ids and output files are added once the stream ends."""
        problems = Problems()
        problems.items.extend(self._settings_problems)
        self.problems, self.truncated = problems.items, 0
        ids, names = HashLog(), HashLog()
        add_id, add_name = ids.add, names.add

        def on_item(item_id: str, file: str, loc: str) -> None:
            add_id(hash(item_id))

        def on_names(paths: list[str], file: str, loc: str) -> None:
            for p in paths:
                # casefold: on a case-insensitive disk "A1" and "a1" are the same file
                add_name(hash(p.casefold()))

        try:
            yield from self._generate(problems, on_item, on_names)
            self._report_duplicates(problems, ids.repeated(), names.repeated())
        finally:
            ids.close()
            names.close()
            self.truncated = problems.rest

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ManifestError(list(self.problems), truncated=self.truncated)

    def fingerprint(self) -> str:
        """Changes when the manifest, its CSV (size and modification time) or a local reference file named
        in the YAML changes, or when batchgen's expansion changes. Photos named only in CSV cells are not
        included (the CSV's own change is)."""
        parts = [EXPANSION_VERSION, KEY_SCHEME, *self._fingerprint_parts]
        if isinstance(self._source, CsvSource):
            parts.append(_stat_part(self._source.path))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    # --- expansion ------------------------------------------------------------------------------------

    def _generate(self, problems: Problems, on_item: Callable[[str, str, str], None],
                  on_names: Callable[[list[str], str, str], None]) -> Iterator[PlannedRequest]:
        source = self._source
        if isinstance(source, CsvSource):
            yield from self._generate_csv(source, problems, on_item, on_names)
        elif isinstance(source, _Inline):
            yield from self._generate_inline(source, problems, on_item, on_names)
        else:
            # No items: the job is one item, named after the job.
            on_item(self.job.name, self.display, "")
            yield from self._expand(self.display, None, self.job.name, {}, {}, None, self.job.base_dir,
                                    problems, on_names)

    def _generate_csv(self, src: CsvSource, problems: Problems, on_item: Callable[[str, str, str], None],
                      on_names: Callable[[list[str], str, str], None]) -> Iterator[PlannedRequest]:
        file = src.display
        base = src.path.parent
        ncols = len(src.header)
        param_cols, meta_cols, id_col = src.param_cols, src.meta_cols, src.id_col
        expand = self._expand
        try:
            with src.path.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh, strict=True)
                next(reader, None)
                rowno = 1
                for row in reader:
                    rowno += 1
                    if not any(row):
                        continue  # a blank line, or a row of empty cells (spreadsheets leave them at the end)
                    if len(row) != ncols:
                        if len(row) > ncols and any(c.strip() for c in row[ncols:]):
                            problems.add(file, f"row {rowno}", None, f"has {len(row)} cells but the header "
                                         f"has {ncols} columns; quote cells that contain commas")
                            continue
                        row = (row + [""] * ncols)[:ncols]
                    loc = f"row {rowno}"
                    if id_col is not None:
                        item_id = row[id_col].strip()
                        if not item_id:
                            problems.add(file, loc, self._id_field, "is empty; every row needs an id")
                            continue
                    else:
                        item_id = str(rowno)
                    on_item(item_id, file, loc)
                    metadata = {name: row[i] for name, i in meta_cols}
                    params: dict[str, Any] = {}
                    bad: set[str] = set()
                    for name, i in param_cols:
                        cell = row[i]
                        if not cell or cell.isspace():
                            continue
                        if name == "prompt":
                            params[name] = cell
                            continue
                        if name in TEXT_PARAMS:
                            params[name] = cell.strip()
                            continue
                        try:
                            params[name] = coerce_param(name, cell)
                        except ValueError as error:
                            problems.add(file, loc, name, str(error))
                            bad.add(name)
                    yield from expand(file, loc, item_id, params, metadata, None, base, problems, on_names,
                                      frozenset(bad))
        except UnicodeDecodeError as error:
            problems.add(file, f"row {rowno + 1}", None, f"is not UTF-8 text ({error.reason}); save the CSV "
                         "as UTF-8")
        except csv.Error as error:
            problems.add(file, f"row {rowno + 1}", None, f"cannot be read as CSV: {error}")

    def _generate_inline(self, src: _Inline, problems: Problems, on_item: Callable[[str, str, str], None],
                         on_names: Callable[[list[str], str, str], None]) -> Iterator[PlannedRequest]:
        file = self.display
        base = self.job.base_dir
        for position, (item, line, field_lines) in enumerate(
                zip(src.items, src.lines, src.field_lines, strict=True), start=1):
            loc = f"line {line}"
            if not isinstance(item, dict):
                problems.add(file, loc, "items", f"item {position} is not a mapping of fields")
                continue
            if self._id_field is not None:
                raw_id = item.get(self._id_field)
                if is_unset(raw_id) or isinstance(raw_id, dict | list):
                    problems.add(file, loc, self._id_field, f"item {position} has no {self._id_field}; every "
                                 "item needs one (or remove id_field to number items)")
                    continue
                item_id = as_text(raw_id).strip()
            else:
                item_id = str(position)
            on_item(item_id, file, loc)
            metadata: dict[str, str] = {}
            params: dict[str, Any] = {}
            bad: set[str] = set()
            for key, value in item.items():
                key = str(key)
                where = f"line {field_lines.get(key, line)}"
                if key in PARAM_SET:
                    if is_unset(value):
                        continue
                    if key in self._variant_names:
                        problems.add(file, where, key, "is also a matrix variable; set it in one place")
                        bad.add(key)
                        continue
                    try:
                        params[key] = coerce_param(key, value)
                    except ValueError as error:
                        problems.add(file, where, key, str(error))
                        bad.add(key)
                elif isinstance(value, dict | list):
                    problems.add(file, where, key, "item fields must be text or numbers, not lists or mappings")
                    bad.add(key)
                elif key in self._variant_names:
                    problems.add(file, where, key, "is also a matrix variable; rename one of them")
                    bad.add(key)
                else:
                    metadata[key] = as_text(value)
            yield from self._expand(file, loc, item_id, params, metadata, field_lines, base, problems, on_names,
                                    frozenset(bad))

    def _expand(self, file: str, loc: str | None, item_id: str, item_params: dict[str, Any],
                metadata: dict[str, str], field_lines: dict[str, int] | None, base: Path, problems: Problems,
                on_names: Callable[[list[str], str, str], None],
                bad_fields: frozenset[str] = frozenset()) -> Iterator[PlannedRequest]:
        """The requests of one item: one per matrix combination, each checked against the catalogue.

        `bad_fields`: the item's fields already reported as unreadable (left out of `item_params` and
        `metadata`); the rest of the item is still checked, so that all its problems are reported at once,
        and it yields nothing."""

        reported: set[tuple[str | None, str]] = set()

        def report(name: str | None, message: str, at_item: bool = False) -> None:
            # Once per item: a bad n would otherwise repeat for every matrix combination.
            if (name, message) in reported:
                return
            reported.add((name, message))
            place = f"line {field_lines[name]}" if field_lines and name in field_lines and not at_item else loc
            problems.add(file, place, name, message)

        # Local references written in this item resolve against the file they are written in.
        if "image_urls" in item_params or "mask_url" in item_params:
            item_params = dict(item_params)
            for name in ("image_urls", "mask_url"):
                if name in item_params:
                    try:
                        item_params.update(self._resolve_refs({name: item_params[name]}, base))
                    except _RefError as error:
                        report(error.field, error.message)
                        bad_fields |= {name}
                        del item_params[name]
        template = self._template
        values: dict[str, str] | None = None
        source = f"{file} {loc}" if loc else file
        for variant in self._variants:
            params = {**self._defaults, **item_params, **variant.params} if variant.params or item_params \
                else self._defaults
            # An item's problems are all reported, not only the first: a missing prompt does not stop the
            # model and size from being checked. A request is built only when nothing is wrong.
            ok = not bad_fields
            # Prompt: the item's own text, else the template filled from the item and the variant.
            prompt = item_params.get("prompt")
            if prompt is None and "prompt" not in bad_fields:
                if template is None:
                    report("prompt", "missing: give the item a prompt, or set "
                                 "prompt: (a template) in the manifest")
                    ok = False
                else:
                    if values is None:
                        values = dict(metadata)
                        values["id"] = item_id
                    if variant.values:
                        values.update(variant.values)
                    missing = [f for f in template.fields if not values.get(f) and f not in bad_fields]
                    if missing:
                        available = ", ".join(sorted(k for k, v in values.items() if v)) or "none"
                        report("prompt", at_item=True, message="the template uses "
                                     + ", ".join("{" + f + "}" for f in missing)
                                     + f", which this item does not have or leaves empty; it has: {available}")
                        ok = False
                    elif not any(f in bad_fields for f in template.fields):
                        prompt = template.render(values)
            if prompt is None:
                ok = False
            elif not prompt.strip():
                report("prompt", "is empty")
                ok = False
            elif len(prompt) > catalog.MAX_PROMPT_CHARS:
                report("prompt", f"is {len(prompt)} characters long; at most "
                             f"{catalog.MAX_PROMPT_CHARS} are allowed (starts {prompt[:40]!r})")
                ok = False
            model = params.get("model") or catalog.DEFAULT_MODEL
            size = params.get("size")
            n = params.get("n", 1)
            urls: tuple[str, ...] = params.get("image_urls", ())
            mask = params.get("mask_url")
            for field_name, message in self._combo_verdict(model, size, n, len(urls), mask is not None):
                # A field already reported as unreadable, or one judged against a model that is (size,
                # mask, references), would only repeat that problem in other words.
                if field_name in bad_fields or ("model" in bad_fields and field_name != "n"):
                    continue
                report(field_name, message)
                ok = False
            for ref in urls:
                if not is_remote(ref):
                    unusable = self._checker.error_for(Path(ref))
                    if unusable:
                        report("image_urls", unusable)
                        ok = False
            if mask is not None and not is_remote(mask):
                unusable = self._checker.error_for(Path(mask), mask=True)
                if unusable:
                    report("mask_url", unusable)
                    ok = False
            if not ok:
                continue
            # Mirrors GenerationRequest.model_dump(mode="json", exclude_none=True), so the key is the same
            # as request_key() of the built request (tested).
            dumped: dict[str, Any] = {"prompt": prompt, "model": model, "n": n, "image_urls": list(urls)}
            for name in ("size", "mask_url", "quality", "resolution", "seed", "model_params"):
                value = params.get(name)
                if value is not None:
                    dumped[name] = value
            key = request_key_for_fields(item_id, variant.values, dumped)
            try:
                paths = self._names.paths(item_id=item_id, variant=variant.values, metadata=metadata, model=model,
                                          key=key, n=n)
            except ValueError as error:
                report("output.filename", str(error))
                continue
            on_names(paths, file, loc or "")
            request = _construct(GenerationRequest, {
                "prompt": prompt, "model": model, "size": size, "n": n, "image_urls": urls, "mask_url": mask,
                "quality": params.get("quality"), "resolution": params.get("resolution"),
                "seed": params.get("seed"), "model_params": params.get("model_params"),
            })
            yield _construct(PlannedRequest, {"key": key, "item_id": item_id, "variant": variant.values,
                                              "metadata": metadata, "request": request, "source": source})

    def _combo_verdict(self, model: str, size: str | None, n: Any, n_images: int,
                       has_mask: bool) -> tuple[tuple[str | None, str], ...]:
        """(field, message) for every rule the combination breaks, from GenerationRequest itself."""
        cache_key = (model, size, n, n_images, has_mask)
        verdict = self._combo_verdicts.get(cache_key)
        if verdict is None:
            if len(self._combo_verdicts) > _CACHE_LIMIT:
                self._combo_verdicts.clear()
            verdict = _check_combo(model, size, n, n_images, has_mask)
            self._combo_verdicts[cache_key] = verdict
        return verdict

    def _resolve_refs(self, params: dict[str, Any], base: Path) -> dict[str, Any]:
        params = dict(params)
        if "image_urls" in params:
            params["image_urls"] = tuple(self._resolve(r, base, "image_urls") for r in params["image_urls"])
        if "mask_url" in params:
            params["mask_url"] = self._resolve(params["mask_url"], base, "mask_url")
        return params

    def _resolve(self, ref: str, base: Path, field_name: str) -> str:
        cache_key = (ref, str(base))
        hit = self._refs.get(cache_key)
        if hit is None:
            if len(self._refs) > _CACHE_LIMIT:
                self._refs.clear()
            hit = _resolve_ref(ref, base, field_name)
            self._refs[cache_key] = hit
        return hit

    # --- duplicates -----------------------------------------------------------------------------------

    def _report_duplicates(self, problems: Problems, dup_ids: set[int], dup_names: set[int]) -> None:
        if not dup_ids and not dup_names:
            return
        # Rare: walk the manifest again, collecting only the colliding ids and names, to name their rows.
        id_places: dict[str, list[tuple[str, str]]] = {}
        name_places: dict[str, list[tuple[str, str]]] = {}

        def on_item(item_id: str, file: str, loc: str) -> None:
            if hash(item_id) in dup_ids:
                id_places.setdefault(item_id, []).append((file, loc))

        def on_names(paths: list[str], file: str, loc: str) -> None:
            for p in paths:
                if hash(p.casefold()) in dup_names:
                    name_places.setdefault(p.casefold(), []).append((file, loc))

        for _ in self._generate(Problems(cap=0), on_item, on_names):
            pass
        id_label = self._id_field or "id"
        for item_id, places in id_places.items():
            if len(places) > 1:
                problems.add(places[1][0], locations(places[1:]), id_label,
                             f'"{item_id}" is already used by {locations(places[:1])}; item ids must be unique')
        # Items sharing an id usually share file names too; the id is the mistake to report.
        explained = {place for places in id_places.values() if len(places) > 1 for place in places}
        for name, places in name_places.items():
            if len(places) > 1 and not set(places) <= explained:
                problems.add(places[1][0], locations(places[1:]), "output.filename",
                             f'"{name}" would also be written by {locations(places[:1])}: each image needs its '
                             "own file; add {variant}, {index} or a unique field to the file name template")


def _construct(cls: type[_M], values: dict[str, Any]) -> _M:
    """`cls.model_construct(**values)` for a dict holding every field, without its per-field alias and
    default lookups (a quarter of the expansion's time). Only for values that passed the equivalent checks;
    equality with model_construct is tested."""
    if cls.__pydantic_post_init__ or cls.__pydantic_root_model__:  # pragma: no cover - not our models
        return cls.model_construct(**values)
    obj = cls.__new__(cls)
    _setattr(obj, "__dict__", values)
    _setattr(obj, "__pydantic_fields_set__", set(values))
    _setattr(obj, "__pydantic_extra__", None)
    _setattr(obj, "__pydantic_private__", None)
    return obj


_setattr = object.__setattr__


class _RefError(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def _resolve_ref(ref: str, base: Path, field_name: str) -> str:
    """A reference as the request holds it: an http(s) URL untouched, a local path made absolute."""
    if is_remote(ref):
        return ref
    if "://" in ref or ref.startswith("data:"):
        raise _RefError(field_name, f'"{ref[:80]}" is neither an http(s) URL nor a local file path')
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = base / path
    return os.path.normpath(path)


def _check_combo(model: str, size: str | None, n: Any, n_images: int,
                 has_mask: bool) -> tuple[tuple[str | None, str], ...]:
    """Every problem of the combination: the request's own field rules (n, how many references) from
    GenerationRequest, and every catalogue rule besides. Pydantic skips the catalogue check when a field
    is already wrong, so it is asked directly: an item with n: 99 and a size its model refuses gets both."""
    found: list[tuple[str | None, str]] = []
    try:
        GenerationRequest(prompt="x", model=model, size=size, n=n, image_urls=("x",) * n_images,
                          mask_url="x" if has_mask else None)
    except ValidationError as error:
        found += [explain(err, n_images) for err in error.errors() if err["loc"]]
    found += [in_manifest_words(name, message)
              for name, message in catalog.combination_problems(model, size, has_mask, n_images)]
    return tuple(found)


def _stat_part(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


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
        raise ManifestError([Problem(str(path), None, None, f"is not UTF-8 text ({error.reason})")]) from None
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
    data, root = parse_yaml(text, file)
    problems = Problems()
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
        return Manifest(job, display=str(path), defaults={}, template=None, variants=[_Variant({}, {})],
                        id_field=csv_id_name(src), source=src, fingerprint_parts=[])
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
    template: naming.Template | None = None
    if template_text is not None:
        try:
            template = naming.compile_template(template_text)
        except ValueError as error:
            where = line("prompt") if schema.prompt is not None else line("defaults", "prompt")
            problems.add(file, where, "prompt", str(error))

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
                    defaults[name] = tuple(_resolve_ref(r, job.base_dir, name) for r in defaults[name])
                else:
                    defaults[name] = _resolve_ref(defaults[name], job.base_dir, name)
            except _RefError as error:
                problems.add(file, line("defaults", name), f"defaults.{name}", error.message)
    for ref in [*defaults.get("image_urls", ()), *([defaults["mask_url"]] if "mask_url" in defaults else [])]:
        if not is_remote(ref):
            fingerprint_parts.append(_stat_part(Path(ref)))

    # Matrix.
    variants = _build_variants(schema, file, line, problems)
    matrix_names = frozenset(schema.matrix)

    # Items.
    if schema.items is not None and schema.items_csv is not None:
        problems.add(file, line("items_csv"), "items_csv", "give items or items_csv, not both")
    source: CsvSource | _Inline | None = None
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
                    known = columns | matrix_names | {"id"}
                    for f in template.fields:
                        if f not in known:
                            problems.add(file, line("prompt") or line("defaults", "prompt"), "prompt",
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
        source = _Inline(items=schema.items, lines=lines, field_lines=field_lines)
        if not schema.items:
            problems.add(file, line("items"), "items", "is empty; list at least one item")
        id_name = schema.id_field or auto_id_field(
            {str(k) for it in schema.items if isinstance(it, dict) for k in it})
    else:
        if template is None:
            problems.add(file, None, "prompt", "missing: set prompt: (the prompt, or a template for items)")
        elif template.fields:
            problems.add(file, line("prompt"), "prompt", "the template uses "
                         + ", ".join("{" + f + "}" for f in template.fields if f not in matrix_names and f != "id")
                         + " but the manifest has no items; add items: or items_csv:")
    if len(problems.items) > len(parsed.problems):
        problems.raise_if_any()  # the items cannot be expanded meaningfully
    manifest = Manifest(job, display=file, defaults=defaults, template=template, variants=variants,
                        id_field=id_name, source=source, fingerprint_parts=fingerprint_parts,
                        settings_problems=parsed.problems)
    return manifest


def _build_variants(schema: ManifestSchema, file: str, line: Callable[..., str | None],
                    problems: Problems) -> list[_Variant]:
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
        variants.append(_Variant(texts, params))
    return variants


# --- validate -------------------------------------------------------------------------------------------


def validate(path: Path) -> ValidationSummary:
    """Expand everything, check everything, send nothing; ManifestError with every problem found."""
    manifest = open_manifest(Path(path))
    summary = ValidationSummary(job=manifest.job.name)
    for planned in manifest.requests():
        summary.add(planned.request)
    manifest.raise_if_problems()
    return summary
