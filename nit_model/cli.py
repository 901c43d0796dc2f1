"""The `nit` command line."""
from __future__ import annotations

import argparse
import os
import sys

from .checks import error_line


def _source_root() -> str:
    """The checkout this package was imported from (benchmarks/ sits beside nit_model/ there)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmarks(command: str, module: str, argv) -> int:
    """`python -m <module> ARGV` (a module of the source tree's benchmarks package) in a child process
    that imports this checkout; returns its exit code. The model package never imports benchmarks:
    the tools sit a layer above it."""
    import subprocess
    root = _source_root()
    if not os.path.isfile(os.path.join(root, "benchmarks", "__init__.py")):
        raise SystemExit(f"nit {command}: error: it runs `python -m {module}` from the source tree (benchmarks/ "
                         f"beside nit_model/ in {root}), which this install lacks; clone the repository and "
                         f"install it with `make setup`, or run that module from the checkout")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", module, *argv], env=env).returncode


def _kernels(args):
    from .checks import integer
    tokens, reps = integer("--tokens", args.tokens, 1), integer("--reps", args.reps, 1)
    code = run_benchmarks("kernels", "benchmarks.kernel_tour", ["--tokens", str(tokens), "--reps", str(reps)])
    if code:
        sys.exit(code)


def _bench(args, rest):
    return run_benchmarks("bench", "benchmarks", rest)


def _train(args):
    from .train import main_train
    code = main_train(args)
    if code:
        sys.exit(code)


def check_threads(n) -> None:
    """Validate a --threads value (None: torch's choice) and apply it."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be a positive number of threads, got {n}")
    import torch
    torch.set_num_threads(n)


_threads = check_threads


def _cfg_interval(spec: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--cfg-interval is LOW,HIGH (e.g. 0,0.7), got {spec!r}") from None
    return low, high


def _writable_folder(path: str) -> str:
    """Create the output folder now, so that a path that cannot be written fails before the work."""
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: the output folder is not writable")
    return path


def _sample(args):
    from .report import save_samples, write_text
    from .sampling import check_sampling_args, load_sampling_model, parse_sizes, sample
    _threads(args.threads)
    low, high = _cfg_interval(args.cfg_interval)
    check_sampling_args(steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale, cfg_interval=(low, high),
                        seed=args.seed, token_budget=args.token_budget)
    sizes = parse_sizes(args.sizes)
    sm = load_sampling_model(args.ckpt, ema=not args.no_ema, vae=args.vae, vae_factor=args.vae_factor)
    _writable_folder(args.out)
    res = sample(sm, sizes, args.labels, num=args.num, steps=args.steps, solver=args.solver,
                 cfg_scale=args.cfg_scale, cfg_interval=(low, high), seed=args.seed,
                 token_budget=args.token_budget, progress=not args.no_progress, force=args.force,
                 precision=args.precision, **_rope_kwargs(args))
    files = save_samples(res, args.out, class_names=sm.class_names, write_pngs=not args.no_png)
    import json
    write_text(os.path.join(args.out, "samples.json"), json.dumps(
        {"settings": res.settings, "stats": res.stats, "sizes": [list(s) for s in res.sizes], "labels": res.labels,
         "seeds": res.seeds, "npz": [os.path.basename(p) for p in files["npz"]]}, indent=1))
    st = res.stats
    print(f"sampled {len(res.sizes)} images at {len(sizes)} size(s) in {st['packs']} pack(s), {st['forwards']} forwards, "
          f"{st['total_seconds']:.1f} s ({st['images_per_s']:.2f} images/s)")
    print(f"wrote {len(files['pngs'])} PNGs, {files['contact_sheet']}; {files['note']}:")
    for p in files["npz"]:
        print(f"  {p}")


def _eval(args):
    from .evaluate import DEFAULT_EVAL_SIZES, evaluate_models, markdown_table, parse_named_checkpoints
    from .shapes_eval import ClassifierConfig
    from .report import write_text
    _threads(args.threads)
    specs = list(args.ckpt or [])
    if args.baseline_ckpt:
        specs.append(f"baseline={args.baseline_ckpt}")
    if not specs:
        raise ValueError("give at least one --ckpt [NAME=]PATH")
    from .checks import integer
    integer("--num-real", args.num_real, 2)
    integer("--classifier-steps", args.classifier_steps, 1)
    low, high = _cfg_interval(args.cfg_interval)
    from .precision import check_precision
    precision = check_precision(args.precision, "cpu", where="--precision")  # the shapes models sample on the CPU
    models = parse_named_checkpoints(specs)
    if args.no_ema:
        from .sampling import load_sampling_model
        models = {n: load_sampling_model(path, ema=False) for n, path in models.items()}
    if args.out:
        _writable_folder(args.out)
    rep = evaluate_models(models, args.sizes or DEFAULT_EVAL_SIZES, num=args.num, steps=args.steps,
                          solver=args.solver, cfg_scale=args.cfg_scale, cfg_interval=(low, high),
                          seed=args.seed, num_real=args.num_real, cache_dir=args.cache_dir,
                          classifier_config=ClassifierConfig(steps=args.classifier_steps),
                          palette=args.palette, progress=not args.no_progress,
                          rope_methods=args.rope_methods or (args.rope_method and [args.rope_method]),
                          rope_ori_max_pe_len=args.rope_ori_max_pe_len, rope_decouple=args.rope_decouple,
                          precision=precision)
    table = markdown_table(rep)
    if args.rope_methods:
        from .evaluate import method_table
        table += "\n\n## Per RoPE method\n\n" + method_table(rep)
    print(table)
    if args.out:
        write_text(os.path.join(args.out, "eval.json"), rep.to_json())
        write_text(os.path.join(args.out, "EVAL.md"), "# Per-resolution evaluation\n\n" + table + "\n")
        print(f"\nwrote {os.path.join(args.out, 'EVAL.md')} and eval.json")


def _extract_latents(args):
    from .extract_latents import run
    run(args)


def _demo(args):
    from .demo import main_demo
    code = main_demo(args)
    if code:
        sys.exit(code)


def _ckpt_dirs(path: str) -> tuple[str, list[str]]:
    """(checkpoints folder, checkpoint directories to look at) for a run, its checkpoints folder or one checkpoint."""
    from .trainer import checkpointing as ck
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isfile(os.path.join(path, "trainer.pt")) or os.path.isfile(os.path.join(path, ck.MANIFEST)):
        return os.path.dirname(os.path.abspath(path)), [path]
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and os.path.isdir(os.path.join(root, n)))
    return root, [os.path.join(root, n) for n in names]


def _ckpt(args):
    """`nit ckpt list|verify PATH`: the checkpoints of a run and whether their files match their manifests."""
    from .memory import fmt_bytes
    from .trainer import checkpointing as ck
    root, dirs = _ckpt_dirs(args.path)
    bad = 0
    if args.action == "list":
        pointer = os.path.join(root, ck.LATEST)
        if os.path.isfile(pointer):
            print(f"latest -> {open(pointer).read().strip()}")
        for name in sorted(os.listdir(root)):
            p = os.path.join(root, name)
            if os.path.isdir(p):
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
                kind = ("checkpoint" if ck.is_complete(p) else "incomplete") if name.startswith("step-") else \
                    "damaged, set aside" if name.startswith(ck.CORRUPT_PREFIX) else \
                    "later checkpoints of an abandoned timeline" if name.startswith("abandoned-") else \
                    "debris of an interrupted save" if name.startswith(".tmp-") else "other"
                print(f"{name}  {fmt_bytes(size)}  ({kind})")
        return
    for d in dirs:
        problems = ck.verify_checkpoint(d)
        bad += bool(problems)
        print(f"{os.path.basename(d)}: " + (f"damaged ({'; '.join(problems)})" if problems else "ok"))
    if not dirs:
        print(f"no checkpoints under {root}")
    if bad:
        raise SystemExit(1)


def _rope_kwargs(args) -> dict:
    return dict(rope_method=args.rope_method, rope_ori_max_pe_len=args.rope_ori_max_pe_len,
                rope_decouple=args.rope_decouple)


def _add_precision_knob(p) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32, or bf16 autocast of the sampling forwards (weights stay fp32); auto: bf16 on CPUs "
                        "with AMX-BF16 and on CUDA devices with bf16, else fp32 (default fp32)")


def _add_rope_knobs(p) -> None:
    """RoPE scaling at sampling time (nit_model.rope_scaling), one scale per image."""
    from .rope_scaling import AUTO_METHOD, ROPE_CHOICES
    # checked by nit_model.rope_scaling (not argparse choices), so that a bad value is one line
    p.add_argument("--rope-method", default=None, metavar="METHOD",
                   help="RoPE frequencies for images larger than the training sizes (per image; sizes within the "
                        f"training range keep the trained angles): auto = trained within the range, {AUTO_METHOD} "
                        "beyond (default when the checkpoint records its training max side); normal = the trained "
                        "table everywhere; linear (position interpolation), ntk-aware, ntk-aware-pro1/2, "
                        f"ntk-by-parts, yarn, scale1/2 as in NiT (one of {', '.join(ROPE_CHOICES)})")
    p.add_argument("--rope-ori-max-pe-len", type=int, default=None, metavar="TOKENS",
                   help="the largest image side seen in training, in tokens (default: from the checkpoint, "
                        "rope_ori_max_pe_len or data.max_side / patch size)")
    p.add_argument("--rope-decouple", action="store_true",
                   help="scale each axis by its own side instead of both by the longer side")


def _add_sampling_knobs(p, *, steps: int, num: int) -> None:
    from .solvers import SOLVERS
    p.add_argument("--num", type=int, default=num, help=f"images per size (default {num})")
    p.add_argument("--steps", type=int, default=steps, help=f"solver steps (default {steps})")
    p.add_argument("--solver", choices=SOLVERS, default="euler",
                   help="euler / heun ODE or Euler-Maruyama sde, t from 1 (noise) to 0 (default euler)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale; 1 disables it (default 1)")
    p.add_argument("--cfg-interval", default="0,1", metavar="LOW,HIGH",
                   help="guide only for t in [LOW, HIGH] (default 0,1)")
    p.add_argument("--seed", type=int, default=0, help="image i uses a generator seeded from (seed, i) (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nit", description="NiT: native-resolution diffusion transformer, packed and fused.")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="run every op on every usable backend on a realistic pack, check and time it "
                                       "(python -m benchmarks.kernel_tour)")
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
    from .sampling import DEFAULT_TOKEN_BUDGET
    s = sub.add_parser("sample", help="sample images at any mix of sizes, packed into shared forwards",
                       description="Sample NUM images at every size of --sizes; all of them (and both halves of "
                                   "classifier-free guidance) share token-budget packs. Writes a PNG per image, "
                                   "contact_sheet.png, ADM-format .npz file(s) (one per size) and samples.json.")
    s.add_argument("--ckpt", required=True,
                   help="run directory (newest checkpoint), checkpoint directory or weights file (.safetensors)")
    s.add_argument("--sizes", default="32x32,64x64",
                   help="HEIGHTxWIDTH in pixels, comma-separated, multiples of the pixel stride (default 32x32,64x64)")
    s.add_argument("--labels", default=None,
                   help="class ids cycled over each size's images, e.g. 0,3 (default: all trained classes)")
    _add_sampling_knobs(s, steps=32, num=4)
    _add_rope_knobs(s)
    s.add_argument("--out", default="samples", help="output folder (default samples/)")
    s.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help=f"tokens per forward, guidance halves counted (default {DEFAULT_TOKEN_BUDGET})")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights of a training checkpoint, not the EMA")
    s.add_argument("--vae", default=None, help="latent models: diffusers autoencoder name or local folder")
    s.add_argument("--vae-factor", type=int, default=None, help="latent models: pixels per latent pixel")
    s.add_argument("--no-png", action="store_true", help="write only the contact sheet and .npz files")
    s.add_argument("--force", action="store_true",
                   help="sample even when the memory estimate exceeds the available memory")
    _add_precision_knob(s)
    s.set_defaults(func=_sample)
    e = sub.add_parser("eval", help="per-resolution accuracy and Fréchet distance on the shapes data",
                       description="Sample every model at seen and unseen sizes (same seeds), judge the samples "
                                   "with a shapes classifier (trained in seconds, cached): class accuracy and "
                                   "Fréchet distance of classifier features against real images of that size.")
    e.add_argument("--ckpt", action="append", metavar="[NAME=]PATH", help="a model to evaluate (repeatable)")
    e.add_argument("--baseline-ckpt", metavar="PATH", help="a baseline (e.g. trained at one fixed size), named 'baseline'")
    e.add_argument("--sizes", default=None, help="HEIGHTxWIDTH list (default: seen and unseen sizes of tiny-shapes)")
    _add_sampling_knobs(e, steps=16, num=32)
    _add_rope_knobs(e)
    _add_precision_knob(e)
    e.add_argument("--rope-methods", default=None, metavar="M1,M2,...",
                   help="evaluate every model with each of these RoPE methods and write one table (sizes x methods: "
                        "judge accuracy, FD, tiling), e.g. normal,ntk-aware,yarn")
    e.add_argument("--no-ema", action="store_true",
                   help="sample every model from the raw weights of its training checkpoint, not the EMA")
    e.add_argument("--num-real", type=int, default=256, help="real images per size for the reference statistics")
    e.add_argument("--cache-dir", default=os.path.join("runs", "cache"), help="where the classifier is cached")
    e.add_argument("--classifier-steps", type=int, default=300,
                   help="training steps of the shapes classifier (cached per setting; default 300)")
    e.add_argument("--palette", choices=("colour", "mono"), default=None,
                   help="palette of the real images and the classifier's training images (default: the one "
                        "the checkpoints were trained on, data.shapes_palette)")
    e.add_argument("--out", default=None, help="folder for EVAL.md and eval.json")
    e.set_defaults(func=_eval)
    from .extract_latents import add_arguments as add_latent_arguments
    x = sub.add_parser("extract-latents", help="encode an image folder to VAE latents at native resolution",
                       description="Encode DATA/<class>/<image> with a diffusers autoencoder into a latent folder "
                                   "that `nit train` reads (data.kind=latents).")
    add_latent_arguments(x)
    x.set_defaults(func=_extract_latents)
    c = sub.add_parser("ckpt", help="list the checkpoints of a run, or verify their files against their manifests",
                       description="list: every folder under RUN/checkpoints with its size and kind (checkpoints, "
                                   "corrupt-* set aside, abandoned-* timelines, debris). verify: size and sha256 of "
                                   "every file of every checkpoint; exit code 1 when one is damaged.")
    c.add_argument("action", choices=("list", "verify"))
    c.add_argument("path", help="run directory, its checkpoints folder, or one checkpoint")
    c.set_defaults(func=_ckpt)
    from .demo import add_demo_arguments
    d = sub.add_parser("demo", help="train, sample and evaluate tiny NiT on shapes in minutes; writes runs/demo/REPORT.md",
                       description="The main job on a CPU: train the tiny NiT on shapes at native resolutions and a "
                                   "baseline at one fixed size (equal steps and tokens), sample a mixed pack of "
                                   "seen and unseen sizes, evaluate both per resolution, measure throughput, and "
                                   "write a markdown report.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_demo_arguments(d)
    d.set_defaults(func=_demo)
    return p


def user_error_types() -> tuple:
    """Exceptions that mean bad input or an unusable file, not a bug: reported in one line."""
    from .memory import MemoryRefusal
    return (ValueError, OSError, MemoryRefusal)


def main(argv=None) -> int:
    """Run a `nit` subcommand. Bad input ends in one line `nit <cmd>: error: ...` on stderr and
    exit code 2 (as argparse's own errors); NIT_TRACEBACK=1 re-raises with the traceback."""
    args, rest = build_parser().parse_known_args(argv)
    if getattr(args, "passthrough", False):
        return args.func(args, rest) or 0
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.func(args)
    except user_error_types() as e:
        if os.environ.get("NIT_TRACEBACK"):
            raise
        print(f"nit {args.command}: error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
