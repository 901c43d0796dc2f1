"""A tour of the kernels on one realistic pack: every op of the kernel suites on every backend that
serves it here, checked against the reference and timed (forward+backward), through the harness.

    python -m benchmarks.kernel_tour [--tokens 4096] [--reps 5]      (`nit kernels` runs this)

The pack is ImageNet-like (``workloads.imagenet_like_pack(tokens)``) at NiT-S widths (D 384, H 6,
Dh 64), on the GPU when there is one, else the CPU; the dtype is the harness default for the device
(fp32 on CPU, bf16 on CUDA). The providers are the kernel suites' own, minus the torch.compile ones
(a first compile takes seconds): the eager reference, this package's backends and the peers. A
provider that cannot run here prints its reason. Nothing is written to disk.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import harness
from .opsuite import WIDTHS, KernelSuite, pack_stats
from .workloads import imagenet_like_pack

__all__ = ["run", "main"]


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}")
        return v
    return parse


def run(tokens: int = 4096, reps: int = 5, seed: int = 0, width: str = "NiT-S",
        device: Optional[str] = None) -> list[dict]:
    """Check and time every kernel suite's non-compiled providers on one pack; returns the
    fwd+bwd rows (harness.COLUMNS keys) after printing them as a table."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = harness.RunOptions(devices=(dev.type,), compile=False, time_budget=0.0, min_reps=reps, max_reps=reps,
                              warmup=1, memory=False, seed=seed)
    dtype = opts.dtype_for(dev.type)
    sizes = tuple(imagenet_like_pack(tokens, seed=seed))
    d, h, dh = WIDTHS[width]
    ctx = harness.RunContext(opts, {})
    suites = [s for s in harness.load_suites().values() if isinstance(s, KernelSuite)]
    print(f"pack: {len(sizes)} ImageNet-like images, {pack_stats(sizes)}; {width} (D={d}, H={h}, Dh={dh}), "
          f"{str(dtype).replace('torch.', '')} on {dev.type}, {torch.get_num_threads()} threads")
    print(f"{'op':<18} {'provider':<12} {'fwd+bwd ms':>11} {'vs reference':>13}  check")
    out = []
    for suite in suites:
        wl = harness.Workload(f"imagenet-{tokens}/{width}", f"{pack_stats(sizes)} {suite.shape_doc(d, h, dh)}",
                              {"sizes": sizes, "dims": (d, h, dh)})
        names = [n for n, spec in suite.providers.items() if not spec.compiled]
        for r in suite.run_workload(ctx, wl, dev, dtype, names):
            if r["pass"] != "fwd+bwd":
                continue
            out.append(r)
            if r["status"] == "ok":
                speed = r.get("speedup_vs_reference")
                print(f"{suite.name:<18} {r['provider']:<12} {r['median_ms']:>11.2f} "
                      f"{'' if speed is None else f'{speed:.2f}x':>13}  {r.get('check', '')}")
            else:
                why = r.get("check") if r["status"] == "mismatch" else r.get("reason", "")
                print(f"{suite.name:<18} {r['provider']:<12} {r['status']:>11} {'':>13}  {why}")
    for mod, why in harness.LOAD_ERRORS.items():
        print(f"error: {mod} could not be imported: {why}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_tour", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=_positive("--tokens"), default=4096,
                   help="token budget of the ImageNet-like pack (default 4096)")
    p.add_argument("--reps", type=_positive("--reps"), default=5,
                   help="timed repetitions per op and provider (median reported)")
    p.add_argument("--threads", type=_positive("--threads"), default=None, help="torch.set_num_threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run(tokens=a.tokens, reps=a.reps)
    bad = [r for r in rows if r["status"] in ("mismatch", "error")] or harness.LOAD_ERRORS
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
