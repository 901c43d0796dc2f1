"""`nit bench` and `nit kernels` run the tools of the source tree's benchmarks package in a child
process; the model package itself never imports benchmarks (the tools sit a layer above it)."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

from nit_model import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_the_model_package_never_imports_benchmarks():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sorted((ROOT / "nit_model").rglob("*.py"))
                 for m in _imported_modules(p) if m == "benchmarks" or m.startswith("benchmarks.")]
    assert not offenders, offenders


def _nit(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "nit_model", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_nit_bench_passes_its_arguments_to_the_harness():
    proc = _nit("bench", "--list", "--suite", "packing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("packing:"), proc.stdout[:500]


@pytest.mark.slow
def test_nit_kernels_runs_the_tour_and_checks_against_the_reference():
    proc = _nit("kernels", "--tokens", "16", "--reps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    ok = {(r[0], r[1]) for r in rows if len(r) > 4 and r[4] == "ok"}
    for op in ("adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope", "varlen_attention"):
        assert (op, "reference") in ok and (op, "cpu") in ok, (op, proc.stdout[-3000:])


@pytest.mark.parametrize("argv", [["bench", "--quick"], ["kernels", "--reps", "1"]])
def test_without_the_benchmarks_package_the_forward_says_what_is_missing(argv, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_source_root", lambda: str(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    msg = str(e.value.code)
    assert msg.startswith(f"nit {argv[0]}: error: ") and "benchmarks" in msg and "make setup" in msg, msg
