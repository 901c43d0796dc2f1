"""Compile every Triton kernel for NVIDIA GPUs on a machine without one.

    TRITON_INTERPRET=0 python tools/triton_compile_check.py [--arch 80,90] [--quick]

Runs the launchers of every op on CPU tensors with the kernel launches intercepted, then builds
each launch (every autotune config, after pruning, for the attention kernels) for the requested
architectures with Triton's own compiler and bundled ptxas: no driver, no GPU. Reports registers
per thread, spills (stack/local memory) and shared memory from the cubins against each
architecture's limits, and exits non-zero if a build fails or could not launch (shared memory or
registers beyond the limit); spills are reported, not failed (they cost speed, not correctness).
It shows that the GPU path compiles and fits; it runs nothing, so it says nothing about speed or
numerical results on a GPU.

Built on Triton 3.x internals (the JIT's argument binder); with another Triton it reports that.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

# dynamic shared memory per block and registers per SM of each architecture
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGS_PER_SM = 65536


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction or Autotuner handed to wrap_triton
    grid: object
    args: tuple
    kwargs: dict
    label: str      # shapes and dtype of the call
    op: object      # the launcher (op implementation) that made the launch


class _Recorder:
    """Stands in for wrap_triton(kernel)[grid](...): records the launch instead of running it."""

    def __init__(self, sink: list, context: dict):
        self.sink, self.context = sink, context

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: rec.sink.append(
                    Launch(kernel, grid, args, kwargs, rec.context.get("label", ""), rec.context.get("op")))

        return _Grid()


@contextlib.contextmanager
def recording(sink: list, context: dict | None = None):
    """Within the block, the op launchers record their kernel launches in `sink` instead of running them."""
    from nit_kernels.backends.triton import adaln, attention, rope
    mods = (adaln, attention, rope)
    saved = [m.wrap_triton for m in mods]
    rec = _Recorder(sink, {} if context is None else context)
    for m in mods:
        m.wrap_triton = rec
    try:
        yield rec.context
    finally:
        for m, w in zip(mods, saved):
            m.wrap_triton = w


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def collect(dtypes=("fp16", "bf16", "fp32"), dims=(384, 1152), head_dims=(64, 72, 128),
            causal=(False, True)) -> list[Launch]:
    """Every kernel launch of every op's forward and backward, on representative shapes."""
    from nit_kernels import PackedSeqs, rope_freqs
    from nit_kernels.backends.triton import adaln, attention, rope

    packed = PackedSeqs.from_sizes([(16, 16), (12, 20), (1, 1)])
    n, b, cu, sizes = packed.total_tokens, packed.num_seqs, packed.cu_seqlens, packed.sizes
    launches: list[Launch] = []
    with recording(launches) as ctx:
        def call(fn, *args):
            ctx["op"] = fn
            return fn(*args)

        for dt in (_DTYPES[name] for name in dtypes):
            for d in dims:
                x, y = torch.randn(n, d, dtype=dt), torch.randn(n, d, dtype=dt)
                rows = [torch.randn(b, d, dtype=dt) for _ in range(3)]
                stats = torch.ones(n)
                ctx["label"] = f"modulation {dt} D={d}"
                call(adaln.residual_adaln_fwd, x, y, *rows, cu, 1e-6)  # the fullest variant first (see --quick)
                call(adaln.adaln_modulate_fwd, x, rows[0], rows[1], cu, 1e-6)
                call(adaln.gated_residual_fwd, x, y, rows[0], cu)
                for det in (False, True):
                    torch.use_deterministic_algorithms(det)
                    try:
                        call(adaln.residual_adaln_bwd, x, x, x, y, rows[0], rows[1], stats, stats, cu)
                        call(adaln.adaln_modulate_bwd, x, x, rows[1], stats, stats, cu)
                        call(adaln.gated_residual_bwd, x, y, rows[0], cu)
                    finally:
                        torch.use_deterministic_algorithms(False)
            for hd in head_dims:
                q, k = torch.randn(n, 16, hd, dtype=dt), torch.randn(n, 16, hd, dtype=dt)
                f, w, st = rope_freqs(hd), torch.ones(hd), torch.ones(n, 16)
                ctx["label"] = f"rope {dt} Dh={hd}"
                call(rope.qk_norm_rope_fwd, q, k, cu, sizes, f, w, w, w, w, 1e-5, "official", 1.0)
                call(rope.rope_2d, q, k, cu, sizes, f, "grid", 1.0, False)
                call(rope.qk_norm_rope_bwd, q, k, q, k, cu, sizes, f, w, w, st, st, st, st, "grid", 1.0)
                for c in causal:
                    ctx["label"] = f"attention {dt} D={hd} causal={c}"
                    m = packed.max_seqlen
                    out, lse = call(attention.varlen_attention_fwd, q, k, k, cu, cu, m, m, hd ** -0.5, c)
                    call(attention.varlen_attention_bwd, q, q, k, k, out, lse, cu, cu, m, m, hd ** -0.5, c)
    return launches


def check_discovery(launches: list[Launch]) -> int:
    """torch.library.triton_op finds an op's kernels by reading its source (they then key
    torch.compile's caches): every kernel an op launched must be among those it finds."""
    from torch._library.triton import get_inner_triton_kernels

    missing = 0
    for op in {lch.op for lch in launches}:
        found = {id(k) for k in get_inner_triton_kernels(op)}
        lost = {lch.kernel for lch in launches if lch.op is op and id(lch.kernel) not in found}
        for kernel in lost:
            missing += 1
            print(f"FAIL  {op.__name__} launches {getattr(kernel, 'fn', kernel)} but triton_op's source scan "
                  f"does not find it")
    return missing


def _variants(launch: Launch, quick: bool):
    """(JITFunction, args, kwargs, config name) per autotune config after pruning."""
    from triton.runtime.autotuner import Autotuner

    k = launch.kernel
    if not isinstance(k, Autotuner):
        flags = [f"{a}={v}" for a, v in launch.kwargs.items() if a.isupper() and not a.startswith("BLOCK")]
        yield k, launch.args, launch.kwargs, ",".join(flags + [f"w{launch.kwargs.get('num_warps', 4)}"])
        return
    k.nargs = dict(zip(k.arg_names, launch.args))
    configs = k.prune_configs(launch.kwargs)
    for c in configs[:1] if quick else configs:
        name = ",".join(f"{a}={v}" for a, v in c.kwargs.items()) + f",w{c.num_warps},s{c.num_stages}"
        yield k.fn, launch.args, {**launch.kwargs, **c.all_kwargs()}, name


def _build(fn, args, kwargs, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resources(compiled) -> dict:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump reported no resource usage: {text[:200]!r}")
    regs, stack, static_smem, local = (int(v) for v in found.groups())
    return {"regs": regs, "stack": stack + local,
            "smem": int(compiled.metadata.shared) + max(static_smem, 0), "warps": int(compiled.metadata.num_warps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    ap.add_argument("--quick", action="store_true",
                    help="bf16, one shape, each kernel function once (its fullest variant, first autotune config)")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--head-dims", default="64,72,128")
    opts = ap.parse_args(argv)
    from nit_kernels.backends.triton import _common
    if _common.INTERPRETED:
        print("compile_check needs the compiled kernels: run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    archs = [int(a) for a in opts.arch.split(",")]
    if opts.quick:
        launches = collect(("bf16",), (1152,), (72,), (False,))
    else:
        launches = collect(opts.dtypes.split(","), (384, 1152), [int(h) for h in opts.head_dims.split(",")])
    failures = check_discovery(launches)
    print(f"triton_op source scan: {len({lch.op for lch in launches})} ops checked, {failures} kernels not found")
    seen, builds, spills = set(), 0, 0
    t0 = time.time()
    for launch in launches:
        for fn, args, kwargs, cfg in _variants(launch, opts.quick):
            if opts.quick and any(key[0] == fn.__name__ for key in seen):
                continue
            for arch in archs:
                key = (fn.__name__, launch.label, cfg, arch, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                builds += 1
                try:
                    r = _resources(_build(fn, args, kwargs, arch))
                except Exception as e:  # report every failing build, not only the first
                    failures += 1
                    print(f"FAIL  sm_{arch} {fn.__name__} [{launch.label}] {cfg}: {type(e).__name__}: {e}")
                    continue
                # too much shared memory or too many registers cannot launch; spills only run slower
                # (the autotuner then prefers another config)
                fits = r["smem"] <= SMEM_LIMIT.get(arch, 101376) and r["regs"] * 32 * r["warps"] <= REGS_PER_SM
                failures += not fits
                spills += fits and r["stack"] > 0
                status = "FAIL " if not fits else "spill" if r["stack"] else "ok   "
                print(f"{status} sm_{arch} {fn.__name__:<24} [{launch.label}] {cfg}: "
                      f"regs {r['regs']}, stack/local {r['stack']} B, smem {r['smem']} B", flush=True)
    print(f"{builds} builds, {failures} failing or not fitting, {spills} spilling registers, "
          f"{time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's nit_kernels
    sys.exit(main())
