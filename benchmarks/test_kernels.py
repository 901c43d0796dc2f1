"""pytest-benchmark runs of the suites (see conftest.py); not part of `make test`."""
import pytest
import torch

from benchmarks import harness

# The last case and provider set-up are kept, so the three passes of one provider share them.
_CACHE: dict = {}


def _prepared(suite, workload, provider, opts):
    device = torch.device(opts.devices[0])
    key = (suite.name, workload.name)
    if _CACHE.get("case_key") != key:
        _CACHE.clear()
        try:
            case = suite.make_case(workload, device, opts.dtype_for(device.type), opts)
        except harness.Skip as e:  # the whole workload cannot run here (e.g. NiT-XL steps on CPU)
            case = e
        _CACHE.update(case_key=key, case=case)
    if isinstance(_CACHE["case"], harness.Skip):
        pytest.skip(str(_CACHE["case"]))
    if _CACHE.get("provider") != provider:
        _CACHE.update(provider=provider, result=None)
        try:
            _CACHE["result"] = suite.prepare(_CACHE["case"], suite.providers[provider], opts)
        except (harness.Skip, harness.Mismatch) as e:
            _CACHE["result"] = e
    result = _CACHE["result"]
    if isinstance(result, harness.Skip):
        pytest.skip(str(result))
    if isinstance(result, harness.Mismatch):
        pytest.fail(f"{provider} disagrees with the reference (not timed): {result}")
    return _CACHE["case"], result[0], result[1], device


def test_kernel(benchmark, bench_id, bench_opts):
    suite_name, workload_name, provider, pass_ = bench_id
    suite = harness.load_suites()[suite_name]
    workload = next(w for w in suite.workloads(bench_opts) if w.name == workload_name)
    case, prep, check, device = _prepared(suite, workload, provider, bench_opts)
    if pass_ != "fwd" and prep.no_backward:
        pytest.skip(prep.no_backward)
    run, before = suite.pass_callables(prep, pass_)

    def timed(arg=None):
        run(arg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rounds = max(bench_opts.min_reps, 1)
    if before is None:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=bench_opts.warmup)
    else:
        benchmark.pedantic(timed, setup=lambda: ((before(),), {}), rounds=rounds, warmup_rounds=bench_opts.warmup)
    median_ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(config=workload.config, device=device.type, check=check,
                                **suite.throughput(case, pass_, median_ms, None))


def test_packing(benchmark, packing_id, bench_opts):
    budget, method = packing_id
    suite = harness.load_suites()["packing"]
    lengths = suite.lengths()
    packer = suite.methods(lengths, budget)[method]
    try:
        stats, check, remark = packer()  # checked (every image once, no pack over budget) before timing
    except AssertionError as e:
        pytest.fail(f"{method} produced an invalid packing (not timed): {e}")
    benchmark.pedantic(packer, rounds=max(bench_opts.min_reps, 1), warmup_rounds=bench_opts.warmup)
    benchmark.extra_info.update(efficiency=stats.efficiency, batches=stats.num_batches, check=check, remark=remark,
                                config=f"{len(lengths)} ImageNet-like images, budget {budget} tokens")
