"""litefleet benchmarks: each prints our figure beside the raw baseline measured in the same run.

Run one with ``.venv/bin/python -m bench.NAME [--quick] [--json]``; results and the commands
that produced them are recorded in docs/benchmarks.md.
"""
