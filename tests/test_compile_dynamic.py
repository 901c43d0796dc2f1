"""torch.compile over packs of changing shape: a new max_seqlen (or token count) must not
recompile a compiled graph, and dynamic=True must trace every op with fullgraph=True.

The max_seqlen_* arguments of the attention ops are SymInt in the schemas (csrc/registration.cpp)
so that dynamo keeps them symbolic; the backend choice is a constant of the trace.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import nit_kernels as nk
from nit_kernels import dispatch

_WHY = dispatch.get("cpu").load_error()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable: {_WHY}")

HEADS, HEAD_DIM = 2, 16
# 10 packs, each with a different longest image (max_seqlen 3 .. 30) and token count
PACKS = [[(1, i + 2), (i + 1, 3), (2, 2)] for i in range(10)]


def _attn_inputs(sizes, dtype=torch.float32, requires_grad=False):
    packed = nk.PackedSeqs.from_sizes(sizes)
    g = torch.Generator().manual_seed(packed.total_tokens)
    q, k, v = (torch.randn(packed.total_tokens, HEADS, HEAD_DIM, generator=g, dtype=dtype)
               .requires_grad_(requires_grad) for _ in range(3))
    return packed, q, k, v


def _attention(q, k, v, cu, max_seqlen):
    return nk.varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, backend="cpu")


def test_new_max_seqlen_does_not_recompile():
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(_attention, backend=counter, fullgraph=True)
    frames = []
    for sizes in PACKS:
        packed, q, k, v = _attn_inputs(sizes)
        out = compiled(q, k, v, packed.cu_seqlens, packed.max_seqlen)
        ref = _attention(q, k, v, packed.cu_seqlens, packed.max_seqlen)
        torch.testing.assert_close(out, ref)
        frames.append(counter.frame_count)
    # the first call compiles for its values; the second finds them changing and compiles one
    # graph with symbolic sizes (dynamo's automatic dynamic shapes); no value after that recompiles
    assert frames[-1] == frames[1] and frames[1] <= 2, f"compiled frames after each pack: {frames}"


def test_dynamic_true_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def chain(x, y, gate, shift, scale, q, k, v, packed):
        cu, max_seqlen = packed.cu_seqlens, packed.max_seqlen
        x_new, h = nk.residual_adaln(x, y, gate, shift, scale, packed, backend="cpu")
        qr, kr = nk.rope_2d(q, k, packed, nk.rope_freqs(q.shape[-1]), backend="cpu")
        o = nk.varlen_attention(qr, kr, v, cu, cu, max_seqlen, max_seqlen, backend="cpu")
        return x_new.sum() + (h * h).sum() + (o * o).sum()

    compiled = torch.compile(chain, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for sizes in PACKS[:3]:
        packed, q, k, v = _attn_inputs(sizes, requires_grad=True)
        n, b = packed.total_tokens, packed.num_seqs
        g = torch.Generator().manual_seed(n)
        mod = [torch.randn(n, 24, generator=g).requires_grad_() for _ in range(2)]
        rows = [(0.5 * torch.randn(b, 24, generator=g)).requires_grad_() for _ in range(3)]
        leaves = [*mod, *rows, q, k, v]
        args = (*leaves, packed)
        got = torch.autograd.grad(compiled(*args), leaves)
        want = torch.autograd.grad(chain(*args), leaves)
        for i, (a, e) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, e, msg=lambda m, i=i: f"gradient {i}: {m}")
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1], f"dynamic=True recompiled for new packs: frames after each pack {frames}"
