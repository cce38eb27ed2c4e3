"""`python -m batchgen` is the `batchgen` command (tests and benchmarks start subprocesses this way)."""

from batchgen.cli import main

main()
