"""The `batchgen` command line: parse options, call one core function, map our errors to exit codes.

This is the only module that imports click. Core modules are imported inside each command so that
`batchgen --help` stays fast and a broken optional part cannot stop the others from working.

Exit codes: 0 all done; 1 finished with requests failed for good; 2 bad input, nothing sent;
3 stopped early and resumable (signal, budget, runtime limit, 401/402, database held by another run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from batchgen import __version__
from batchgen.errors import BatchgenError, ConfigError, ManifestError
from batchgen.units import credits_text, plural

F = TypeVar("F", bound=Callable[..., Any])

API_KEY_ENV = "EVOLINK_API_KEY"
API_KEYS_ENV = "EVOLINK_API_KEYS"
API_BASE_ENV = "EVOLINK_API_BASE"
FILES_BASE_ENV = "EVOLINK_FILES_BASE"
TRACEBACK_ENV = "BATCHGEN_TRACEBACK"
DB_URL_ENV = "BATCHGEN_DB_URL"
DB_HELP = (f"State database: a SQLite file (default: beside the manifest) or a postgresql://user@host:5432/dbname "
           f"URL shared by many runners [env {DB_URL_ENV}]; the password only from PGPASSWORD or ~/.pgpass.")
JOB_HELP = "The job's name in a shared (PostgreSQL) database (default: the manifest's name)."


def _fail(error: BatchgenError, *, as_json: bool = False) -> None:
    """Report an expected error without a traceback and exit with its code. With --json, also one `error`
    object on stdout, so a script reading the JSON learns why there is nothing else."""
    if isinstance(error, ManifestError):
        count = len(error.problems) + error.truncated
        headline = f"the manifest has {plural(count, 'problem')}; nothing was sent"
        click.echo(f"error: {headline}:", err=True)
        for line in str(error).splitlines():
            click.echo(f"  {line}", err=True)
    else:
        headline = str(error)
        click.echo(f"error: {error}", err=True)
    if as_json:
        body: dict[str, Any] = {"event": "error", "t": round(time.time(), 3), "exit_code": error.exit_code,
                                "message": headline}
        if isinstance(error, ManifestError):
            body["problems"] = [{"file": p.file, "location": p.location, "field": p.field, "message": p.message}
                                for p in error.problems]
            body["more_problems"] = error.truncated
        click.echo(json.dumps(body, ensure_ascii=False))
    sys.exit(error.exit_code)


def _guarded(fn: F) -> F:
    """Run a command body; turn BatchgenError into a message and an exit code. Bugs still crash loudly."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BatchgenError as error:
            if os.environ.get(TRACEBACK_ENV):
                raise
            _fail(error, as_json=bool(kwargs.get("as_json") or kwargs.get("json_events")))

    return wrapper  # type: ignore[return-value]


def _resolve_db(manifest: str | None, db: str | None, job: str | None = None,
                must_exist: bool = True) -> tuple[str | Path, str | None]:
    """The database a command works on (--db / BATCHGEN_DB_URL, or the file beside MANIFEST) and the job in
    it (--job, or the manifest's name; None lets a shared database with one job name it)."""
    from batchgen.store.scrub import is_database_url

    _check_db(db)
    if db and is_database_url(db):
        if job is None and manifest:
            from batchgen.manifest.load import load_job

            job = load_job(Path(manifest)).name
        return db, job
    if db:
        path = Path(db)
    elif manifest:
        from batchgen.manifest.load import load_job

        path = load_job(Path(manifest)).default_db_path()
    else:
        raise ConfigError("name a MANIFEST or give --db PATH")
    if must_exist and not path.exists():
        raise ConfigError(f"no run state at {path}: run `batchgen run` on the manifest first")
    return path, job


def _check_db(db: str | None) -> None:
    """A --db that looks like a URL must be a PostgreSQL one (it would otherwise become a file name)."""
    from batchgen.store.scrub import is_database_url, scrub_url

    if db and "://" in db and not is_database_url(db):
        raise ConfigError(f"--db {scrub_url(db)}: not a path and not a postgresql://user@host:5432/dbname URL")


def _check_base_url(param: str, value: str | None, env: str) -> None:
    """A base-URL option must be an http(s) URL: exit 2 naming the flag or the environment variable that
    gave it (a typo would otherwise be sent, fail like a dead server and be retried for the whole patience)."""
    from click.core import ParameterSource

    from batchgen.units import parse_http_url

    if value is None:
        return
    source = click.get_current_context().get_parameter_source(param)
    given = env if source is ParameterSource.ENVIRONMENT else "--" + param.replace("_", "-")
    try:
        parse_http_url(value)
    except ValueError as error:
        raise ConfigError(f"{given}: {error}") from None


def _store_options(fn: F) -> F:
    """--db and --job, the same on every command that works on a job's state (resolved by _resolve_db)."""
    fn = click.option("--job", metavar="NAME", help=JOB_HELP)(fn)
    return click.option("--db", envvar=DB_URL_ENV, metavar="PATH|URL", help=DB_HELP)(fn)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchgen")
def main() -> None:
    """batchgen: run thousands of image generations through the Evolink API, resumably.

    \b
    Quick start (no API key needed, runs on the built-in emulator):
      batchgen run examples/quickstart.yaml --emulator

    Set BATCHGEN_TRACEBACK=1 to see full tracebacks for reported errors.
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def models(as_json: bool) -> None:
    """List the image models batchgen knows, with their sizes and capabilities.

    \b
    Example:
      batchgen models --json | jq '.[].name'
    """
    from dataclasses import asdict

    from batchgen import catalog

    rows = [asdict(m) for m in catalog.MODELS.values()]
    if as_json:
        _echo_json(rows)
        return
    click.echo(f"{'model':34} {'kind':6} {'credits/img':>11}  {'needs images':12} {'mask':4}  capabilities")
    for m in catalog.MODELS.values():
        click.echo(
            f"{m.name:34} {'beta' if m.beta else 'stable':6} {credits_text(m.credits_per_image):>11}  "
            f"{'yes' if m.requires_images else 'no':12} {'yes' if m.supports_mask else 'no':4}  "
            f"{', '.join(m.capabilities)}"
        )
    click.echo("\nAll models take ratio sizes " + ", ".join(catalog.RATIO_SIZES)
               + "; GPT models also take " + ", ".join(catalog.PIXEL_SIZES) + ".")
    click.echo("Credit prices are the emulator's estimates; the API's usage figures are authoritative.")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_guarded
def validate(manifest: str, as_json: bool) -> None:
    """Check a manifest completely and estimate its cost; sends nothing.

    Prints the number of requests per model, the number of images and the estimated credits.
    Exits 2 and lists every problem (file, row or line, field, what is allowed) if there are any.

    \b
    Example:
      batchgen validate examples/catalogue.yaml
    """
    from batchgen.manifest.load import validate as validate_manifest

    summary = validate_manifest(Path(manifest))
    if as_json:
        _echo_json(summary.to_dict())
        return
    click.echo(f"{manifest}: OK — {plural(summary.requests, 'request')}, {plural(summary.images, 'image')}, "
               f"about {credits_text(summary.credits)} credits (estimate)")
    for model, row in sorted(summary.by_model.items()):
        requests, images = plural(row.requests, "request", width=8), plural(row.images, "image", width=8)
        click.echo(f"  {model:34} {requests:17} {images:15} {credits_text(row.credits):>10} credits")
    share = summary.cap_share()
    if share is not None:
        click.echo(f"note: run.max_credits is {credits_text(summary.max_credits or 0)}: a run stops there, after about "
                   f"{share:.0%} of this estimate (raise it, or pass a higher --max-credits)")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@_store_options
@click.option("--out", help="Output folder, or a bucket: s3://bucket/prefix (default: the manifest's).")
@click.option("--emulator", is_flag=True, help="Run against the built-in emulator (no key, no credits).")
@click.option("--api-base", envvar=API_BASE_ENV, help=f"API base URL [env {API_BASE_ENV}].")
@click.option("--files-base", envvar=FILES_BASE_ENV, help=f"Files API base URL [env {FILES_BASE_ENV}].")
@click.option("--rate", help='Request budget for all API calls, e.g. "5/s" or "300/min".')
@click.option("--concurrency", type=click.IntRange(1, 1000), help="Most tasks in flight at once.")
@click.option("--max-credits", type=click.FloatRange(min=0, min_open=True),
              help="Stop submitting before the job's spend, over all its runs, would pass X credits.")
@click.option("--max-runtime", help='Stop submitting in time to end within this, e.g. "50m".')
@click.option("--patience", help='Stop (resumably, exit 3) once every API call has failed for this long '
              '(default: run.patience, 5m).')
@click.option("--json", "json_events", is_flag=True, help="One JSON event per line instead of a progress line.")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Shrink client-side waits by this factor; with --emulator also the emulator's "
                   "time scale (default 0.05 with --emulator, else 1).")
@click.option("--emulator-seed", type=int, help="With --emulator: seed for its random choices.")
@click.option("--emulator-scenario", type=click.Path(dir_okay=False, exists=True),
              help="With --emulator: fault-injection scenario YAML.")
@click.option("--keys-file", type=click.Path(dir_okay=False),
              help="Several API keys, one a line (optional label=NAME rate=N/s after each); see docs/keys.md.")
@_guarded
def run(manifest: str, db: str | None, job: str | None, out: str | None, emulator: bool, api_base: str | None,
        files_base: str | None, rate: str | None, concurrency: int | None, max_credits: float | None,
        max_runtime: str | None, patience: str | None, json_events: bool, time_scale: float | None,
        emulator_seed: int | None, emulator_scenario: str | None, keys_file: str | None) -> None:
    """Run a job to completion; running the same command again resumes it.

    The API key comes from EVOLINK_API_KEY (not needed with --emulator); several keys from
    EVOLINK_API_KEYS (comma-separated) or --keys-file, with --rate the rate of each key. New rows added to the
    manifest since the last run are picked up; finished requests are never generated again.

    \b
    Examples:
      batchgen run examples/quickstart.yaml --emulator
      EVOLINK_API_KEY=sk-evo-... batchgen run jobs/nightly.yaml --rate 300/min --max-runtime 50m --json
    """
    from batchgen.engine import collector

    collector.tune_process()  # this process exists for this run: the collector runs seldom, and not at exit
    from batchgen.models import RunOptions
    from batchgen.units import parse_duration_s, parse_rate

    try:
        if rate is not None:
            parse_rate(rate)
        runtime_s = parse_duration_s(max_runtime) if max_runtime is not None else None
        if patience is not None:
            parse_duration_s(patience)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not emulator:  # --emulator serves the run from its own emulator and ignores both
        _check_base_url("api_base", api_base, API_BASE_ENV)
        _check_base_url("files_base", files_base, FILES_BASE_ENV)
    api_key = os.environ.get(API_KEY_ENV) or None
    api_keys = os.environ.get(API_KEYS_ENV) or None
    if not emulator and not api_key and not api_keys and not keys_file:
        raise ConfigError(f"no API key: set {API_KEY_ENV} (several: {API_KEYS_ENV} or --keys-file), or pass "
                          "--emulator to run on the built-in emulator")
    from batchgen.store.scrub import is_database_url

    _check_db(db)
    options = RunOptions(
        db_path=Path(db) if db and not is_database_url(db) else None,
        db_url=db if db and is_database_url(db) else None,
        job=job,
        out_dir=(out if out.startswith("s3://") else Path(out)) if out else None,
        emulator=emulator,
        api_base=api_base,
        files_base=files_base,
        api_key=api_key,
        api_keys=api_keys,
        keys_file=Path(keys_file) if keys_file else None,
        rate=rate,
        concurrency=concurrency,
        max_credits=max_credits,
        max_runtime_s=runtime_s,
        patience=patience,
        json_events=json_events,
        time_scale=time_scale if time_scale is not None else (0.05 if emulator else 1.0),
        emulator_seed=emulator_seed,
        emulator_scenario=Path(emulator_scenario) if emulator_scenario else None,
    )
    from batchgen.engine.runner import run_job

    sys.exit(run_job(Path(manifest), options))


@main.command()
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys: total, pending, in_flight, done, "
              "failed, credits, images, ...).")
@_guarded
def status(manifest: str | None, db: str | None, job: str | None, as_json: bool) -> None:
    """Show a job's progress: requests by state, credits, images saved, failures by error code.

    \b
    Examples:
      batchgen status examples/quickstart.yaml
      batchgen status --db examples/quickstart.batchgen.db --json
    """
    from batchgen.results.status import collect, render_text

    summary = collect(*_resolve_db(manifest, db, job))
    if as_json:
        _echo_json(summary)
    else:
        click.echo(render_text(summary))


@main.command()
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@_store_options
@click.option("--code", "codes", multiple=True, help="Only requests that failed with this error code "
              "(repeatable).")
@click.option("--abandon-tasks-of-key", "lost_keys", multiple=True, metavar="KEY",
              help="Instead of failed requests: give up the tasks left open on this key (label or fingerprint, "
              "as the run names it; repeatable), e.g. a revoked one, and requeue their requests for the next "
              "run's keys. They may be paid for twice.")
@_guarded
def retry(manifest: str | None, db: str | None, job: str | None, codes: tuple[str, ...],
          lost_keys: tuple[str, ...]) -> None:
    """Requeue failed requests so the next `batchgen run` tries them again.

    \b
    Examples:
      batchgen retry examples/quickstart.yaml
      batchgen retry --db jobs/nightly.batchgen.db --code generation_timeout --code upstream_error
      batchgen retry examples/quickstart.yaml --abandon-tasks-of-key team-c
    """
    from batchgen.store.open import open_store

    if lost_keys and codes:
        raise ConfigError("--abandon-tasks-of-key and --code do different things: run retry once for each")
    with open_store(*_resolve_db(manifest, db, job)) as store:
        if lost_keys:
            from batchgen.store.lost_tasks import abandon_tasks_of_keys

            gave_up = abandon_tasks_of_keys(store, lost_keys)
            click.echo(f"gave up {plural(gave_up.requeued, 'task')} of {', '.join(gave_up.keys)} (their task ids "
                       "are kept) and requeued their requests; the next run submits them with its own keys")
            return
        count = store.requeue_failed(list(codes) or None)
    click.echo(f"requeued {plural(count, 'failed request')}; run the job again to retry them")


@main.command()
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@_store_options
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write (default, or -: stdout).")
@click.option("--per-request", is_flag=True, help="One row per request instead of one per image.")
@_guarded
def export(manifest: str | None, db: str | None, job: str | None, fmt: str, output: str | None,
           per_request: bool) -> None:
    """Export results: one row per image with the item's own columns, ready for a shop import.

    \b
    Examples:
      batchgen export examples/catalogue.yaml -o images.csv
      batchgen export --db jobs/nightly.batchgen.db --format jsonl --per-request
    """
    from batchgen.results.export import export_results

    target, job = _resolve_db(manifest, db, job)
    output = None if output == "-" else output
    count = export_results(target, job=job, fmt=fmt, output=Path(output) if output else None,
                           per_request=per_request)
    if output:
        click.echo(f"wrote {plural(count, 'row')} to {output}", err=True)


@main.command()
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@_store_options
@click.option("-o", "--output", default=None,
              help="HTML file to write (- for stdout), or s3://bucket/prefix/name.html (default: report.html in "
                   "the output folder or bucket).")
@_guarded
def report(manifest: str | None, db: str | None, job: str | None, output: str | None) -> None:
    """Write a self-contained HTML contact sheet of a job's images and failures.

    \b
    A report beside a job's images in a bucket links them by relative keys; a local report of such a job
    links them by presigned URLs that expire after 7 days (its thumbnails are local files and stay).

    \b
    Example:
      batchgen report examples/catalogue.yaml -o report.html
    """
    from batchgen.results.report import LINK_LIFETIME_S, links_are_presigned, write_report
    from batchgen.storage.atomicfile import is_special

    target, job = _resolve_db(manifest, db, job)
    output = "/dev/stdout" if output == "-" else output  # written into as it is (storage/atomicfile.py)
    report_to = (output if output.startswith("s3://") else Path(output)) if output else None
    # A report into /dev/stdout or a pipe: our lines must not end up after its </html>.
    to_stderr = report_to is not None and is_special(report_to)
    path, tiles = write_report(target, report_to, job_name=job)
    click.echo(f"wrote {path} ({plural(tiles, 'tile')})", err=to_stderr)
    if links_are_presigned(target, report_to, job):
        click.echo(f"its links to the images in the bucket are presigned URLs valid for {LINK_LIFETIME_S // 86400} "
                   "days; the thumbnails are local files beside it", err=to_stderr)


@main.command()
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@_store_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but 127.0.0.1 lets other machines try the token.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 picks a free port.")
@click.option("--no-browser", is_flag=True, help="Only print the URL; do not open a browser.")
@_guarded
def review(manifest: str | None, db: str | None, job: str | None, host: str, port: int, no_browser: bool) -> None:
    """Serve the contact sheet on 127.0.0.1 to approve or reject images (click, or the keys a and r).

    Prints a URL with a random token; requests without it are refused. Decisions are saved at once;
    the next `batchgen run` regenerates the rejected images within max_attempts and --max-credits.
    The images are read from the job's local output folder (a job whose images are in a bucket: use
    `batchgen report`).

    \b
    Examples:
      batchgen review examples/catalogue.yaml
      batchgen review --db postgresql://batch@db.internal:5432/batchgen --job nightly --port 8800 --no-browser
    """
    from batchgen.results.review import serve

    def ready(url: str) -> None:
        click.echo(f"batchgen review: {url}  (Ctrl-C to stop)")
        sys.stdout.flush()
        if host not in ("127.0.0.1", "localhost", "::1"):
            click.echo(f"warning: listening on {host}: other machines can reach this page; keep the token secret",
                       err=True)
        if not no_browser:
            import webbrowser

            webbrowser.open(url)

    target, job_name = _resolve_db(manifest, db, job)
    serve(target, job_name=job_name, host=host, port=port, on_ready=ready)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but 127.0.0.1 lets other machines use it.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="0 picks a free port.")
@click.option("--api-key", "api_keys", multiple=True,
              help="Accept only this Bearer key (repeatable); default: any non-empty key.")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply every emulated duration (latency, estimated_time, Retry-After, expiry).")
@click.option("--seed", type=int, default=None, help="Seed for every random choice (reproducible runs).")
@click.option("--rate-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Requests per second per key across all API calls; over it, 429 with Retry-After.")
@click.option("--rate-limit-burst", type=click.IntRange(min=1), default=None,
              help="With --rate-limit: a token bucket of this many requests instead of a sliding 1 s window.")
@click.option("--scenario", type=click.Path(dir_okay=False, exists=True),
              help="Fault-injection scenario YAML (probabilities and deterministic rules).")
@_guarded
def emulator(host: str, port: int, api_keys: tuple[str, ...], time_scale: float, seed: int | None,
             rate_limit: float | None, rate_limit_burst: int | None, scenario: str | None) -> None:
    """Serve the built-in emulator of the Evolink API until Ctrl-C.

    Generation, tasks, batch polls, credits and the Files API on one port; stats at /_emulator/stats.

    \b
    Example:
      batchgen emulator --port 8765 --time-scale 0.1 --seed 7
      EVOLINK_API_KEY=test EVOLINK_API_BASE=http://127.0.0.1:8765 \\
        EVOLINK_FILES_BASE=http://127.0.0.1:8765 batchgen run examples/quickstart.yaml
    """
    from batchgen.emulator import EmulatorConfig, serve_forever
    from batchgen.engine.keyfile import key_problem

    for pos, key in enumerate(api_keys, start=1):  # a key no client can send would refuse every call
        problem = key_problem(key)
        if problem is not None:
            raise ConfigError(f"--api-key: key {pos} {problem}")
    config = EmulatorConfig.from_options(
        api_keys=list(api_keys), time_scale=time_scale, seed=seed, rate_limit=rate_limit,
        scenario_path=Path(scenario) if scenario else None, rate_limit_burst=rate_limit_burst,
    )
    serve_forever(config, host=host, port=port)


if __name__ == "__main__":
    main()
