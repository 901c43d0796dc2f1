"""The CUDA backend on a GPU: every op against the reference (forward and all gradients, by the
accuracy rule of nit_kernels.testing), the shapes that select different kernel paths, grouped
and cross-length attention, bitwise determinism of the backward, packing invariance, streams,
errors, opcheck and torch.compile.

All tests are marked `gpu` (tests/conftest.py skips them without a CUDA device) and skip with the
backend's own reason when nit_kernels._C was built without CUDA kernels. tests/test_ops_conformance.py
covers the common grid for `cuda` as well; this module adds what is specific to the CUDA kernels.
"""
import pytest
import torch

import nit_kernels as nk
from nit_kernels import dispatch, reference
from nit_kernels.dispatch import Call
from nit_kernels.testing import (ODD_PACKS, assert_accuracy, call_op, cast_inputs, check_against_reference,
                                 op_inputs, random_sizes)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
PACKS = {
    "odd": ODD_PACKS[4],                               # 1x1, 1x7, 5x1, 3x5, 4x4, 2x9
    "multi-tile": ((16, 24), (1, 1), (9, 11)),          # 384 tokens: several 64-row tiles
    "many": tuple(random_sizes(40, max_side=9, seed=3)),
}


@pytest.fixture(autouse=True)
def _backend_served(request):
    """Skips with the backend's own reason: the cuda backend, or the one a test is parametrized with."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend", "cuda") if callspec else "cuda"
    why = dispatch.get(name).load_error()
    if why is None and name == "triton":
        from nit_kernels.backends.triton import interpreting
        why = "the Triton kernels were loaded for the interpreter (TRITON_INTERPRET=1)" if interpreting() else None
    if why is not None:
        pytest.skip(f"{name} backend unusable: {why}")


def _pack(name):
    return nk.PackedSeqs.from_sizes(PACKS[name], device="cuda")


# ---------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------
ROW_CASES = [(op, d) for op in ("adaln_modulate", "gated_residual", "residual_adaln")
             for d in (1, 8, 384, 769, 1152, 4100)]  # 4100 > 2048: one block per row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pack", ["odd", "many"])
@pytest.mark.parametrize("op, dim", ROW_CASES, ids=[f"{o}-D{d}" for o, d in ROW_CASES])
def test_row_ops_match_reference(op, dim, pack, dtype):
    check_against_reference(op, "cuda", _pack(pack), dtype, shape={"dim": dim})


ROPE_CASES = [(op, hd, kvh, kw) for op in ("rope_2d", "qk_norm_rope") for hd in (64, 72, 128) for kvh in (3, 1)
              for kw in ({"positions": "grid"}, {"positions": "official", "mscale": 1.25})]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pack", ["odd", "multi-tile"])
@pytest.mark.parametrize("op, head_dim, kv_heads, kw", ROPE_CASES,
                         ids=[f"{c[0]}-hd{c[1]}-kvh{c[2]}-{c[3]['positions']}" for c in ROPE_CASES])
def test_rope_ops_match_reference(op, head_dim, kv_heads, kw, pack, dtype):
    check_against_reference(op, "cuda", _pack(pack), dtype,
                            shape={"heads": 3, "kv_heads": kv_heads, "head_dim": head_dim}, **kw)


def test_qk_norm_rope_head_dim_256():
    check_against_reference("qk_norm_rope", "cuda", _pack("odd"), torch.float32,
                            shape={"heads": 2, "head_dim": 256})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 72, 128, 40])
@pytest.mark.parametrize("pack", ["odd", "multi-tile", "many"])
def test_attention_matches_reference(pack, head_dim, causal, dtype):
    check_against_reference("varlen_attention", "cuda", _pack(pack), dtype,
                            shape={"heads": 2, "head_dim": head_dim}, causal=causal)


def _attention_case(dtype, lens_q, lens_k, heads, kv_heads, head_dim, causal, seed=0):
    """cuda vs reference with separate q/k lengths per sequence (zero lengths allowed)."""
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
    nq, nk_ = sum(lens_q), sum(lens_k)
    base = {"q": torch.randn(nq, heads, head_dim, generator=g, dtype=torch.float64),
            "k": torch.randn(nk_, kv_heads, head_dim, generator=g, dtype=torch.float64),
            "v": torch.randn(nk_, kv_heads, head_dim, generator=g, dtype=torch.float64)}
    base = {k: v.to(dtype).double().cuda() for k, v in base.items()}  # the inputs every run sees
    dout = torch.randn(nq, heads, head_dim, generator=g, dtype=torch.float64).cuda()

    def run(run_dtype, backend):
        t = {k: v.to(run_dtype).requires_grad_(True) for k, v in base.items()}
        out = nk.varlen_attention(t["q"], t["k"], t["v"], cu_q, cu_k, max(lens_q), max(lens_k),
                                  causal=causal, backend=backend)
        grads = torch.autograd.grad(out, [t["q"], t["k"], t["v"]], dout.to(run_dtype))
        return [out, *grads]

    hi = run(torch.float64, "reference")
    lo = run(torch.float32 if dtype == torch.float32 else dtype, "reference")
    got = run(dtype, "cuda")
    for name, o, h, lo_ in zip(("out", "dq", "dk", "dv"), got, hi, lo):
        assert o.dtype == dtype
        scale = max(1.0, h.abs().max().item()) if h.numel() else 1.0
        assert_accuracy(o, h, lo_, name=f"varlen_attention[cuda,{dtype}] {name}", atol=ATOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_cross_lengths_and_empty_sequences(dtype, causal):
    # sq < sk, sq > sk (causal rows that see no key output 0), empty q or k sides
    _attention_case(dtype, [5, 70, 1, 0, 33, 3], [9, 64, 130, 4, 0, 1], heads=2, kv_heads=2,
                    head_dim=64, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 72])
def test_attention_grouped_query_heads(dtype, head_dim):
    _attention_case(dtype, [17, 80, 1], [17, 80, 1], heads=4, kv_heads=2, head_dim=head_dim, causal=False)
    _attention_case(dtype, [17, 80, 1], [17, 80, 1], heads=3, kv_heads=1, head_dim=head_dim, causal=True)


def test_unaligned_inputs_take_the_scalar_path():
    # a 4-byte storage offset defeats 16-byte vector loads: the scalar path must give the same math
    packed = _pack("odd")
    n, d = packed.total_tokens, 384
    buf = torch.randn(n * d + 1, device="cuda")
    x = buf[1:].view(n, d)
    assert x.data_ptr() % 16 != 0
    shift, scale = torch.randn(2, packed.num_seqs, d, device="cuda") * 0.5
    got = nk.adaln_modulate(x, shift, scale, packed, backend="cuda")
    aligned = nk.adaln_modulate(x.clone(), shift, scale, packed, backend="cuda")
    ref = reference.adaln_modulate(x.double(), shift.double(), scale.double(), packed.cu_seqlens)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aligned.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# determinism, packing invariance, streams, devices
# ---------------------------------------------------------------------------------------------
DET_CASES = [("adaln_modulate", {"dim": 384}, {}), ("gated_residual", {"dim": 1152}, {}),
             ("residual_adaln", {"dim": 769}, {}), ("rope_2d", {"heads": 4, "head_dim": 64}, {}),
             ("qk_norm_rope", {"heads": 4, "kv_heads": 2, "head_dim": 72}, {}),
             ("varlen_attention", {"heads": 2, "head_dim": 64}, {"causal": False}),
             ("varlen_attention", {"heads": 2, "head_dim": 128}, {"causal": True})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op, shape, kw", DET_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DET_CASES)])
def test_backward_is_bitwise_deterministic(op, shape, kw, dtype):
    packed = nk.PackedSeqs.from_sizes(random_sizes(120, max_side=24, seed=5), device="cuda")
    inputs = op_inputs(op, packed, seed=1, **shape)
    runs = []
    for _ in range(3):
        inp = cast_inputs(op, inputs, dtype)
        outs = call_op(op, packed, inp, "cuda", **kw)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator(device="cuda").manual_seed(7)
        gos = [torch.randn(o.shape, generator=g, device="cuda").to(o.dtype) for o in outs]
        names = [k for k, v in inp.items() if v.requires_grad]
        runs.append(torch.autograd.grad(outs, [inp[k] for k in names], gos))
    for name, a, b, c in zip(names, *runs):
        assert torch.equal(a, b) and torch.equal(a, c), f"{op}: d{name} differs between identical runs"


@pytest.mark.parametrize("op, shape, kw", [("adaln_modulate", {"dim": 384}, {}),
                                           ("qk_norm_rope", {"heads": 2, "head_dim": 64}, {}),
                                           ("varlen_attention", {"heads": 2, "head_dim": 72}, {"causal": True})])
def test_forward_is_packing_invariant(op, shape, kw):
    # each image's rows depend on that image only, computed by the same arithmetic in any pack
    sizes = [(3, 5), (16, 9), (1, 1), (7, 2)]
    packed = nk.PackedSeqs.from_sizes(sizes, device="cuda")
    inp = cast_inputs(op, op_inputs(op, packed, seed=2, **shape), torch.float16, requires_grad=False)
    whole = call_op(op, packed, inp, "cuda", **kw)
    whole = whole[0] if isinstance(whole, tuple) else whole
    cu = packed.cu_seqlens.tolist()
    for i, hw in enumerate(sizes):
        one = nk.PackedSeqs.from_sizes([hw], device="cuda")
        part = {}
        for name, t in inp.items():
            if name in ("x", "y", "q", "k", "v"):          # per token
                part[name] = t[cu[i]:cu[i + 1]]
            elif name in ("shift", "scale", "gate"):       # per image
                part[name] = t[i:i + 1]
            else:                                          # freqs, LayerNorm parameters
                part[name] = t
        alone = call_op(op, one, part, "cuda", **kw)
        alone = alone[0] if isinstance(alone, tuple) else alone
        assert torch.equal(whole[cu[i]:cu[i + 1]], alone), f"{op}: image {i} differs when packed"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernels_run_on_the_current_stream(backend):
    """The inputs are written on a side stream after that stream has slept for tens of milliseconds;
    kernels launched there (the current stream) read them, a kernel launched on the default stream
    would read the NaN the buffers held before and fail the comparison."""
    packed = _pack("multi-tile")
    n = packed.total_tokens
    q, k, v = torch.randn(3, n, 2, 64, device="cuda", dtype=torch.float16)
    x = torch.randn(n, 384, device="cuda")
    shift, scale = torch.randn(2, packed.num_seqs, 384, device="cuda")
    meta = (packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen)
    want = nk.varlen_attention(q, k, v, *meta, backend=backend)
    want_h = nk.adaln_modulate(x, shift, scale, packed, backend=backend)
    staged = [torch.full_like(t, float("nan")) for t in (q, k, v, x)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # about 50 ms of spinning on the side stream only
        for dst, src in zip(staged, (q, k, v, x)):
            dst.copy_(src)
        got = nk.varlen_attention(*staged[:3], *meta, backend=backend)
        got_h = nk.adaln_modulate(staged[3], shift, scale, packed, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got, want), "attention ran before its inputs were ready: not on the current stream"
    assert torch.equal(got_h, want_h), "adaln_modulate ran before its inputs were ready: not on the current stream"


def test_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    packed = nk.PackedSeqs.from_sizes(PACKS["odd"], device="cuda:1")
    check_against_reference("adaln_modulate", "cuda", packed, torch.float32, shape={"dim": 384})
    check_against_reference("varlen_attention", "cuda", packed, torch.bfloat16, shape={"head_dim": 64})


# ---------------------------------------------------------------------------------------------
# refusals, errors, registration
# ---------------------------------------------------------------------------------------------
def test_refuses_attention_head_dim_over_128():
    why = dispatch.get("cuda").refuse(Call("varlen_attention", torch.device("cuda"), torch.float16, head_dim=160))
    assert why is not None and "head_dim <= 128" in why
    assert dispatch.get("cuda").refuse(Call("varlen_attention", torch.device("cuda"), torch.float16,
                                            head_dim=128, gqa=True)) is None


def test_bad_calls_raise_clear_errors():
    packed = _pack("odd")
    n, d = packed.total_tokens, 64
    x = torch.randn(n, d, device="cuda")
    shift = torch.randn(packed.num_seqs, d, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.nit.adaln_modulate_fwd(x.t().contiguous().t(), shift, shift, packed.cu_seqlens, 1e-6)
    with pytest.raises(RuntimeError, match="cu_seqlens is on cpu"):
        torch.ops.nit.adaln_modulate_fwd(x, shift, shift, packed.cu_seqlens.cpu(), 1e-6)
    with pytest.raises(RuntimeError, match=r"shift must have shape"):
        torch.ops.nit.adaln_modulate_fwd(x, shift[:1], shift, packed.cu_seqlens, 1e-6)
    q = torch.randn(n, 2, 160, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim 1..128"):
        torch.ops.nit.varlen_attention_fwd(q, q, q, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                           packed.max_seqlen, 0.1, False)
    q = torch.randn(n, 3, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(n, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        torch.ops.nit.varlen_attention_fwd(q, k, k, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                           packed.max_seqlen, 0.1, False)


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope",
                                "varlen_attention"])
def test_opcheck(op):
    packed = _pack("odd")
    inp = cast_inputs(op, op_inputs(op, packed, seed=4, head_dim=64), torch.float32)
    cu, sizes = packed.cu_seqlens, packed.sizes
    f = {k: v for k, v in inp.items()}
    calls = {
        "adaln_modulate": (torch.ops.nit.adaln_modulate_fwd, (f["x"], f["shift"], f["scale"], cu, 1e-6)),
        "gated_residual": (torch.ops.nit.gated_residual_fwd, (f["x"], f["y"], f["gate"], cu)),
        "residual_adaln": (torch.ops.nit.residual_adaln_fwd,
                           (f["x"], f["y"], f["gate"], f["shift"], f["scale"], cu, 1e-6)),
        "rope_2d": (torch.ops.nit.rope_2d, (f["q"], f["k"], cu, sizes, f["freqs"], "grid", 1.0, False)),
        "qk_norm_rope": (torch.ops.nit.qk_norm_rope_fwd,
                         (f["q"], f["k"], cu, sizes, f["freqs"], f["q_weight"], f["q_bias"], f["k_weight"],
                          f["k_bias"], 1e-5, "grid", 1.0)),
        "varlen_attention": (torch.ops.nit.varlen_attention_fwd,
                             (f["q"], f["k"], f["v"], cu, cu, packed.max_seqlen, packed.max_seqlen, 0.125, True)),
    }
    fn, args = calls[op]
    torch.library.opcheck(fn, args)


def test_torch_compile_fullgraph():
    packed = _pack("odd")
    n = packed.total_tokens
    x = torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shift, scale = torch.randn(2, packed.num_seqs, 128, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(3, n, 2, 64, device="cuda", dtype=torch.bfloat16)

    def f(x):
        h = nk.adaln_modulate(x, shift, scale, packed, backend="cuda")
        q = (qkv[0] + h[:, :128].view(n, 2, 64)).contiguous()
        o = nk.varlen_attention(q, qkv[1], qkv[2], packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                packed.max_seqlen, backend="cuda")
        return o.float().square().sum()

    eager = f(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out, x)
    # the graph around the kernels may be fused differently by inductor; the kernels are the same
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_comp, g_eager)
