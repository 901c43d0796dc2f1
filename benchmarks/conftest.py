"""pytest-benchmark entry point: ``pytest benchmarks/ --benchmark-only [--bench-quick] [-k rope]``.

Without ``--benchmark-only`` (``pytest benchmarks/`` in a test run) every case runs at the quick
sizes, as a smoke test; measurements need ``--benchmark-only``.

Each test is one (suite, workload, provider, pass) of the ProviderSuites (the kernel ops and the
whole step), one (budget, method) of the packing suite, or one (mix, model, mode) of the sampling
suite; providers that cannot run here are skipped with their reason, and a provider whose output
disagrees with the reference fails without being timed. The CLI (``python -m benchmarks``) measures the same things and writes
the CSV; this entry point gives pytest-benchmark's tables, comparisons and JSON.
"""
import pytest


def bench_quick(config) -> bool:
    """Quick shapes with --bench-quick, and in a plain test run (without --benchmark-only), where the
    benchmarks are a smoke test of the harness rather than measurements."""
    return bool(config.getoption("--bench-quick") or not config.getoption("benchmark_only", default=False))


def pytest_addoption(parser):
    g = parser.getgroup("nit-benchmarks")
    g.addoption("--bench-quick", action="store_true", help="tiny shapes and one round (the CLI's --quick)")
    g.addoption("--bench-compile", action="store_true", help="run torch.compile providers in --bench-quick too")


def pytest_generate_tests(metafunc):
    from benchmarks import harness

    opts = harness.RunOptions(quick=bench_quick(metafunc.config))
    if "packing_id" in metafunc.fixturenames:
        suite = harness.load_suites()["packing"]
        ids = [(budget, method) for budget in suite.budgets(opts) for method in suite.method_names]
        metafunc.parametrize("packing_id", ids, ids=[f"packing/budget-{b}/{m}" for b, m in ids])
    if "sampling_id" in metafunc.fixturenames:
        from benchmarks.bench_sampling import MODES

        suite = harness.load_suites()["sampling"]
        ids = [(mix, m, mode) for m in suite.models(opts) for mix in suite.mixes() for mode in MODES]
        metafunc.parametrize("sampling_id", ids, ids=[f"sampling/{mix}/{m}/{mode}" for mix, m, mode in ids])
    if "bench_id" not in metafunc.fixturenames:
        return
    ids = []
    for suite in harness.load_suites().values():
        if not isinstance(suite, harness.ProviderSuite):
            continue
        for wl in suite.workloads(opts):
            for provider in suite.providers:
                ids += [(suite.name, wl.name, provider, p) for p in suite.passes]
    metafunc.parametrize("bench_id", ids, ids=["/".join(i) for i in ids])


@pytest.fixture(scope="session")
def bench_opts(request):
    import torch

    from benchmarks import harness

    quick = bench_quick(request.config)
    compiled = True if request.config.getoption("--bench-compile") else None
    return harness.RunOptions(quick=quick, compile=compiled, devices=["cuda" if torch.cuda.is_available() else "cpu"])
