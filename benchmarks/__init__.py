"""Benchmarks of nit_kernels: one harness, many suites.

Run:
    python -m benchmarks [--quick] [--filter REGEX] [--suite NAME] [--out CSV | --record]
    pytest benchmarks/ --benchmark-only [--bench-quick]     (pytest-benchmark)
    python -m benchmarks.plot [--csv CSV]                  (PNG plots + results/SUMMARY.md)

Each suite measures one thing and yields CSV rows (columns: harness.COLUMNS, explained in
results/README.md). Kernel suites (bench_adaln, bench_rope, bench_attention) are
``ProviderSuite``s: workloads x providers x passes (fwd, bwd, fwd+bwd), every provider checked
against the reference before it is timed.

Adding a suite:
  1. Write ``benchmarks/bench_<name>.py`` with a ``harness.Suite`` subclass and call
     ``harness.register(MySuite())`` at import. For workloads x providers x passes derive from
     ``harness.ProviderSuite`` and implement ``workloads``, ``make_case``, ``work`` (bytes, flops
     or tokens done by one call of a pass) and ``verify``; its providers are ``ProviderSpec``s whose
     set-up returns a ``Prepared`` or raises ``Skip(reason)``. For anything else (e.g. packing
     efficiency) implement ``Suite.run`` and yield lists of row dicts with the columns you fill.
  2. Nothing else: every benchmarks/bench_*.py is imported by ``harness.load_suites()`` (an import
     error is reported as an ``error`` row, not hidden); ``harness.SUITE_MODULES`` only fixes the order.
  3. ``python -m benchmarks --quick --suite <name>`` must run in seconds: tests/test_benchmarks.py
     runs every registered suite in quick mode.
"""
