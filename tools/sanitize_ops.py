"""A small pack through every CUDA op, forward and backward: the workload of compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitize_ops.py

Odd image sizes (1x1, 1xW, Hx1, a multi-tile image), D = 769 (not a multiple of the vector width),
head_dim 64 and 72, causal and not, fp32 / fp16 / bf16, and cross-length attention with an empty
sequence: the shapes where an index or a barrier is most likely wrong. Tiny, because every access
of every thread is checked. Exits 2 when the CUDA backend is unusable (nothing to check).
"""
import sys

import torch

import nit_kernels as nk
from nit_kernels import dispatch
from nit_kernels.testing import call_op, cast_inputs, op_inputs

SHAPES = {"adaln_modulate": {"dim": 769}, "gated_residual": {"dim": 769}, "residual_adaln": {"dim": 769},
          "rope_2d": {"heads": 3, "kv_heads": 1, "head_dim": 72}, "qk_norm_rope": {"heads": 2, "head_dim": 64}}


def _run(op, packed, dtype, **kw):
    inp = cast_inputs(op, op_inputs(op, packed, **kw.pop("shape")), dtype)
    outs = call_op(op, packed, inp, "cuda", **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [v for v in inp.values() if v.requires_grad]
    torch.autograd.grad([o.float().sum() for o in outs], leaves, allow_unused=True)


def main() -> int:
    why = dispatch.get("cuda").load_error()
    if why is not None:
        print(f"the cuda backend is unusable: {why}")
        return 2
    packed = nk.PackedSeqs.from_sizes([(1, 1), (1, 7), (5, 1), (9, 11), (3, 5)], device="cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for op, shape in SHAPES.items():
            _run(op, packed, dtype, shape=shape)
        for head_dim in (64, 72):
            for causal in (False, True):
                _run("varlen_attention", packed, dtype, shape={"heads": 4, "kv_heads": 2, "head_dim": head_dim},
                     causal=causal)
    # queries and keys of different lengths, one sequence without queries, one without keys
    cu_q = torch.tensor([0, 5, 5, 75, 76], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 3, 7, 72, 72], dtype=torch.int32, device="cuda")
    q = torch.randn(76, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    kv = torch.randn(2, 72, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    for causal in (False, True):
        o = nk.varlen_attention(q, kv[0], kv[1], cu_q, cu_k, 70, 65, causal=causal, backend="cuda")
        torch.autograd.grad(o.float().sum(), (q, kv))
    torch.cuda.synchronize()
    print("sanitize_ops: every CUDA op ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
