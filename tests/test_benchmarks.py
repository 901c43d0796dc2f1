"""The benchmark harness cannot rot: quick mode of every suite writes the documented rows, skips are
reported with reasons, every timed provider was checked against the reference, a wrong kernel is
caught and not timed, and the plot/summary and pytest-benchmark entry points run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, plot, report  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.bench_adaln import GatedResidual  # noqa: E402
from benchmarks.bench_attention import attention_flops, padding_waste, sdpa_loop_setup  # noqa: E402
from benchmarks.opsuite import OpCase  # noqa: E402
from nit_kernels import PackedSeqs, dispatch  # noqa: E402
from nit_kernels.testing import call_op, cast_inputs, op_inputs  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # on a shared 2-core machine, two OpenMP threads competing with other jobs run up to 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_cli(args):
    return main(list(args) + ["--threads", "1"])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.csv"
    rc = _run_cli(["--quick", "--out", str(path)])
    return path, rc, report.read_rows(str(path))


def _provider_suites():
    return [s for s in harness.load_suites().values() if isinstance(s, harness.ProviderSuite)]


def _kernel_suites():
    return [s for s in _provider_suites() if s.name not in ("step",)]


def test_quick_run_writes_the_documented_columns(quick):
    path, rc, rows = quick
    with open(path) as f:
        assert f.readline().strip().split(",") == list(harness.COLUMNS)
    readme = (ROOT / "benchmarks" / "results" / "README.md").read_text()
    undocumented = [c for c in harness.COLUMNS if f"`{c}`" not in readme]
    assert not undocumented, f"columns missing from benchmarks/results/README.md: {undocumented}"
    assert rows and all(r["mode"] == "quick" for r in rows)
    copy = [r for r in rows if r["suite"] == "machine"]
    assert len(copy) == 1 and float(copy[0]["throughput"]) > 0 and copy[0]["unit"] == "GB/s"
    for r in rows:
        assert r["machine"] and r["torch"] == torch.__version__ and r["commit"] and r["timestamp"]
        assert r["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


def test_every_suite_provider_and_pass_has_a_row(quick):
    _, _, rows = quick
    seen = {}
    for r in rows:
        key = (r["suite"], r["workload"], r["provider"], r["pass"])
        seen[key] = seen.get(key, 0) + 1
    opts = harness.RunOptions(quick=True)
    for suite in _provider_suites():
        want = len(suite.precisions(opts)) if hasattr(suite, "precisions") else 1  # the step suite: one per precision
        for wl in suite.workloads(opts):
            for prov in suite.providers:
                for p in suite.passes:
                    assert seen.get((suite.name, wl.name, prov, p)) == want, \
                        f"{suite.name}/{wl.name}/{prov}/{p} has {seen.get((suite.name, wl.name, prov, p), 0)} rows"


def test_nothing_failed_and_skips_say_why(quick):
    _, rc, rows = quick
    bad = [(r["suite"], r["workload"], r["provider"], r["pass"], r["status"], r["check"] or r["reason"])
           for r in rows if r["status"] not in ("ok", "skipped")]
    assert not harness.LOAD_ERRORS, harness.LOAD_ERRORS
    assert not bad, f"providers failed or disagreed with the reference: {bad[:5]}"
    assert rc == 0
    for r in rows:
        if r["status"] == "skipped":
            assert len(r["reason"]) > 10, f"skip without a reason: {r}"
            assert not r["median_ms"]
    if not torch.cuda.is_available():
        for prov in ("cuda", "triton", "flash_attn", "torch_varlen"):
            mine = [r for r in rows if r["provider"] == prov]
            assert mine and all(r["status"] == "skipped" for r in mine), prov


def test_timed_rows_were_checked_and_have_figures(quick):
    _, _, rows = quick
    ok = [r for r in rows if r["status"] == "ok" and r["suite"] != "machine"]
    assert ok
    suites = harness.load_suites()
    units = {"step": ("tokens/s",), "packing": ("images/s",), "sampling": ("images/s",)}
    for r in ok:
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80 and int(r["reps"]) >= 1
        assert float(r["throughput"]) > 0 and r["unit"] in units.get(r["suite"], ("GB/s", "GFLOP/s")), r
        assert r["check"].startswith("ok"), r
        if r["pass"] in getattr(suites[r["suite"]], "memory_passes", ()):
            assert float(r["peak_mem_mb"]) > 0 and r["mem_method"]
        if r["provider"] == "reference":
            assert float(r["speedup_vs_reference"]) == 1.0
    ref = [r for r in rows if r["provider"] == "reference" and r["suite"] not in ("machine", "step")]
    assert ref and all(r["status"] == "ok" for r in ref)


def test_kernels_that_exist_are_picked_up(quick):
    _, _, rows = quick
    cpu = dispatch.get("cpu")
    if cpu.load_error() is not None:
        pytest.skip(f"the C++ extension is not usable here: {cpu.load_error()}")
    for suite in _kernel_suites():
        mine = [r for r in rows if r["suite"] == suite.name and r["provider"] == "cpu"]
        if cpu.implements(suite.name):
            assert mine and all(r["status"] == "ok" for r in mine), suite.name
        else:
            assert all(r["status"] == "skipped" and "not implemented" in r["reason"] for r in mine)


# ---------------------------------------------------------------------------------------------
# a wrong kernel is reported as a mismatch and never timed
# ---------------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _custom(kind):
    def setup(case: OpCase):
        if kind == "absent":
            raise harness.Skip("this provider is not installed here")
        inp = case.activation_leaves()
        names = [k for k, v in inp.items() if v.requires_grad]

        def fn():
            if kind == "crash":
                raise RuntimeError("kernel launch failed")
            x = _ScaleGrad.apply(inp["x"]) if kind == "wrong_grad" else inp["x"]
            out = call_op(case.op, case.packed, dict(inp, x=x), "reference")
            return out + 1e-2 if kind == "wrong_out" else out

        return harness.Prepared(fn=fn, leaves=[inp[k] for k in names], grad_outs=case.grad_outs, leaf_names=names)
    return setup


def test_wrong_kernels_are_caught_and_not_timed():
    suite = GatedResidual()
    for kind in ("wrong_out", "wrong_grad", "crash", "absent"):
        suite.providers[kind] = harness.ProviderSpec(kind, _custom(kind), ours=True)
    opts = harness.RunOptions(quick=True, filter="fixed-256px", memory=False)
    rows = [r for group in suite.run(harness.RunContext(opts, {"cpu": 10.0})) for r in group]
    by = {}
    for r in rows:
        by.setdefault(r["provider"], []).append(r)
    assert {r["status"] for r in by["reference"]} == {"ok"}
    for kind, status in (("wrong_out", "mismatch"), ("wrong_grad", "mismatch"), ("crash", "error"),
                         ("absent", "skipped")):
        assert len(by[kind]) == 3 and {r["status"] for r in by[kind]} == {status}, (kind, by[kind])
        assert all(r.get("median_ms") is None for r in by[kind])
    assert "output 0" in by["wrong_out"][0]["check"]
    assert "dx" in by["wrong_grad"][0]["check"]
    assert "kernel launch failed" in by["crash"][0]["reason"]
    assert by["absent"][0]["reason"] == "this provider is not installed here"


def test_peak_memory_counts_temporaries_not_inputs():
    held = torch.ones(8 * 2**20)  # 32 MiB allocated before the pass: not counted

    def work():
        tmp = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB temporary
        return float(tmp[0]) + float(held[0])

    peak, method = harness.peak_memory(work, torch.device("cpu"))
    assert 64 * 2**20 <= peak < 72 * 2**20, peak / 2**20
    assert "profiler" in method


def test_byte_counts_match_the_tensors_of_the_forward():
    opts = harness.RunOptions(quick=True)
    for name in ("adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope"):
        suite = harness.load_suites()[name]
        wl = suite.workloads(opts)[0]
        packed = PackedSeqs.from_sizes(list(wl.params["sizes"]))
        d, h, dh = wl.params["dims"]
        case = OpCase(name, wl, packed, torch.float32, op_inputs(name, packed, **suite.input_shape(d, h, dh)), (), {})
        inp = cast_inputs(name, case.inputs, torch.float32, requires_grad=False)
        out = call_op(name, case.packed, inp, "reference")
        touched = sum(v.nbytes for k, v in inp.items() if k not in ("freqs", "q_weight", "q_bias", "k_weight", "k_bias"))
        touched += sum(o.nbytes for o in (out if isinstance(out, tuple) else (out,)))
        assert suite.work(case, "fwd") == (touched, "bytes"), name
        assert suite.work(case, "bwd")[0] >= sum(o.nbytes for o in (out if isinstance(out, tuple) else (out,)))


def test_attention_flops_and_padding_waste():
    fwd, bwd = attention_flops([4, 9], heads=2, head_dim=8)
    assert fwd == 4 * (16 + 81) * 2 * 8 and bwd == 2.5 * fwd
    assert padding_waste([4, 9]) == (2 * 9 - 13) / 13
    assert padding_waste([64] * 3) == 0.0


def test_sdpa_per_image_peer_passes_4d_views(monkeypatch):
    # CPU SDPA takes its fused kernel only for 4-D [B, H, L, D] inputs; 3-D ones take the math path
    suite = harness.load_suites()["varlen_attention"]
    wl = suite.workloads(harness.RunOptions(quick=True))[0]
    case = suite.make_case(wl, torch.device("cpu"), torch.float32, harness.RunOptions(quick=True))
    shapes, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kw):
        shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    prepared = sdpa_loop_setup(case)
    out = prepared.fn()
    _, h, dh = case.dims
    lens = [a * b for a, b in case.packed.size_list]
    assert shapes == [((1, h, s, dh),) * 3 for s in lens], shapes
    ref = case.reference(precise=False)[0][0]
    assert out.shape == ref.shape and torch.allclose(out.double(), ref.double(), atol=1e-4)


def test_attention_ratios_smoke(capsys):
    from benchmarks import attention_ratios

    attention_ratios.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("2 x 8x8 | tiny |")]
    assert [r.split(" | ")[2] for r in rows] == ["fwd", "fwd+bwd"], out
    assert all(len(r.split(" | ")) == 3 + 4 + 3 + 2 for r in rows), out


def test_attention_ratios_sweep_smoke(capsys, monkeypatch):
    from benchmarks import attention_ratios

    monkeypatch.setenv(attention_ratios.ENV_ISA, "fp32")
    attention_ratios.main(["--sweep", "16,40", "--sweep-tokens", "80", "--rounds", "1", "--calls", "1"])
    assert os.environ[attention_ratios.ENV_ISA] == "fp32", "the sweep did not restore the ISA setting"
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("NiT-")]
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, p, s) for m in ("NiT-S", "NiT-XL") for p in ("fwd", "bwd")
                                                  for s in ("5 x 16", "2 x 40")], out
    assert all(float(x) > 0 for r in rows for x in r[3:-2]), out


def test_compiled_providers_run_with_compile(tmp_path):
    path = tmp_path / "compiled.csv"
    rc = _run_cli(["--quick", "--compile", "--filter", "(gated_residual|varlen_attention)/fixed",
                   "--providers", "reference,reference_compiled,flex", "--out", str(path)])
    rows = report.read_rows(str(path))
    assert rc == 0
    comp = [r for r in rows if r["suite"] == "gated_residual" and r["provider"] == "reference_compiled"]
    assert len(comp) == 3 and all(r["status"] == "ok" and r["check"].startswith("ok") for r in comp)
    flex = {r["pass"]: r for r in rows if r["provider"] == "flex"}
    assert flex["fwd"]["status"] == "ok" and flex["fwd"]["check"].startswith("ok")
    if not torch.cuda.is_available():  # FlexAttention has no CPU backward in the torch used here
        assert flex["bwd"]["status"] in ("ok", "skipped") and (flex["bwd"]["status"] == "ok" or flex["bwd"]["reason"])


def test_plots_and_summary(quick, tmp_path):
    path, _, rows = quick
    assert plot.main(["--csv", str(path), "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "Quick mode" in text and rows[0]["machine"] in text
    assert "## Not measured in this run, and why" in text
    if not torch.cuda.is_available():
        assert "No GPU on this machine" in text
    for suite in harness.load_suites().values():
        assert f"## {suite.name}" in text
    assert "NiT-XL is timed on a GPU only" in text or torch.cuda.is_available()
    assert "| imagenet-50k/budget-4096 | lpfhp |" in text and "train tokens/s" in text
    assert "| 4-sizes/tiny | packed |" in text and "| 16-sizes/tiny | per-resolution |" in text
    pngs = sorted(tmp_path.glob("*.png"))
    assert {"throughput_step.png", "packing_efficiency.png", "speedup_step.png"} <= {p.name for p in pngs}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_with_other_columns_is_not_appended_to(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        report.append_rows(str(path), [{"suite": "x"}])
    with pytest.raises(ValueError, match="not in COLUMNS"):
        report.append_rows(str(tmp_path / "new.csv"), [{"nonsense": 1}])


def test_pytest_benchmark_entry_point():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "--bench-quick", "-q", "-p",
         "no:cacheprovider", "-k", "(gated_residual and fixed-256px and (reference or cuda)) or "
        "(step and fixed and tiny and reference) or (packing and lpfhp)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # gated_residual: 3 passes of reference; step: train and sample of reference; packing: lpfhp at 4096
    assert "6 passed" in out and "skipped" in out, out[-3000:]


def test_low_precision_peers_pass_the_check(tmp_path):
    # GPU runs default to bf16; here the same check runs on CPU bf16 (SDPA keeps P in bf16)
    path = tmp_path / "bf16.csv"
    rc = _run_cli(["--quick", "--dtype", "bf16", "--filter", "varlen_attention/tiny-images", "--providers",
                   "reference,sdpa_loop,sdpa_padded", "--no-memory", "--out", str(path)])
    rows = [r for r in report.read_rows(str(path)) if r["suite"] == "varlen_attention"]
    assert rc == 0 and len(rows) == 9
    assert all(r["status"] == "ok" and r["dtype"] == "bfloat16" and r["check"].startswith("ok") for r in rows)


# ---------------------------------------------------------------------------------------------
# the step and packing suites
# ---------------------------------------------------------------------------------------------
def test_step_suite_rows(quick):
    _, _, rows = quick
    step = [r for r in rows if r["suite"] == "step"]
    tiny = [r for r in step if r["workload"].endswith("/tiny")]
    assert {r["provider"] for r in tiny} == {"reference", "auto", "official"}
    assert {r["pass"] for r in tiny} == {"train", "sample"}
    assert all(r["status"] == "ok" and r["unit"] == "tokens/s" and "fp64" in r["check"] for r in tiny)
    for r in tiny:  # tokens/s is the pack's tokens over the median (both CFG halves when sampling)
        n = int(r["config"].split("train N=")[1].split()[0]) if r["pass"] == "train" else \
            2 * int(r["config"].split("CFG pack 2x N=")[1].split()[0])
        assert abs(float(r["throughput"]) - n / (float(r["median_ms"]) / 1e3)) < 1e-3 * float(r["throughput"])
    from nit_model.precision import default_precision
    want = {"float32"} | ({"bfloat16"} if default_precision("cpu") == "bf16" else set())
    assert {r["dtype"] for r in tiny} == want  # the precision column: each provider under each policy
    for dt in want:  # speed-ups compare providers of the same precision
        ok = {(r["provider"], r["pass"]): r for r in tiny if r["dtype"] == dt}
        for p in ("train", "sample"):
            best = min(float(ok[(peer, p)]["median_ms"]) for peer in ("reference", "official"))
            a = ok[("auto", p)]
            assert float(a["speedup_vs_best_peer"]) == pytest.approx(best / float(a["median_ms"]), rel=1e-4)
    auto = [r for r in tiny if r["provider"] == "auto"]
    assert all(r["reason"].startswith("auto ran ") for r in auto)
    xl = [r for r in step if r["workload"].endswith("/NiT-XL")]
    assert xl
    if not torch.cuda.is_available():
        assert all(r["status"] == "skipped" and "GPU only" in r["reason"] for r in xl)


def test_attention_suite_runs_each_precision_the_cpu_multiplies(quick, tmp_path):
    path, _, rows = quick
    from nit_model.precision import default_precision
    att = [r for r in rows if r["suite"] == "varlen_attention" and r["device"] == "cpu"]
    want = {"float32"} | ({"bfloat16"} if default_precision("cpu") == "bf16" else set())
    assert {r["dtype"] for r in att} == want
    for dt in want:  # each precision's speed-ups are over the reference of the same precision
        ref = [r for r in att if r["dtype"] == dt and r["provider"] == "reference" and r["status"] == "ok"]
        assert ref and all(float(r["speedup_vs_reference"]) == 1.0 for r in ref)
    assert plot.main(["--csv", str(path), "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    section = text.split("## varlen_attention")[1].split("\n## ")[0]
    if len(want) > 1:  # one row per workload, precision and provider
        assert "| workload | precision | provider |" in section
        for dt in want:
            assert f"| {dt} | cpu |" in section and f"| {dt} | reference |" in section
    else:
        assert "| workload | provider |" in section


def test_wrong_step_provider_is_caught_and_not_timed():
    from benchmarks import bench_step
    from nit_model.model import NiT

    def off_by_a_little(cfg, backend):
        model = NiT(cfg.replace(backend="reference"))
        forward = model.forward
        model.forward = lambda *a, **k: forward(*a, **k) * 1.001
        return model

    suite = bench_step.StepSuite()
    suite.providers["wrong"] = harness.ProviderSpec("wrong", bench_step._provider(off_by_a_little, None))
    # fp32: an error of 0.1% is below bf16's rounding (2^-8), which the bf16 check rightly accepts
    opts = harness.RunOptions(quick=True, filter="fixed-256px/tiny", memory=False, dtype="fp32")
    rows = [r for group in suite.run(harness.RunContext(opts, {})) for r in group]
    by = {(r["provider"], r["pass"]): r for r in rows}
    assert by[("reference", "train")]["status"] == "ok"
    for p in ("train", "sample"):
        assert by[("wrong", p)]["status"] == "mismatch" and by[("wrong", p)].get("median_ms") is None
    assert "velocity" in by[("wrong", "train")]["check"]


def test_packing_suite_rows(quick):
    _, _, rows = quick
    pk = {r["provider"]: r for r in rows if r["suite"] == "packing" and r["workload"] == "imagenet-50k/budget-4096"}
    assert set(pk) == set(harness.load_suites()["packing"].method_names)
    total = 8502101  # tokens of the 50,000 ImageNet-like sizes at stride 32
    for name, r in pk.items():
        eff, batches = float(r["efficiency"]), int(r["batches"])
        assert r["status"] == "ok" and r["check"].startswith("ok") and 0 < eff <= 1, r
        assert abs(eff - 1 / (1 + float(r["padding_waste"]))) < 1e-5  # the CSV keeps 6 digits
        if name in ("lpfhp", "ffd"):  # a pack processes its whole budget
            assert batches >= -(-total // 4096) and abs(eff - total / (batches * 4096)) < 1e-5
    assert float(pk["lpfhp"]["efficiency"]) > 0.99 > float(pk["pad-budget"]["efficiency"])
    assert float(pk["pad-random-k"]["efficiency"]) < float(pk["buckets-pow2"]["efficiency"])


def test_padding_fixed_k():
    from benchmarks.bench_packing import padding_fixed_k

    stats, per_batch = padding_fixed_k([1, 2, 3, 4, 5], 2, seed=0)
    assert stats.num_batches == 3 and stats.useful_tokens == 15 and per_batch[-1] in (1, 2, 3, 4, 5)
    assert stats.processed_tokens == int(per_batch.sum()) and per_batch.sum() >= 15
    stats, per_batch = padding_fixed_k([4, 4, 4, 4], 2)
    assert stats.efficiency == 1.0 and per_batch.tolist() == [8, 8]
    with pytest.raises(ValueError, match="k must be"):
        padding_fixed_k([1], 0)


def test_older_csv_gets_the_new_columns(tmp_path):
    path = tmp_path / "old.csv"
    old = harness.COLUMNS[:-2]
    path.write_text(",".join(old) + "\n" + ",".join("x" if c == "suite" else "" for c in old) + "\n")
    report.append_rows(str(path), [{"suite": "packing", "efficiency": 0.5, "batches": 3}])
    rows = report.read_rows(str(path))
    assert list(rows[0]) == list(harness.COLUMNS)
    assert rows[0]["suite"] == "x" and rows[0]["efficiency"] == ""
    assert rows[1]["efficiency"] == "0.5" and rows[1]["batches"] == "3"


def test_sampling_suite_rows(quick):
    """Packed vs one resolution per batch: both modes on every mix, the same images, one forward a
    step when packed against one per size, and a speed-up that is the ratio of the two medians."""
    _, _, rows = quick
    sm = [r for r in rows if r["suite"] == "sampling"]
    assert {r["workload"] for r in sm} == {"4-sizes/tiny", "16-sizes/tiny"}  # --quick: tiny only
    forwards = {"4-sizes/tiny": 4, "16-sizes/tiny": 16}  # per-resolution: one forward per size (1 step)
    for wl, n_sizes in forwards.items():
        by = {r["provider"]: r for r in sm if r["workload"] == wl}
        assert set(by) == {"packed", "per-resolution"}
        for r in by.values():
            assert r["status"] == "ok" and r["check"].startswith("ok") and r["unit"] == "images/s", r
            assert abs(float(r["throughput"]) - 16 / (float(r["median_ms"]) / 1e3)) < 1e-3 * float(r["throughput"])
        assert by["packed"]["reason"].startswith("1 forwards in 1 pack")
        assert by["per-resolution"]["reason"].startswith(f"{n_sizes} forwards in {n_sizes} pack")
        ratio = float(by["per-resolution"]["median_ms"]) / float(by["packed"]["median_ms"])
        assert abs(float(by["packed"]["speedup_vs_best_peer"]) - ratio) < 1e-3 * ratio
        assert by["packed"]["best_peer"] == "per-resolution" and not by["per-resolution"]["speedup_vs_best_peer"]


def test_sampling_suite_marks_disagreeing_modes():
    from benchmarks.bench_sampling import SamplingSuite

    res = {"max_abs_diff": 0.5, "speedup": 2.0,
           "packed": {"median_s": 1.0, "p20_s": 1.0, "p80_s": 1.0, "images_per_s": 16.0, "forwards": 1, "packs": 1},
           "per_resolution": {"median_s": 2.0, "p20_s": 2.0, "p80_s": 2.0, "images_per_s": 8.0, "forwards": 4,
                              "packs": 4}}
    rows = SamplingSuite.rows({"suite": "sampling", "workload": "w", "reps": 1}, res)
    assert [r["status"] for r in rows] == ["mismatch", "mismatch"] and rows[0]["check"].startswith("FAILED")
    assert all(r.get("median_ms") is None and r.get("speedup_vs_best_peer") is None for r in rows)


def test_runs_write_under_runs_unless_recorded(tmp_path, monkeypatch):
    """A smoke run never touches the committed results: only --record appends to them."""
    committed = Path(report.DEFAULT_CSV)
    before = committed.read_bytes()
    monkeypatch.chdir(tmp_path)
    args = ["--quick", "--suite", "adaln_modulate", "--providers", "reference", "--no-memory"]
    assert _run_cli(args) == 0
    assert committed.read_bytes() == before
    written = tmp_path / "runs" / "benchmarks" / "results-quick.csv"
    assert written.exists() and report.read_rows(str(written)), "the quick run wrote no rows under runs/"
    with pytest.raises(SystemExit, match="--record"):
        _run_cli(args + ["--record"])
    assert committed.read_bytes() == before


def test_precision_loss_windows_and_bad_window():
    from benchmarks import precision_loss
    rows = precision_loss.windows({"fp32": [2.0, 2.0, 1.0, 1.0, 9.0], "bf16": [2.2, 2.2, 1.0, 0.9, 9.0]}, 2)
    assert [r[:2] for r in rows] == [(1, 2), (3, 4)]  # whole windows only
    assert rows[0][2:] == pytest.approx((2.0, 2.2, 0.1)) and rows[1][2:] == pytest.approx((1.0, 0.95, -0.05))
    with pytest.raises(SystemExit, match="--window must be between 1 and --steps"):
        precision_loss.main(["--steps", "10", "--window", "20"])
