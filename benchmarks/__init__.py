"""batchgen's benchmarks: how close it runs to the limit the API sets (issue 8).

`python -m benchmarks [--quick] [--only NAME] [--runs K]` (or `make bench`) runs each scenario against the
built-in emulator, started in its own process on 127.0.0.1, and prints a table of figures, bounds, ratios
and PASS/MISS against the targets. Never part of the test suite; figures and how they were taken are in
docs/benchmarks.md.
"""
