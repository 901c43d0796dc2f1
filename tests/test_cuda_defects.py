"""Numerical and coverage properties of the compiled kernels that a plain reference grid misses.

Each test runs on the "cpu" backend where the property applies there, and on "cuda_sim" (the
csrc/cuda sources executed on the host by the SIMT simulator) when that backend is built;
without it the cuda_sim cases skip with the reason "cuda_sim backend not built".

- residual_adaln backward on residual streams whose row mean dwarfs the row std: the
  normalised values must come from x_new in fp32, not from x_new rounded to fp16/bf16.
- varlen attention: every row is computed whatever max_seqlen says (the kernels schedule the
  tiles cu_seqlens describes; the cpu backend refuses a too small value), empty sequences,
  dK/dQ within the accuracy rule at head_dim 128 (dS split hi + lo), strided q/k/v views.
"""
import pytest
import torch

import nit_kernels as nk
from nit_kernels import dispatch
from nit_kernels.testing import _ATOL, _forward_and_grads, assert_accuracy, check_against_reference

LOW = (torch.float16, torch.bfloat16)


def _why_not(backend: str):
    """None if `backend` can run here, else the skip reason."""
    if backend == "cuda_sim":
        if "cuda_sim" not in dispatch.BACKENDS or dispatch.get("cuda_sim").load_error() is not None:
            return "cuda_sim backend not built"
        return None
    return dispatch.get(backend).load_error()


def _backend_param(name: str):
    why = _why_not(name)
    return pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why)), id=name)


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


# the kernels of csrc/cuda run in the simulator here and on a GPU where there is one
GPU = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
BACKENDS = [_backend_param("cpu"), _backend_param("cuda_sim"), GPU]


def _check(op, backend, packed, inputs, dtype, **kw):
    """Forward and every gradient of `backend` against the reference by the accuracy rule, on
    `inputs` (fp64) rounded to `dtype` (as nit_kernels.testing.check_against_reference does)."""
    rounded = {k: v.to(dtype).double() for k, v in inputs.items()}
    hi = (torch.float64, torch.float64)
    lo = (torch.float32, torch.float32) if dtype == torch.float32 else (dtype, torch.float32)
    out_hi, g_hi = _forward_and_grads(op, packed, rounded, *hi, "reference", 1, kw)
    out_lo, g_lo = _forward_and_grads(op, packed, rounded, *lo, "reference", 1, kw)
    out_k, g_k = _forward_and_grads(op, packed, rounded, dtype, torch.float32, backend, 1, kw)
    pairs = [(f"output {i}", o, oh, ol) for i, (o, oh, ol) in enumerate(zip(out_k, out_hi, out_lo))]
    pairs += [(f"d{n}", g_k[n], g_hi[n], g_lo[n]) for n in g_k]
    for name, k, h, low in pairs:
        scale = max(1.0, h.abs().max().item()) if h.numel() else 1.0
        assert_accuracy(k, h, low, name=f"{op}[{backend},{dtype}] {name}", atol=_ATOL[dtype] * scale)


# ---------------------------------------------------------------------------------------------
# residual_adaln backward on real residual streams (row mean >> row std)
# ---------------------------------------------------------------------------------------------
def _residual_stream(packed, dim, mean_over_std, seed=0):
    """x, y, gate, shift, scale (fp64) with x_new = x + gate*y of row mean ~ mean_over_std x row std."""
    g = torch.Generator().manual_seed(seed)
    n, b = packed.total_tokens, packed.num_seqs

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    std = 0.5 + r(n, 1).abs()
    sign = torch.where(r(n, 1) >= 0, 1.0, -1.0)
    x = std * (r(n, dim) + sign * mean_over_std)
    inputs = {"x": x, "y": r(n, dim) * std * 0.3, "gate": r(b, dim) * 0.5,
              "shift": r(b, dim) * 0.5, "scale": r(b, dim) * 0.5}
    return {k: v.to(packed.device) for k, v in inputs.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("dim", [1, 2, 3, 5, 8])
def test_residual_adaln_backward_small_rows_with_large_mean(backend, dtype, dim):
    packed = nk.PackedSeqs.from_sizes([(1, 1), (3, 5), (2, 7)], device=_device(backend))
    _check("residual_adaln", backend, packed, _residual_stream(packed, dim, 6.0), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("mean_over_std", [4.0, 16.0])
def test_residual_adaln_backward_wide_rows_with_large_mean(backend, dtype, mean_over_std):
    packed = nk.PackedSeqs.from_sizes([(2, 3), (1, 5)], device=_device(backend))
    _check("residual_adaln", backend, packed, _residual_stream(packed, 1152, mean_over_std, seed=1), dtype)


# ---------------------------------------------------------------------------------------------
# varlen attention: scheduling from cu_seqlens, max_seqlen, dS precision, strided q/k/v
# ---------------------------------------------------------------------------------------------
SIM = [_backend_param("cuda_sim"), GPU]


def _attn(backend, q, k, v, cu, max_seqlen, causal=False):
    """The backend's kernel interface, below the public API's host checks of max_seqlen."""
    fn = dispatch.get(backend).impl("varlen_attention")
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, q.shape[-1] ** -0.5, causal)


def _attn_case(sizes, heads, head_dim, dtype, seed=0, device="cpu"):
    packed = nk.PackedSeqs.from_sizes(sizes, device=device)
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(packed.total_tokens, heads, head_dim, generator=g).to(device, dtype)
                     for _ in range(4))
    return packed, q, k, v, dout


def _fwd_bwd(backend, q, k, v, dout, cu, max_seqlen, causal=False):
    """out, dq, dk, dv; q, k, v that already require grad (views) are used as they are."""
    leaves = [t if t.requires_grad else t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = _attn(backend, *leaves, cu, max_seqlen, causal)
    return (out, *torch.autograd.grad(out, leaves, dout))


def _assert_attention_matches(backend, q, k, v, dout, packed, max_seqlen, causal=False, factor=2.0):
    """out, dq, dk, dv of `backend` (called with `max_seqlen`) against the reference by the
    accuracy rule: fp64 reference, with the reference in the input dtype (fp32 for fp32) as the
    baseline."""
    dtype = q.dtype
    got = _fwd_bwd(backend, q, k, v, dout, packed.cu_seqlens, max_seqlen, causal)
    hi = _fwd_bwd("reference", *(t.double() for t in (q, k, v, dout)), packed.cu_seqlens, packed.max_seqlen, causal)
    lo_dt = torch.float32 if dtype == torch.float32 else dtype
    lo = _fwd_bwd("reference", *(t.to(lo_dt) for t in (q, k, v, dout)), packed.cu_seqlens, packed.max_seqlen,
                  causal)
    for name, a, h, low in zip(("out", "dq", "dk", "dv"), got, hi, lo):
        scale = max(1.0, h.abs().max().item())
        assert_accuracy(a, h, low, name=f"attention[{backend},{dtype}] {name}", factor=factor,
                        atol=_ATOL[dtype] * scale)


# An ImageNet-like mix in miniature: one long image among many short ones, and empty sequences.
MIXED = [(9, 11), (1, 1), (2, 3), (1, 7), (5, 1), (3, 3), (2, 2), (1, 2)]


@pytest.mark.parametrize("backend", SIM)
@pytest.mark.parametrize("dtype, causal", [(torch.float32, False), (torch.float16, False), (torch.bfloat16, True)],
                         ids=str)
def test_attention_covers_every_row_whatever_max_seqlen_says(backend, dtype, causal):
    # the kernels schedule the tiles cu_seqlens describes: a max_seqlen smaller than the longest
    # image (99 tokens), or 0, must not leave rows of out/dq/dk/dv unwritten (at::empty garbage);
    # the kernels are deterministic, so the results equal those with the true max_seqlen
    packed, q, k, v, dout = _attn_case(MIXED, 2, 64, dtype, device=_device(backend))
    want = _fwd_bwd(backend, q, k, v, dout, packed.cu_seqlens, packed.max_seqlen, causal)
    for max_seqlen in (5, 0):
        got = _fwd_bwd(backend, q, k, v, dout, packed.cu_seqlens, max_seqlen, causal)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.equal(a, e), (f"max_seqlen={max_seqlen}: {name} differs from the run with the true "
                                       f"max_seqlen {packed.max_seqlen}; max |diff| {(a - e).abs().max()}")
    if not causal:
        _assert_attention_matches(backend, q, k, v, dout, packed, packed.max_seqlen)


@pytest.mark.parametrize("backend", SIM)
def test_attention_schedules_packs_with_empty_sequences(backend):
    # MIXED's 133 tokens split with empty sequences at the start, middle and end
    _, q, k, v, dout = _attn_case(MIXED, 2, 72, torch.float16, seed=3, device=_device(backend))
    cu = torch.tensor([0, 0, 99, 99, 100, 106, 106, 113, 118, 127, 131, 133, 133], dtype=torch.int32,
                      device=q.device)
    got = _fwd_bwd(backend, q, k, v, dout, cu, 99)
    want = _fwd_bwd("reference", q.float(), k.float(), v.float(), dout.float(), cu, 99)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.float(), e, atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_cpu_attention_refuses_a_max_seqlen_below_the_longest_sequence():
    # the cpu backend reads cu_seqlens on the host, so it refuses rather than covers
    if dispatch.get("cpu").load_error() is not None:
        pytest.skip(f"cpu backend unavailable: {dispatch.get('cpu').load_error()}")
    packed, q, k, v, _ = _attn_case(MIXED, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="max_seqlen_q=5"):
        _attn("cpu", q, k, v, packed.cu_seqlens, 5)


# seeds 0 (fp16) and 5, 6 (bf16) failed the rule with dS rounded once; 1 and 0 are controls
@pytest.mark.parametrize("backend", SIM)
@pytest.mark.parametrize("dtype, seed", [(torch.float16, 0), (torch.float16, 1), (torch.bfloat16, 0),
                                         (torch.bfloat16, 5), (torch.bfloat16, 6)], ids=str)
def test_attention_backward_head_dim_128_within_the_accuracy_rule(backend, dtype, seed):
    # dS rounded once to fp16/bf16 before the dK/dQ products put dk at 1.01x the bound (fp16) and
    # past it on 2 of 8 seeds (bf16); the hi + lo split keeps dS to about twice the precision
    packed = nk.PackedSeqs.from_sizes(((1, 1), (1, 7), (5, 1), (3, 5), (4, 4), (2, 9)), device=_device(backend))
    check_against_reference("varlen_attention", backend, packed, dtype, seed=seed,
                            shape={"heads": 2, "head_dim": 128})


@pytest.mark.parametrize("backend", SIM)
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 72), (torch.float16, 64), (torch.bfloat16, 72)],
                         ids=str)
def test_attention_reads_strided_qkv_views(backend, dtype, head_dim):
    # q, k, v as views of one fused projection, qkv.view(N, 3, H, D).unbind(1): token stride
    # 3*H*D, head stride D; the results must equal those of contiguous copies (whose accuracy
    # the reference grid checks)
    packed, *_ = _attn_case(MIXED, 2, head_dim, dtype, device=_device(backend))
    g = torch.Generator().manual_seed(7)
    n = packed.total_tokens
    qkv = torch.randn(n, 3 * 2 * head_dim, generator=g).to(packed.device, dtype).requires_grad_()
    q, k, v = qkv.view(n, 3, 2, head_dim).unbind(1)  # views (not copies) reach the kernel
    assert not q.is_contiguous() and q.stride() == (3 * 2 * head_dim, head_dim, 1)
    dout = torch.randn(n, 2, head_dim, generator=g).to(packed.device, dtype)
    strided = _fwd_bwd(backend, q, k, v, dout, packed.cu_seqlens, packed.max_seqlen)
    dense = _fwd_bwd(backend, *(t.detach().contiguous() for t in (q, k, v)), dout, packed.cu_seqlens,
                     packed.max_seqlen)
    for name, a, e in zip(("out", "dq", "dk", "dv"), strided, dense):
        assert torch.equal(a, e), f"{name}: strided views differ from contiguous copies by {(a - e).abs().max()}"
