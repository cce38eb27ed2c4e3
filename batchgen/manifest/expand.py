"""The expansion of an opened manifest into validated, keyed generation requests (`Manifest`).

`load.py` opens a manifest (YAML settings, the matrix, the CSV header) and builds a `Manifest`; this module
streams its requests: one per item, variant and matrix combination, each checked once per distinct parameter
combination through `GenerationRequest` (the verdict is cached), its references resolved, its output name
checked, and every row problem collected with its place (`Problems`) while the duplicates' hashes are kept
(`duplicates.py`). Nothing is held per row.

Row numbers are what a spreadsheet shows: the header is row 1, the first data row is row 2.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from batchgen import catalog
from batchgen.errors import ManifestError, Problem
from batchgen.manifest import naming
from batchgen.manifest.csvsource import ID_FIELD_CANDIDATES as ID_FIELD_CANDIDATES
from batchgen.manifest.csvsource import UNDECODED, CsvSource, not_utf8
from batchgen.manifest.duplicates import HashLog
from batchgen.manifest.localfiles import ReferenceChecker
from batchgen.manifest.problems import MAX_PROBLEMS as MAX_PROBLEMS
from batchgen.manifest.problems import Problems, explain, in_manifest_words, locations
from batchgen.manifest.summary import ModelTotals as ModelTotals
from batchgen.manifest.values import PARAM_SET, TEXT_PARAMS, as_text, coerce_param, is_unset
from batchgen.models import (
    KEY_SCHEME,
    GenerationRequest,
    JobSpec,
    PlannedRequest,
    is_remote,
    request_key_for_fields,
)

_M = TypeVar("_M", bound=BaseModel)

# Bumped when expansion changes in a way that could change requests, so fingerprints change with it.
EXPANSION_VERSION = "1"
# Cached verdicts per parameter combination / reference; cleared if a file of unique junk grows them.
_CACHE_LIMIT = 20_000



@dataclass(frozen=True)
class Variant:
    values: dict[str, str]  # matrix variable -> value as text (the request's `variant`)
    params: dict[str, Any]  # the request parameters it sets


@dataclass
class Inline:
    """Inline YAML items: each a mapping, with its line and the line of each of its keys."""

    items: list[Any]
    lines: list[int]
    field_lines: list[dict[str, int]]


class Manifest:
    """An opened manifest: the job's settings and a stream of its requests (see the module docstring)."""

    def __init__(self, job: JobSpec, *, display: str, defaults: dict[str, Any], template: naming.Template | None,
                 variants: list[Variant], id_field: str | None, source: CsvSource | Inline | None,
                 fingerprint_parts: list[str], settings_problems: list[Problem] | None = None,
                 csv_job: bool = False) -> None:
        self.job = job
        # Problems in the manifest's settings, reported together with the items' problems.
        self._settings_problems = list(settings_problems or [])
        self.display = display
        self.problems: list[Problem] = []
        self.truncated = 0
        self._defaults = defaults
        self._template = template
        # A CSV job has no manifest around the CSV: its rows' prompts can only come from their own cells.
        self._csv_job = csv_job
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
            parts.append(stat_part(self._source.path))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    # --- expansion ------------------------------------------------------------------------------------

    def _generate(self, problems: Problems, on_item: Callable[[str, str, str], None],
                  on_names: Callable[[list[str], str, str], None]) -> Iterator[PlannedRequest]:
        source = self._source
        if isinstance(source, CsvSource):
            yield from self._generate_csv(source, problems, on_item, on_names)
        elif isinstance(source, Inline):
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
        named = [*param_cols, *meta_cols]
        rowno = 1  # rows read so far, the header included
        # Strict decoding fails a whole buffer of rows at once without saying which; after such a failure the
        # file is read again from the first row not yet expanded, with surrogateescape, and each row's cells
        # are searched for the bytes that are not UTF-8 (only then: the search costs time on every row).
        lenient = False
        while True:
            try:
                with src.path.open(newline="", encoding="utf-8-sig",
                                   errors="surrogateescape" if lenient else "strict") as fh:
                    reader = csv.reader(fh, strict=True)
                    for _ in itertools.islice(reader, rowno):
                        pass  # the header, and the rows expanded before the failure
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
                        bad: set[str] = set()
                        if lenient:
                            unreadable = [(name, i) for name, i in named if UNDECODED.search(row[i])]
                            if unreadable:
                                for name, i in unreadable:
                                    problems.add(file, loc, name, not_utf8(row[i]))
                                if any(i == id_col for _, i in unreadable):
                                    continue  # without its id the row is nothing to check further
                                row = row.copy()
                                for name, i in unreadable:
                                    row[i] = ""  # reported; the row's other cells are still checked
                                    bad.add(name)
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
                return
            except UnicodeDecodeError:
                lenient = True  # happens once: surrogateescape decodes any byte
            except csv.Error as error:
                problems.add(file, f"row {rowno + 1}", None, f"cannot be read as CSV: {error}")
                return

    def _generate_inline(self, src: Inline, problems: Problems, on_item: Callable[[str, str, str], None],
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
                    except RefError as error:
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
                    report("prompt", "missing: give the row a prompt in its prompt column" if self._csv_job
                           else "missing: give the item a prompt, or set prompt: (a template) in the manifest")
                    ok = False
                else:
                    if values is None:
                        values = dict(metadata)
                        values["id"] = item_id  # naming.PROMPT_BUILTIN_FIELDS
                    if variant.values:
                        values.update(variant.values)
                    missing = [f for f in template.fields if not values.get(f) and f not in bad_fields]
                    if missing:
                        # The item's own fields (its CSV columns), apart from what every item has: listing
                        # `id` among them would read as a column the CSV does not have.
                        own = ", ".join(sorted(k for k, v in metadata.items() if v)) or "no filled-in fields"
                        shared = ", ".join("{" + f + "}" for f in (*naming.PROMPT_BUILTIN_FIELDS, *variant.values))
                        report("prompt", at_item=True, message="the template uses "
                                     + ", ".join("{" + f + "}" for f in dict.fromkeys(missing))
                                     + f", which this item does not have or leaves empty; it has: {own}; "
                                     f"every item also has {shared}")
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
            hit = resolve_ref(ref, base, field_name)
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


class RefError(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def resolve_ref(ref: str, base: Path, field_name: str) -> str:
    """A reference as the request holds it: an http(s) URL untouched, a local path made absolute."""
    if is_remote(ref):
        return ref
    if "://" in ref or ref.startswith("data:"):
        raise RefError(field_name, f'"{ref[:80]}" is neither an http(s) URL nor a local file path')
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


def stat_part(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"
