"""python -m benchmarks [--quick] [--filter REGEX] [--record] ...: run the suites, print tables, append CSV rows
(under runs/benchmarks/, or to the committed benchmarks/results/results.csv with --record)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

from . import harness, report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "Benchmark the nit_kernels ops (and later the model step and packing) against the reference and "
        "peers; print a table and append rows to a CSV. Plots and SUMMARY.md: python -m benchmarks.plot."))
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, one repetition, no torch.compile providers: a smoke test, not results")
    p.add_argument("--filter", default=None, help="regex searched in 'suite/workload/provider' (e.g. 'rope|NiT-XL')")
    p.add_argument("--suite", action="append", default=None, help="run only this suite (repeatable)")
    p.add_argument("--providers", default=None, help="comma-separated provider names to run (default: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "all"),
                   help="auto: cuda when a GPU is present, else cpu; all: both")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run torch.compile providers in --quick too")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile providers")
    p.add_argument("--time-budget", type=float, default=1.0, help="seconds of timed repetitions per measurement")
    p.add_argument("--min-reps", type=int, default=5, help="at least this many timed repetitions")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--out", default=None, help="CSV to append to (default runs/benchmarks/results[-quick].csv)")
    p.add_argument("--record", action="store_true",
                   help=f"append to the committed results ({os.path.relpath(report.DEFAULT_CSV)}); full runs only")
    p.add_argument("--list", action="store_true", help="list suites, workloads and providers, then exit")
    return p


def _devices(choice: str) -> list[str]:
    gpu = torch.cuda.is_available()
    if choice == "auto":
        return ["cuda" if gpu else "cpu"]
    if choice == "all":
        return ["cpu", "cuda"] if gpu else ["cpu"]
    if choice == "cuda" and not gpu:
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return [choice]


def _out_path(args) -> str:
    """Where the rows go: --out, the committed CSV with --record, else under runs/ (never committed)."""
    if args.record:
        if args.quick:
            raise SystemExit("--record appends to the committed results; a --quick run is a smoke test, not "
                             "results: drop --record (rows go under runs/benchmarks/) or --quick")
        if args.out:
            raise SystemExit("--record and --out name two different CSVs: give one of them")
        return report.DEFAULT_CSV
    return args.out or os.path.join("runs", "benchmarks", "results-quick.csv" if args.quick else "results.csv")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = _out_path(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = harness.RunOptions(
        quick=args.quick, devices=_devices(args.device), dtype=args.dtype, compile=args.compile, filter=args.filter,
        providers=frozenset(args.providers.split(",")) if args.providers else None,
        **({} if args.quick else {"time_budget": args.time_budget, "min_reps": args.min_reps}),
        memory=args.memory)
    suites = harness.load_suites()
    chosen = [s for name, s in suites.items() if not args.suite or name in args.suite]
    if args.suite and len(chosen) != len(set(args.suite)):
        missing = sorted(set(args.suite) - set(suites))
        raise SystemExit(f"unknown suite(s) {missing}; choose from {sorted(suites)}")
    if args.list:
        for s in chosen:
            print("\n".join(s.listing(opts)))
        return 0

    t_start = time.perf_counter()
    info = harness.machine_info()
    info["mode"] = "quick" if args.quick else "full"
    print(f"{info['machine']} | GPU: {info['gpu']} | torch {info['torch']} | triton {info['triton']} | "
          f"commit {info['commit']} | {info['mode']} mode")
    load, cpus = harness.load_average(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if load is not None and cpus and load > cpus:
        print(f"warning: load average {load:.1f} on {cpus} CPUs; other processes share this machine and the "
              "timings will be slow and noisy (fewer --threads helps)")
    copy_rows, copy_gbps = [], {}
    for dev in opts.devices:
        gbps = harness.copy_bandwidth(torch.device(dev), opts)
        copy_gbps[dev] = gbps
        copy_rows.append({"suite": "machine", "workload": "copy-256MiB", "config": "dst.copy_(src), 256 MiB fp32; "
                          "GB/s counts bytes read + written", "device": dev, "dtype": "float32", "provider": "torch",
                          "pass": "copy", "status": "ok", "throughput": gbps, "unit": "GB/s", "frac_of_copy": 1.0})
        print(f"copy bandwidth on {dev}: {gbps:.1f} GB/s (read + write, 256 MiB)")
    ctx = harness.RunContext(opts, copy_gbps)
    for mod, why in harness.LOAD_ERRORS.items():
        print(f"error: {mod} could not be imported: {why}")
        copy_rows.append({"suite": mod.rsplit(".", 1)[-1], "workload": "-", "provider": "-", "pass": "-",
                          "status": "error", "reason": f"import failed: {why}"})
    n_rows = report.append_rows(args.out, [dict(r, **info) for r in copy_rows])
    counts: dict[str, int] = {"error": len(harness.LOAD_ERRORS)} if harness.LOAD_ERRORS else {}
    for suite in chosen:
        for rows in suite.run(ctx):
            report.print_rows(rows)
            n_rows += report.append_rows(args.out, [dict(r, **info) for r in rows])
            for r in rows:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
    took = time.perf_counter() - t_start
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"\n{n_rows} rows appended to {args.out} ({summary}) in {took:.1f} s")
    if counts.get("mismatch") or counts.get("error"):
        print("some providers disagreed with the reference or failed: see the status and check columns")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
