"""A CSV of items, opened: its header read and checked once up front (the rows stream later), and the column
layout the row loop reads cells by (parameter columns, metadata columns, the id column).

File-level mistakes (a header that is not UTF-8, an empty file, repeated column names) are found here, before
any row; a row's bytes that are not UTF-8 are found by the stream (`expand.py`), with the message `not_utf8`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from batchgen.manifest.problems import Problems
from batchgen.manifest.values import PARAM_SET

ID_FIELD_CANDIDATES: tuple[str, ...] = ("id", "sku", "name")

# What reading with errors="surrogateescape" makes of a byte that is not UTF-8: U+DC80..U+DCFF, which no
# UTF-8 text can hold, so finding one in a cell finds the bad byte.
UNDECODED = re.compile("[\udc80-\udcff]")


def not_utf8(cell: str) -> str:
    """The message for a cell (read with surrogateescape) that holds bytes that are not UTF-8: the cell near
    its first bad byte, with the bytes shown as \\xNN, and what to do."""
    found = UNDECODED.search(cell)
    first = found.start() if found else 0
    start, end = max(0, first - 25), first + 25
    shown = cell[start:end].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    shown = ("..." if start else "") + shown + ("..." if end < len(cell) else "")
    byte = ord(cell[first]) - 0xDC00 if found else 0
    return (f'"{shown}" is not UTF-8 text (byte 0x{byte:02X}; the file was saved in another encoding, such as '
            'Windows-1252); save the CSV as UTF-8 ("CSV UTF-8" in Excel)')


@dataclass
class CsvSource:
    path: Path
    display: str
    header: list[str]
    param_cols: list[tuple[str, int]]
    meta_cols: list[tuple[str, int]]
    id_col: int | None


def csv_id_name(src: CsvSource | None) -> str | None:
    if src is None or src.id_col is None:
        return None
    return src.header[src.id_col]


def auto_id_field(columns: set[str] | list[str]) -> str | None:
    present = {c.lower(): c for c in columns}
    for candidate in ID_FIELD_CANDIDATES:
        if candidate in present:
            return present[candidate]
    return None


def open_csv(path: Path, display: str, *, id_field: str | None, matrix_names: frozenset[str],
             problems: Problems, display_of_manifest: str, id_line: str | None = None) -> CsvSource | None:
    """Read a CSV's header (and make sure it has a data row); the rows stream later."""
    try:
        # surrogateescape: a byte that is not UTF-8 is found in its cell, so the header's is reported here
        # and a row's by the row (the stream reads them); strict decoding fails a whole buffer, placeless.
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.reader(fh, strict=True)
            header = next(reader, None)
            first_row = None
            for row in reader:
                if any(c.strip() for c in row):
                    first_row = row
                    break
    except csv.Error as error:
        problems.add(display, None, None, f"cannot be read as CSV: {error}")
        return None
    except OSError as error:
        problems.add(display, None, None, f"cannot be read: {error.strerror}")
        return None
    if header is None or not any(h.strip() for h in header):
        problems.add(display, None, None, "is empty; the first row must name the columns (prompt, ...)")
        return None
    if first_row is None:
        problems.add(display, None, None, "has a header but no rows")
        return None
    unreadable = [i for i, h in enumerate(header) if UNDECODED.search(h)]
    for i in unreadable:
        problems.add(display, "row 1", None, f"the header, column {i + 1}: {not_utf8(header[i])}")
    if unreadable:
        return None  # the columns' names are what every row is read by
    names = [h.strip() for h in header]
    param_cols: list[tuple[str, int]] = []
    meta_cols: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            continue  # unnamed columns (a spreadsheet's trailing commas) are ignored
        if name in seen:
            problems.add(display, "row 1", name, f"column {i + 1} has the same name as column {seen[name] + 1}")
            continue
        seen[name] = i
        if name in matrix_names:
            problems.add(display, "row 1", name, f"the column {name} is also a matrix variable in "
                         f"{display_of_manifest}; rename or remove one")
            continue
        (param_cols if name in PARAM_SET else meta_cols).append((name, i))
    id_col: int | None = None
    if id_field is not None:
        if id_field not in seen:
            problems.add(display_of_manifest, id_line, "id_field", f'"{id_field}" is not a column of {display}; '
                         f"columns: {', '.join(n for n in names if n)}")
        else:
            id_col = seen[id_field]
    else:
        auto = auto_id_field([n for n in seen if n not in PARAM_SET])
        id_col = seen[auto] if auto is not None else None
    return CsvSource(path=path.absolute(), display=display, header=names, param_cols=param_cols,
                     meta_cols=meta_cols, id_col=id_col)
