"""pytest-benchmark entry point: ``pytest benchmarks/ --benchmark-only [--bench-quick] [-k rope]``.

Each test is one (suite, workload, provider, pass) of the ProviderSuites; providers that cannot
run here are skipped with their reason, and a provider whose output disagrees with the reference
fails without being timed. The CLI (``python -m benchmarks``) measures the same things and writes
the CSV; this entry point gives pytest-benchmark's tables, comparisons and JSON.
"""
import pytest


def pytest_addoption(parser):
    g = parser.getgroup("nit-benchmarks")
    g.addoption("--bench-quick", action="store_true", help="tiny shapes and one round (the CLI's --quick)")
    g.addoption("--bench-compile", action="store_true", help="run torch.compile providers in --bench-quick too")


def pytest_generate_tests(metafunc):
    if "bench_id" not in metafunc.fixturenames:
        return
    from benchmarks import harness

    opts = harness.RunOptions(quick=metafunc.config.getoption("--bench-quick"))
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

    quick = request.config.getoption("--bench-quick")
    compiled = True if request.config.getoption("--bench-compile") else None
    return harness.RunOptions(quick=quick, compile=compiled, devices=["cuda" if torch.cuda.is_available() else "cpu"])
