"""tools/gpu_check.py (make gpu-check) on a machine without a GPU: the dry run, the refusal, and the
step runner's time budgets (a step past its budget is killed and recorded, never waited for)."""
import importlib.util
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_lists_every_step_with_its_budget_within_8_minutes():
    r = subprocess.run([sys.executable, TOOL, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    gc = _load()
    steps = gc.steps()
    assert {"build", "gpu-tests", "sanitizer", "bench-ops", "bench-step"} <= {s.name for s in steps}
    for s in steps:
        assert f"{s.name}" in r.stdout and f"{s.budget_s} s" in r.stdout, r.stdout
    assert sum(s.budget_s for s in steps) <= 480
    assert f"{sum(s.budget_s for s in steps)} s in all" in r.stdout
    logs = {s.log for s in steps} | {"summary.md", "bench.csv"}
    assert len(logs) <= 8, logs


def test_without_a_gpu_it_exits_2_at_once(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", NIT_GPU_CHECK_OUT=str(tmp_path / "out"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, TOOL, "--python", sys.executable], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no GPU here" in r.stderr and "DRY=1" in r.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists(), "nothing is written without a GPU"


def test_a_step_past_its_budget_is_killed_and_recorded(tmp_path):
    gc = _load()
    ctx = gc.Context(python=sys.executable, out=str(tmp_path))
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"]
    failing = [sys.executable, "-c", "print('3 failed, 2 passed in 0.1s'); raise SystemExit(1)"]
    slow = gc.Step("slow", 2, "x.log", "sleeps", lambda c: [("sleeper", sleeper, {})])
    bad = gc.Step("bad", 30, "x.log", "fails", lambda c: [("failing", failing, {})])
    t0 = time.monotonic()
    with open(tmp_path / "x.log", "w") as log:
        gc.run_step(slow, ctx, log)
        gc.run_step(bad, ctx, log)
    assert time.monotonic() - t0 < 30
    assert slow.status == "out of budget" and 2 <= slow.elapsed_s < 20, (slow.status, slow.elapsed_s)
    assert bad.status == "failed: failing (exit 1)" and "3 failed, 2 passed" in bad.note
    text = (tmp_path / "x.log").read_text()
    assert "===== slow: sleeper =====\nstarted" in text
    assert sorted(os.listdir(tmp_path)) == ["x.log"], "no partial files left behind"


@pytest.mark.parametrize("name, unit, value, pct", [("NVIDIA H100 80GB HBM3", "GFLOP/s", "494500", "50.0"),
                                                    ("NVIDIA H200", "GB/s", "2400", "50.0")])
def test_benchmark_table_puts_figures_against_the_device_peaks(tmp_path, name, unit, value, pct):
    gc = _load()
    path = tmp_path / "bench.csv"
    path.write_text("suite,workload,device,provider,pass,status,median_ms,throughput,unit,speedup_vs_reference\n"
                    f"varlen_attention,w,cuda,triton,fwd,ok,1.5,{value},{unit},3.0\n"
                    f"varlen_attention,w,cuda,flex,fwd,error,,,,\n")
    rows = gc._bench_table(str(path), name)
    assert len(rows) == 3, rows
    assert f"| {pct} |" in rows[2], rows[2]
