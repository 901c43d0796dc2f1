"""A tour of the kernels on a realistic pack: every op on every usable backend, checked against
the reference and timed (median of a few runs). `nit kernels` runs it."""
from __future__ import annotations

import statistics
import time

import torch

import nit_kernels as nk
from nit_kernels import dispatch as backends
from nit_kernels.dispatch import OPS, Call
from nit_kernels.testing import call_op, cast_inputs, op_inputs

from .workloads import imagenet_like_pack


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(tokens: int = 4096, dim: int = 384, heads: int = 6, head_dim: int = 64, reps: int = 5, seed: int = 0):
    sizes = imagenet_like_pack(tokens, seed=seed)
    packed = nk.PackedSeqs.from_sizes(sizes)
    print(f"pack: {packed.num_seqs} ImageNet-like images, {packed.total_tokens} tokens "
          f"(longest {packed.max_seqlen}); D={dim}, H={heads}, Dh={head_dim}, fp32, {torch.get_num_threads()} threads")
    print(f"{'op':<18} {'backend':<10} {'fwd+bwd ms':>11} {'vs reference':>13} {'max |err|':>10}")
    rows = []
    for op in OPS:
        shape = {"dim": dim} if op in ("adaln_modulate", "gated_residual", "residual_adaln") else \
            {"heads": heads, "head_dim": head_dim}
        base = op_inputs(op, packed, seed=seed, **shape)
        results = {}
        for name in ("reference", "cpu"):
            if backends.get(name).refuse(Call(op, torch.device("cpu"), torch.float32, head_dim=head_dim)):
                continue
            inp = cast_inputs(op, base, torch.float32)

            def step():
                outs = call_op(op, packed, inp, name)
                outs = outs if isinstance(outs, tuple) else (outs,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

            step()
            ms = _time(step, reps) * 1e3
            with torch.no_grad():
                out = call_op(op, packed, inp, name)
            results[name] = (ms, out if isinstance(out, tuple) else (out,))
        ref_ms, ref_out = results["reference"]
        for name, (ms, out) in results.items():
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref_out))
            print(f"{op:<18} {name:<10} {ms:>11.2f} {ref_ms / ms:>12.2f}x {err:>10.2e}")
            rows.append({"op": op, "backend": name, "ms": ms, "speedup": ref_ms / ms, "max_err": err})
    return rows
