"""Scenario 4 — scale: memory of validate and of the expansion into the store, and the expansion rate.

A catalogue of a million rows must not need a bigger machine than a catalogue of ten thousand: rows stream
from the CSV, are checked, keyed and written in chunks, and nothing per row stays in memory. This
scenario measures that, at 10,000, 100,000 and 1,000,000 CSV rows (`--quick`: the first two):

* peak RSS of `batchgen validate ROWS.csv` (its own process; expansion and every check, nothing written);
* peak RSS and wall time of the expansion into the store: a child process that runs exactly what
  `batchgen run` does first, `Store(db).sync(open_manifest(csv))`, timed inside the child around that call;
* the physical limit of the store: another child copies the very same rows (read back from the expanded
  database) with a plain `sqlite3` `executemany` into a fresh database with the same `requests` table and
  index, the same pragmas (WAL, synchronous=NORMAL) and chunks of 5,000 in one transaction; only the
  `executemany` calls and the commit are timed.

Targets: peak memory under 150 MB at 1M rows, growing by less than 20% from 100k to 1M rows; expansion at
least a third as fast as the raw insert (ratio = expansion rate / raw rate, measured in the same run).
The CSVs are generated once per invocation in the work directory (a direct CSV job: prompt, model, size,
an id and two metadata columns).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.harness import Row, batchgen_cmd, check, fresh_dir, median, run_child, write_csv

MEMORY_LIMIT_MB = 150.0
GROWTH_LIMIT = 0.20
RATE_RATIO_TARGET = 1 / 3

EXPAND = """
import json, sys, time
from pathlib import Path
from batchgen.manifest.load import open_manifest
from batchgen.store.sqlite import Store
started = time.perf_counter()
with Store(Path(sys.argv[2])) as store:  # argv[3]: the output folder to record (the manifest's by default)
    result = store.sync(open_manifest(Path(sys.argv[1])), *sys.argv[3:4])
print(json.dumps({"seconds": time.perf_counter() - started, "added": result.added}))
"""

RAW_INSERT = """
import json, sqlite3, sys, time
src = sqlite3.connect(sys.argv[1])
dst = sqlite3.connect(sys.argv[2], isolation_level=None)
dst.execute("PRAGMA journal_mode=WAL")
dst.execute("PRAGMA synchronous=NORMAL")
for (sql,) in src.execute("SELECT sql FROM sqlite_master WHERE tbl_name='requests' AND sql IS NOT NULL "
                          "ORDER BY type DESC"):
    dst.execute(sql)
cols = [row[1] for row in src.execute("PRAGMA table_info(requests)")]
insert = f"INSERT INTO requests ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"
cur = src.execute(f"SELECT {','.join(cols)} FROM requests ORDER BY rowid")
spent, rows = 0.0, 0
dst.execute("BEGIN")
while True:
    chunk = cur.fetchmany(5000)
    if not chunk:
        break
    t = time.perf_counter()
    dst.executemany(insert, chunk)
    spent += time.perf_counter() - t
    rows += len(chunk)
t = time.perf_counter()
dst.execute("COMMIT")
spent += time.perf_counter() - t
print(json.dumps({"seconds": spent, "rows": rows}))
"""


def _json_child(code: str, *args: str, workdir: Path, what: str) -> tuple[dict[str, float], float]:
    result = check(run_child([sys.executable, "-c", code, *args], timeout_s=1800, workdir=workdir), what)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.max_rss_mb


def measure(workdir: Path, csv_path: Path, rows: int, index: int) -> dict[str, float]:
    db, raw_db = workdir / f"scale-{rows}-{index}.db", workdir / f"raw-{rows}-{index}.db"
    validate = check(run_child(batchgen_cmd("validate", str(csv_path)), timeout_s=1800, workdir=workdir),
                     "batchgen validate")
    expand, expand_rss = _json_child(EXPAND, str(csv_path), str(db), workdir=workdir, what="expansion")
    if int(expand["added"]) != rows:
        raise RuntimeError(f"expansion added {expand['added']} of {rows} rows")
    raw, _ = _json_child(RAW_INSERT, str(db), str(raw_db), workdir=workdir, what="raw insert")
    for path in (db, raw_db):
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    expand_rate, raw_rate = rows / expand["seconds"], rows / raw["seconds"]
    return {"validate_mb": validate.max_rss_mb, "validate_s": validate.wall_s, "expand_mb": expand_rss,
            "expand_rate": expand_rate, "raw_rate": raw_rate, "ratio": expand_rate / raw_rate}


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    fresh_dir(workdir)
    per_size: dict[int, list[dict[str, float]]] = {}
    for rows in sizes:
        csv_path = write_csv(workdir / f"rows-{rows}.csv", rows, size="mixed", tag=f"s{rows}")
        per_size[rows] = [measure(workdir, csv_path, rows, i) for i in range(runs)]
        csv_path.unlink()

    def med(rows: int, key: str) -> float:
        return median([r[key] for r in per_size[rows]])

    def runs_of(rows: int, key: str) -> list[float]:
        return [r[key] for r in per_size[rows]]

    out: list[Row] = []
    largest = sizes[-1]
    for what, key in (("validate", "validate_mb"), ("expansion", "expand_mb")):
        for rows in sizes:
            value = med(rows, key)
            at_limit = rows == 1_000_000
            out.append(Row("4 scale", f"{what} peak memory, {rows:,} rows", value, "MB",
                           f"< {MEMORY_LIMIT_MB:g} MB" if at_limit else "",
                           value < MEMORY_LIMIT_MB if at_limit else None,
                           bound=f"{MEMORY_LIMIT_MB:g} MB" if at_limit else "",
                           ratio=value / MEMORY_LIMIT_MB if at_limit else None, runs=runs_of(rows, key),
                           note=f"wall {med(rows, 'validate_s'):.1f} s" if key == "validate_mb" else ""))
        if 100_000 in per_size and largest > 100_000:
            growth = med(largest, key) / med(100_000, key) - 1
            out.append(Row("4 scale", f"{what} memory growth 100k -> {largest // 1000:,}k", 100 * growth, "%",
                           f"< {100 * GROWTH_LIMIT:g}%", growth < GROWTH_LIMIT, bound=f"{100 * GROWTH_LIMIT:g}%"))
    for rows in sizes:
        ratio = med(rows, "ratio")
        out.append(Row("4 scale", f"expansion rate, {rows:,} rows", med(rows, "expand_rate"), "req/s",
                       "ratio >= 0.33", ratio >= RATE_RATIO_TARGET, bound=f"raw {med(rows, 'raw_rate'):,.0f} req/s",
                       ratio=ratio, runs=runs_of(rows, "expand_rate"), note="ratio = expansion / raw insert"))
    return out
