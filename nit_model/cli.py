"""The `nit` command line."""
from __future__ import annotations

import argparse
import sys


def _kernels(args):
    from .kernel_tour import run
    run(tokens=args.tokens, reps=args.reps)


def _bench(args, rest):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "harness.py")):
        raise SystemExit("nit bench runs the harness in the source tree (benchmarks/), which this install lacks; "
                         "clone the repository and install it with `make setup`")
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.__main__ import main as bench_main
    return bench_main(rest)


def _train(args):
    from .train import main_train
    code = main_train(args)
    if code:
        sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nit", description="NiT: native-resolution diffusion transformer, packed and fused.")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="run every op on every usable backend on a realistic pack, check and time it")
    k.add_argument("--tokens", type=int, default=4096, help="token budget of the ImageNet-like pack (default 4096)")
    k.add_argument("--reps", type=int, default=5, help="timed repetitions per op and backend (median reported)")
    k.set_defaults(func=_kernels)
    b = sub.add_parser("bench", help="the benchmark harness (python -m benchmarks); `nit bench --help` for its options",
                       add_help=False)
    b.set_defaults(func=_bench, passthrough=True)
    from .train import add_train_arguments
    t = sub.add_parser("train", help="train NiT on native-resolution packs from a YAML config (torchrun for DDP)")
    add_train_arguments(t)
    t.set_defaults(func=_train)
    d = sub.add_parser("demo", help="the main job on built-in defaults (currently: the kernel tour)")
    d.add_argument("--tokens", type=int, default=4096)
    d.add_argument("--reps", type=int, default=5)
    d.set_defaults(func=_kernels)
    return p


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if getattr(args, "passthrough", False):
        return args.func(args, rest) or 0
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
