"""Benchmarks: run each one as a module from the repository root (``python -m bench.email``).

They start their own servers on free ports, print a table and update ``BENCHMARKS.md``. They are
never collected as tests.
"""
