"""pytest-benchmark runs of the suites (see conftest.py); not part of `make test`."""
import pytest
import torch

from benchmarks import harness
from benchmarks.bench_sampling import TOLERANCE

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


def test_sampling(benchmark, sampling_id, bench_opts):
    from nit_model.sampling import sample_tokens

    mix, model_name, mode = sampling_id
    suite = harness.load_suites()["sampling"]
    sizes, per_size = suite.mixes()[mix]
    model = suite.build_model(model_name, bench_opts.seed)
    req = [tuple(s) for s in sizes for _ in range(per_size)]
    labels = [j % model.config.num_classes for _ in sizes for j in range(per_size)]
    kw = dict(steps=suite.steps_reps(bench_opts)[0], cfg_scale=3.0, seed=bench_opts.seed, progress=False)
    with torch.no_grad():  # the two modes must give the same images before either is timed
        packed = sample_tokens(model, req, labels, **kw)
        alone = sample_tokens(model, req, labels, per_resolution=True, **kw)
    diff = max(float((a - b).abs().max()) for a, b in zip(packed, alone))
    if diff > TOLERANCE:
        pytest.fail(f"packed and per-resolution sampling disagree by {diff:.1e} (not timed)")
    benchmark.pedantic(lambda: sample_tokens(model, req, labels, per_resolution=mode == "per-resolution", **kw),
                       rounds=max(bench_opts.min_reps, 1), warmup_rounds=bench_opts.warmup)
    benchmark.extra_info.update(images=len(req), images_per_s=len(req) / benchmark.stats.stats.median,
                                check=f"ok: largest |packed - per-resolution| {diff:.1e}", config=f"{mix}/{model_name}")
