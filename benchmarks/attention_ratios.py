"""Side-by-side speed ratios of CPU varlen attention: bf16 tiles vs our fp32 attention vs SDPA per image.

    python -m benchmarks.attention_ratios [--threads 1] [--rounds 7] [--pressure-limit 5] [--quick]
    python -m benchmarks.attention_ratios --sweep 16,24,32,48,64 [--sweep-tokens 2048] [--clock cpu]

Implementations are timed in interleaved rounds (A, B, C, D, A, B, C, D, ...): in each round every
implementation runs `--calls` times and keeps its median, and the round's ratios (time of the first
implementation / time of each other one: > 1 means the first is faster) are recorded. The figures
are the medians of the per-round ratios, so load that drifts between rounds cancels out. A round
during which /proc/pressure/cpu reported 'some avg10' above --pressure-limit is dropped (the count
is printed; when every round is above it, all are kept and the output says so). Nothing is
written to benchmarks/results: this prints a table with the conditions of the run.

--clock wall (default) times wall-clock seconds; --clock cpu times the CPU seconds of the process
(all its threads, time.process_time): on a machine shared with other work it does not count the
time the process waited for a core, but it does count threads that spin while waiting for others,
so use it with --threads 1.

Implementations (q, k, v [N, H, Dh], non-causal, scale Dh^-0.5):
  bf16        nit_kernels.varlen_attention on bf16 inputs, default path (AMX tiles where present)
  bf16/fp32   the same on the fp32 tiles (NIT_CPU_ATTENTION_ISA=fp32): what bf16 cost before
  fp32        nit_kernels.varlen_attention on fp32 inputs
  sdpa bf16   torch SDPA once per image on 4-D [1, H, s, Dh] views, bf16 (its fused CPU kernel)

--sweep L1,L2,...: where the bf16 tiles overtake the fp32 tiles. For each image length L, a pack of
--sweep-tokens // L images of L tokens (at least one), forward and backward timed apart on the ops
(torch.ops.nit.varlen_attention_fwd / _bwd, the backward fed one saved forward), in bf16:
  default     unforced: each image on the path csrc/cpu/attention_bf16.h chooses for its length
  tiles       every image on the bf16 tiles (NIT_CPU_ATTENTION_ISA set to the ISA detected here:
              amx, else avx512_bf16, which runs where ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 hides AMX)
  fp32 tiles  every image on the fp32 tiles (NIT_CPU_ATTENTION_ISA=fp32)
The ratios time(other) / time(default) should never fall below 1 for "fp32 tiles". The order of the
three rotates from round to round.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import nit_kernels as nk
from nit_kernels import PackedSeqs

ENV_ISA = "NIT_CPU_ATTENTION_ISA"
MODELS = {"NiT-S": (6, 64), "NiT-XL": (16, 72)}


def cpu_pressure() -> float:
    """'some avg10' of /proc/pressure/cpu (percent of the last 10 s a task waited for a CPU); -1 if absent."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return -1.0


def _ours(dtype, isa):
    def make(q, k, v, packed, scale):
        cu, m = packed.cu_seqlens, packed.max_seqlen

        def fn():
            old = os.environ.get(ENV_ISA)
            if isa:
                os.environ[ENV_ISA] = isa
            try:
                return nk.varlen_attention(q, k, v, cu, cu, m, m, softmax_scale=scale, backend="cpu")
            finally:
                if isa:
                    os.environ.pop(ENV_ISA) if old is None else os.environ.__setitem__(ENV_ISA, old)
        return fn
    return dtype, make


def _sdpa(q, k, v, packed, scale):
    lens = [h * w for h, w in packed.size_list]

    def fn():
        return torch.cat([F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None],
                                                         c.transpose(0, 1)[None], scale=scale)[0].transpose(0, 1)
                          for a, b, c in zip(q.split(lens), k.split(lens), v.split(lens))])
    return fn


IMPLS = {
    "bf16": _ours(torch.bfloat16, None),
    "bf16/fp32": _ours(torch.bfloat16, "fp32"),
    "fp32": _ours(torch.float32, None),
    "sdpa bf16": (torch.bfloat16, _sdpa),
}


def _prepare(sizes, heads, head_dim, seed=0):
    packed = PackedSeqs.from_sizes(sizes)
    n = packed.total_tokens
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(n, heads, head_dim, generator=g) for _ in range(4)]
    calls = {}
    for name, (dtype, make) in IMPLS.items():
        q, k, v = (t.to(dtype).requires_grad_() for t in base[:3])
        calls[name] = (make(q, k, v, packed, head_dim ** -0.5), [q, k, v], base[3].to(dtype))
    return calls


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _time(fn, leaves, grad, pass_, calls):
    times = []
    for _ in range(calls):
        for t in leaves:
            t.grad = None
        t0 = _clock()
        if pass_ == "fwd":
            with torch.no_grad():
                fn()
        else:
            fn().backward(grad)
        times.append(_clock() - t0)
    return statistics.median(times)


def measure(sizes, heads, head_dim, pass_, rounds, calls, pressure_limit):
    impls = _prepare(sizes, heads, head_dim)
    for fn, leaves, grad in impls.values():  # warm-up (kernel JIT, caches)
        _time(fn, leaves, grad, pass_, 1)
    kept, dropped, pressures = [], 0, []
    for _ in range(rounds):
        p0 = cpu_pressure()
        row = {name: _time(fn, leaves, grad, pass_, calls) for name, (fn, leaves, grad) in impls.items()}
        p = max(p0, cpu_pressure())
        pressures.append(p)
        if p > pressure_limit:
            dropped += 1
            kept.append((row, False))
        else:
            kept.append((row, True))
    use = [r for r, ok in kept if ok] or [r for r, _ in kept]
    first = next(iter(IMPLS))
    ms = {name: 1e3 * statistics.median(r[name] for r in use) for name in IMPLS}
    ratios = {name: statistics.median(r[name] / r[first] for r in use) for name in IMPLS if name != first}
    return ms, ratios, dropped, len(use), pressures


def _detected_tiles():
    """The bf16 tiles' ISA that NIT_CPU_ATTENTION_ISA can force in this process, or None."""
    q = torch.zeros(2, 1, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    old = os.environ.get(ENV_ISA)
    try:
        for isa in ("amx", "avx512_bf16"):
            os.environ[ENV_ISA] = isa
            try:
                torch.ops.nit.varlen_attention_fwd(q, q, q, cu, cu, 2, 2, 1.0, False)
                return isa
            except RuntimeError:
                pass
        return None
    finally:
        os.environ.pop(ENV_ISA) if old is None else os.environ.__setitem__(ENV_ISA, old)


def sweep(lengths, tokens, rounds, calls, pressure_limit):
    old = os.environ.get(ENV_ISA)
    try:
        _sweep(lengths, tokens, rounds, calls, pressure_limit)
    finally:
        os.environ.pop(ENV_ISA, None) if old is None else os.environ.__setitem__(ENV_ISA, old)


def _sweep(lengths, tokens, rounds, calls, pressure_limit):
    from nit_kernels.backends import cpu  # noqa: F401  (loads the extension: torch.ops.nit)
    tiles = _detected_tiles()
    settings = {"default": None, "tiles": tiles, "fp32 tiles": "fp32"}
    if tiles is None:
        del settings["tiles"]
    print(f"bf16 tiles forced as: {tiles}; ratio = time(other) / time(default) per round, median over rounds "
          f"(> 1: default is faster)")
    print("model | pass | images x tokens | " + " | ".join(f"{n} ms" for n in settings) + " | "
          + " | ".join(f"{n} / default" for n in settings if n != "default") + " | rounds kept | psi avg10 (min-max)")
    for mname, (h, dh) in MODELS.items():
        for pass_ in ("fwd", "bwd"):
            for L in lengths:
                n = max(1, tokens // L)
                cu = torch.arange(n + 1, dtype=torch.int32) * L
                g = torch.Generator().manual_seed(0)
                q, k, v, do = (torch.randn(n * L, h, dh, generator=g).bfloat16() for _ in range(4))
                scale = dh ** -0.5
                os.environ[ENV_ISA] = "fp32"
                out, lse = torch.ops.nit.varlen_attention_fwd(q, k, v, cu, cu, L, L, scale, False)

                def once(setting):
                    os.environ.pop(ENV_ISA, None) if setting is None else os.environ.__setitem__(ENV_ISA, setting)
                    t0 = _clock()
                    if pass_ == "fwd":
                        torch.ops.nit.varlen_attention_fwd(q, k, v, cu, cu, L, L, scale, False)
                    else:
                        torch.ops.nit.varlen_attention_bwd(do, q, k, v, out, lse, cu, cu, L, L, scale, False)
                    return _clock() - t0

                for s in settings.values():
                    once(s)
                rows = []
                names = list(settings)
                for i in range(rounds):
                    # the order rotates from round to round: whatever ran right after the fp32 tiles
                    # measured 2-5% slower than in another place of the round
                    order = names[i % len(names):] + names[:i % len(names)]
                    p0 = cpu_pressure()
                    row = {name: statistics.median(once(settings[name]) for _ in range(calls)) for name in order}
                    rows.append((row, max(p0, cpu_pressure())))
                use = [r for r, p in rows if p <= pressure_limit] or [r for r, _ in rows]
                ps = [p for _, p in rows]
                kept = f"{len(use)}/{rounds}" + ("" if any(p <= pressure_limit for p in ps) else " (all above the limit: kept)")
                ms = {name: 1e3 * statistics.median(r[name] for r in use) for name in settings}
                ratios = {name: statistics.median(r[name] / r["default"] for r in use) for name in settings
                          if name != "default"}
                print(f"{mname} | {pass_} | {n} x {L} | " + " | ".join(f"{ms[x]:.3f}" for x in settings) + " | "
                      + " | ".join(f"{ratios[x]:.2f}" for x in ratios) + f" | {kept} | {min(ps):.0f}-{max(ps):.0f}",
                      flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="calls per implementation per round (median kept)")
    ap.add_argument("--pressure-limit", type=float, default=5.0)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed seconds; cpu: CPU seconds of the process (use with --threads 1)")
    ap.add_argument("--quick", action="store_true", help="one tiny workload, 2 rounds (a smoke test)")
    ap.add_argument("--sweep", help="image lengths L1,L2,...: bf16 tiles vs fp32 tiles on packs of equal images")
    ap.add_argument("--sweep-tokens", type=int, default=2048, help="tokens per pack in --sweep")
    args = ap.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    if args.sweep:
        print(f"clock={args.clock} threads={args.threads} rounds={args.rounds} calls/round={args.calls} "
              f"pressure limit={args.pressure_limit} torch={torch.__version__} "
              f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}")
        sweep([int(x) for x in args.sweep.split(",")], args.sweep_tokens, args.rounds, args.calls, args.pressure_limit)
        return
    if args.quick:
        workloads = [("2 x 8x8", [(8, 8)] * 2)]
        models = {"tiny": (2, 16)}
        args.rounds, args.calls = 2, 1
    else:
        from .workloads import imagenet_like_pack
        workloads = [("4 x 1024", [(32, 32)] * 4), ("imagenet-like 4k", imagenet_like_pack(4096))]
        models = MODELS
    first = next(iter(IMPLS))
    print(f"clock={args.clock} threads={args.threads} rounds={args.rounds} calls/round={args.calls} pressure limit={args.pressure_limit} "
          f"torch={torch.__version__} cpu capability={torch.backends.cpu.get_cpu_capability()}")
    print(f"ratio = time(other) / time({first}) per round, median over rounds (> 1: {first} is faster)")
    header = "workload | model | pass | " + " | ".join(f"{n} ms" for n in IMPLS) + " | " + \
        " | ".join(f"{n} / {first}" for n in IMPLS if n != first) + " | rounds kept | psi avg10 (min-max)"
    for wname, sizes in workloads:
        lens = [h * w for h, w in sizes]
        print(f"workload {wname}: {len(lens)} images, {sum(lens)} tokens, {min(lens)}-{max(lens)} per image")
    print(header)
    for wname, sizes in workloads:
        for mname, (h, dh) in models.items():
            for pass_ in ("fwd", "fwd+bwd"):
                ms, ratios, dropped, used, ps = measure(sizes, h, dh, pass_, args.rounds, args.calls,
                                                        args.pressure_limit)
                note = f"{used}/{args.rounds}" + (" (all above the limit: kept)" if dropped == args.rounds else "")
                print(f"{wname} | {mname} | {pass_} | " + " | ".join(f"{ms[n]:.2f}" for n in IMPLS) + " | "
                      + " | ".join(f"{ratios[n]:.2f}" for n in ratios) + f" | {note} | {min(ps):.0f}-{max(ps):.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
