"""Benchmark harness for xapid (``make bench``; ``make bench-smoke`` for the tiny mode).

Every figure is measured against the limit of xapid's own stack in the same run: a bare
standard-library XML-RPC server answering a constant (:mod:`bench.baseline`).  The large
databases are built offline through :mod:`bench.bulk`; :mod:`bench.run` drives everything and
writes the table and ``bench/results.json``.
"""
