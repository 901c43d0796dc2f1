"""One command for a machine with an NVIDIA GPU: build, test, sanitize, benchmark, and keep the results.

    make gpu-check                 (= python3 tools/gpu_check.py)
    make gpu-check DRY=1           list the steps and their time budgets, run nothing
    python3 tools/gpu_check.py [--dry-run] [--out DIR] [--python PY] [--only STEP,...]

Needs a Python that already has a CUDA build of torch and triton (no venv, no downloads). Each
step runs in its own process group with a time budget in seconds; a step that runs out of budget
is killed and recorded as "out of budget", and the next step runs. The budgets add up to 8
minutes on one H100. Everything lands in one folder (NIT_GPU_CHECK_OUT, default runs/gpu-check/):
summary.md, bench.csv and one log per kind of step: at most 8 files, none over 16 MB.
Without a GPU (and without --dry-run) it exits 2 at once.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILE_BYTES = 16 * 2**20
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# nominal dense bf16 tensor-core FLOP/s and HBM bytes/s, to put the measured figures in proportion
PEAKS = {"H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12),
         "A100": (312e12, 2.0e12)}
ATTENTION_PROVIDERS = "cuda,triton,torch_varlen,flash_attn,flex,sdpa_loop,sdpa_padded,reference"
ROW_OP_SUITES = ("adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope")


@dataclasses.dataclass
class Step:
    name: str
    budget_s: int
    log: str                                  # file in the output folder (steps may share one)
    what: str
    commands: Callable[["Context"], list]     # [(label, argv, extra env)]; several run side by side
    status: str = "not run"
    elapsed_s: float = 0.0
    note: str = ""


@dataclasses.dataclass
class Context:
    python: str
    out: str
    arch: str = "90"
    sanitizer: Optional[str] = None


def _build(ctx):
    env = {"NIT_BUILD_CUDA": "1", "NIT_CUDA_ARCHS": ctx.arch, "MAX_JOBS": "16"}
    # setup.py build_ext --inplace, compiling in parallel also where ninja is missing
    return [("build", [ctx.python, os.path.join("tools", "build_ext.py")], env),
            ("report", [ctx.python, "-m", "nit_kernels"], {})]


def _gpu_tests(ctx):
    # the GPU-only checks first, so that a run out of budget loses the long CUDA grid, not them
    first = ["tests/test_gpu_triton.py", "tests/test_triton_integration.py", "tests/test_cuda_gpu.py"]
    return [("pytest -m gpu", [ctx.python, "-m", "pytest", "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider",
                               "-m", "gpu", *first, "tests"], {})]


def _triton_tests(ctx):
    # the interpreter grid of the Triton backend, compiled on the GPU (tests/conftest.py leaves the
    # interpreter off where torch sees a GPU)
    return [("triton compiled", [ctx.python, "-m", "pytest", "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider", "-m", "not gpu",
                                 "tests/test_triton.py"], {})]


def _sanitizer(ctx):
    if not ctx.sanitizer:
        return []
    # no caching allocator: an out-of-bounds access must leave its allocation to be seen
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    return [(tool, [ctx.sanitizer, "--tool", tool, "--error-exitcode", "1", ctx.python,
                    os.path.join("tools", "sanitize_ops.py")], env) for tool in SANITIZER_TOOLS]


def _bench_ops(ctx):
    csv_path = os.path.join(ctx.out, "bench.csv")
    common = [ctx.python, "-m", "benchmarks", "--device", "cuda", "--dtype", "bf16", "--time-budget", "0.1",
              "--min-reps", "3", "--out", csv_path]
    return [("attention", common + ["--suite", "varlen_attention", "--filter", "imagenet-16k/NiT-XL",
                                    "--providers", ATTENTION_PROVIDERS], {}),
            ("row ops", common + [a for s in ROW_OP_SUITES for a in ("--suite", s)]
             + ["--filter", "imagenet-16k/NiT-XL", "--providers", "reference,cuda,triton"], {})]


def _bench_step(ctx):
    csv_path = os.path.join(ctx.out, "bench.csv")
    return [("step", [ctx.python, "-m", "benchmarks", "--device", "cuda", "--dtype", "bf16", "--suite", "step",
                      "--filter", "imagenet-4k/NiT-(S|XL)", "--providers", "auto,official", "--time-budget", "0.2",
                      "--min-reps", "3", "--no-memory", "--out", csv_path], {})]


def steps() -> list:
    return [
        Step("build", 150, "build.log", "build nit_kernels._C with CUDA for this GPU's arch only, then "
             "python -m nit_kernels", _build),
        Step("gpu-tests", 110, "tests.log", "pytest -m gpu (CUDA and compiled Triton against the reference)",
             _gpu_tests),
        Step("triton-tests", 50, "tests.log", "tests/test_triton.py compiled on the GPU", _triton_tests),
        Step("sanitizer", 50, "sanitizer.log", "compute-sanitizer memcheck, racecheck, synccheck, initcheck on a "
             "small pack through every CUDA op (side by side)", _sanitizer),
        Step("bench-ops", 75, "bench.log", "attention vs torch varlen / flash_attn / FlexAttention / per-image "
             "and padded SDPA, and the row ops (NiT-XL, 16k tokens, bf16)", _bench_ops),
        Step("bench-step", 45, "bench.log", "NiT-S and NiT-XL bf16 training and CFG sampling step, ours vs the "
             "official formulation", _bench_step),
    ]


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NIT_KERNELS_BACKEND")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _kill(proc: subprocess.Popen):
    # SIGINT first: pytest then prints its summary of what ran and failed so far
    for sig, wait in ((signal.SIGINT, 4), (signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def run_step(step: Step, ctx: Context, log) -> None:
    """Runs the step's commands (those of one batch side by side) until done or out of budget."""
    cmds = step.commands(ctx)
    if not cmds:
        step.status, step.note = "skipped", "compute-sanitizer not found" if step.name == "sanitizer" else "nothing to run"
        return
    start = time.monotonic()
    deadline = start + step.budget_s
    parallel = step.name == "sanitizer"
    batches = [cmds] if parallel else [[c] for c in cmds]
    failures, outputs = [], {}
    for batch in batches:
        procs = []
        for label, argv, extra in batch:
            path = os.path.join(ctx.out, f".{step.name}-{len(outputs)}.part")
            f = open(path, "w+")
            outputs[label] = (path, f)
            procs.append((label, subprocess.Popen(argv, cwd=ROOT, env=_env(extra), stdout=f, stderr=subprocess.STDOUT,
                                                  start_new_session=True)))
        for label, proc in procs:
            try:
                rc = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for _, p in procs:
                    _kill(p)
                step.status = "out of budget"
                break
            if rc != 0:
                failures.append(f"{label} (exit {rc})")
        if step.status == "out of budget":
            break
    step.elapsed_s = time.monotonic() - start
    for label, (path, f) in outputs.items():
        f.seek(0)
        text = f.read()
        f.close()
        os.remove(path)
        log.write(f"\n===== {step.name}: {label} =====\n{text}")
        step.note += _digest(label, text)
    if step.status != "out of budget":
        step.status = "failed: " + ", ".join(failures) if failures else "ok"


def _digest(label: str, text: str) -> str:
    """One line per command for the summary: pytest's tally, the sanitizer's error count."""
    tally = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped).*?)\s*=*$", text, re.M)
    if tally:
        return f" {label}: {tally[-1]};"
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if errors:
        return f" {label}: {errors[-1]} errors;"
    return ""


def _cap(path: str):
    """Keep the last MAX_FILE_BYTES of a file (the end of a log says how it ended)."""
    if os.path.exists(path) and os.path.getsize(path) > MAX_FILE_BYTES:
        with open(path, "rb") as f:
            f.seek(-(MAX_FILE_BYTES - 100), os.SEEK_END)
            tail = f.read()
        with open(path, "wb") as f:
            f.write(b"[... truncated to the last 16 MB ...]\n" + tail)


def probe(python: str) -> dict:
    """The GPU as the target Python's torch sees it (a subprocess: this driver imports no torch)."""
    code = ("import json, torch\n"
            "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': torch.cuda.is_available()}\n"
            "if d['available']:\n"
            "    cc = torch.cuda.get_device_capability(0)\n"
            "    d.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(), arch=f'{cc[0]}{cc[1]}')\n"
            "try:\n    import triton; d['triton'] = triton.__version__\n"
            "except Exception as e:\n    d['triton'] = f'not importable ({e})'\n"
            "print('PROBE', json.dumps(d))\n")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=_env({}))
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "error": f"{python} could not be run: {e}"}
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    if not line:
        return {"available": False, "error": f"{python} failed to import torch: {r.stderr.strip()[-500:]}"}
    return json.loads(line[0][6:])


def _peaks(name: str):
    for key in sorted(PEAKS, key=len, reverse=True):
        if key in name:
            return PEAKS[key]
    return None


def _bench_table(csv_path: str, device_name: str) -> list:
    if not os.path.exists(csv_path):
        return ["(no benchmark rows)"]
    peaks = _peaks(device_name)
    lines = ["| suite | workload | provider | pass | median ms | throughput | % of peak | x ref |",
             "|---|---|---|---|---|---|---|---|"]
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r.get("device") != "cuda" or r.get("status") != "ok":
                continue
            pct = ""
            if peaks and r.get("throughput"):
                unit, value = r.get("unit", ""), float(r["throughput"])
                if unit.endswith("FLOP/s"):
                    scale = {"GFLOP/s": 1e9, "TFLOP/s": 1e12}.get(unit, 1.0)
                    pct = f"{100 * value * scale / peaks[0]:.1f}"
                elif unit == "GB/s":
                    pct = f"{100 * value * 1e9 / peaks[1]:.1f}"
            lines.append(f"| {r['suite']} | {r['workload']} | {r['provider']} | {r['pass']} | {r['median_ms']} | "
                         f"{r.get('throughput', '')} {r.get('unit', '')} | {pct} | {r.get('speedup_vs_reference', '')} |")
    return lines


def write_summary(ctx: Context, info: dict, done: list, total_s: float):
    peaks = _peaks(info.get("name", ""))
    lines = ["# gpu-check", "",
             f"GPU: {info.get('name')} (sm_{ctx.arch}, {info.get('count')} device(s)); torch {info.get('torch')} "
             f"(CUDA {info.get('cuda')}), triton {info.get('triton')}; {total_s:.0f} s in all.", ""]
    if peaks:
        lines += [f"Peaks used for '% of peak': {peaks[0] / 1e12:.0f} TFLOP/s dense bf16, {peaks[1] / 1e12:.2f} TB/s.", ""]
    lines += ["| step | budget s | took s | status | details |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.budget_s} | {s.elapsed_s:.1f} | {s.status} | {s.note.strip()} |" for s in done]
    lines += ["", "## Benchmarks (bf16 on the GPU; figures from bench.csv)", ""]
    lines += _bench_table(os.path.join(ctx.out, "bench.csv"), info.get("name", ""))
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the steps and their budgets, run nothing")
    ap.add_argument("--out", default=os.environ.get("NIT_GPU_CHECK_OUT", os.path.join("runs", "gpu-check")))
    ap.add_argument("--python", default=os.environ.get("PYTHON", "python3"), help="the Python with CUDA torch")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    args = ap.parse_args(argv)
    plan = [s for s in steps() if not args.only or s.name in args.only.split(",")]
    total = sum(s.budget_s for s in plan)
    if args.dry_run:
        print(f"gpu-check plan: {len(plan)} steps, {total} s in all (results in {args.out}/)")
        for i, s in enumerate(plan, 1):
            print(f"  {i}. {s.name:<13} {s.budget_s:>4} s  {s.what}")
        return 0
    info = probe(args.python)
    if not info.get("available"):
        why = info.get("error") or f"torch {info.get('torch')} sees no CUDA device"
        print(f"gpu-check: no GPU here ({why}). It needs an NVIDIA GPU and a CUDA build of torch; "
              f"'make gpu-check DRY=1' lists the steps.", file=sys.stderr)
        return 2
    out = os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a previous run's files: the folder holds this run's only
        if name.endswith((".md", ".csv", ".log", ".part")):
            os.remove(os.path.join(out, name))
    ctx = Context(python=args.python, out=out, arch=info["arch"],
                  sanitizer=shutil.which("compute-sanitizer") or next(
                      (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None))
    print(f"gpu-check on {info['name']} (sm_{ctx.arch}), torch {info['torch']}, triton {info['triton']}: "
          f"{len(plan)} steps, budget {total} s; results in {out}/", flush=True)
    t0 = time.monotonic()
    for i, step in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {step.name} (budget {step.budget_s} s): {step.what}", flush=True)
        with open(os.path.join(out, step.log), "a") as log:
            run_step(step, ctx, log)
        print(f"      -> {step.status} in {step.elapsed_s:.1f} s{(';' + step.note) if step.note else ''}", flush=True)
    for name in os.listdir(out):
        _cap(os.path.join(out, name))
    write_summary(ctx, info, plan, time.monotonic() - t0)
    print(f"summary: {os.path.join(out, 'summary.md')}")
    return 0 if all(s.status in ("ok", "skipped") for s in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
