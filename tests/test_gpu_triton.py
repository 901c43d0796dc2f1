"""GPU-only checks of the triton and cuda backends at the scales and in the situations that matter
for NiT: a second device, row means far above the row spread, NiT-XL-scale attention, large
logits, strided q/k/v views of a fused qkv, max_seqlen too large / too small / 0, tensors of
2**31 elements or more, packs of more than 65,535 images, torch.compile over many packs.

All tests are marked `gpu` (tests/conftest.py skips them without a CUDA device) and skip with the
backend's own reason when it cannot serve CUDA tensors. `make gpu-check` runs them.
"""
import os

import pytest
import torch

import nit_kernels as nk
from nit_kernels import dispatch, reference
from nit_kernels.testing import ODD_PACKS, assert_accuracy, assert_close, check_against_reference, random_sizes

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "cuda"]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
LOWP = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _served(request):
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec else None
    if name is None:
        return
    why = dispatch.get(name).load_error()
    if why is None and name == "triton":
        from nit_kernels.backends.triton import interpreting
        why = "the Triton kernels were loaded for the interpreter (TRITON_INTERPRET=1)" if interpreting() else None
    if why is not None:
        pytest.skip(f"{name} backend unusable: {why}")


def test_triton_runs_compiled_where_there_is_a_gpu():
    """tests/conftest.py switches the interpreter on only where torch sees no GPU (unless asked to)."""
    if os.environ.get("NIT_TEST_TRITON_INTERPRET_ASKED") == "1":
        pytest.skip("TRITON_INTERPRET=1 was set by the caller")
    from nit_kernels.backends.triton import interpreting
    assert not interpreting(), "the Triton kernels run under the interpreter although a GPU is present"


def _attention_check(backend, dtype, lens_q, lens_k, heads, kv_heads, head_dim, causal, *, logit_scale=1.0, seed=0):
    """backend vs the reference, fwd and all gradients, on the same rounded inputs (the accuracy rule)."""
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
    base = [torch.randn(n, h, head_dim, generator=g, dtype=torch.float64) * s for n, h, s in
            ((sum(lens_q), heads, logit_scale), (sum(lens_k), kv_heads, logit_scale), (sum(lens_k), kv_heads, 1.0))]
    base = [t.to(dtype).double().cuda() for t in base]
    dout = torch.randn(sum(lens_q), heads, head_dim, generator=g, dtype=torch.float64).cuda()

    def run(run_dtype, which):
        t = [b.to(run_dtype).requires_grad_(True) for b in base]
        out = nk.varlen_attention(*t, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, backend=which)
        return [out, *torch.autograd.grad(out, t, dout.to(run_dtype))]

    hi, lo, got = run(torch.float32, "reference"), run(dtype, "reference"), run(dtype, backend)
    for name, o, h, l_ in zip(("out", "dq", "dk", "dv"), got, hi, lo):
        scale = max(1.0, h.abs().max().item()) if h.numel() else 1.0
        assert_accuracy(o, h, l_, name=f"varlen_attention[{backend},{dtype}] {name}", atol=ATOL[dtype] * scale)


# ---------------------------------------------------------------------------------------------
# devices and numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_a_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels must launch on cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    packed = nk.PackedSeqs.from_sizes(ODD_PACKS[4] + ((13, 21),), device="cuda:1")
    check_against_reference("adaln_modulate", backend, packed, torch.float32, shape={"dim": 384})
    check_against_reference("residual_adaln", backend, packed, torch.bfloat16, shape={"dim": 1152})
    check_against_reference("qk_norm_rope", backend, packed, torch.float16, shape={"heads": 4, "head_dim": 72})
    check_against_reference("varlen_attention", backend, packed, torch.bfloat16, shape={"heads": 4, "head_dim": 72})
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_adaln_row_mean_far_above_the_row_spread_bf16(backend):
    """x_new = 64 + 0.01 * y: mean / std = 6,400. A one-pass variance E[x^2] - E[x]^2 in fp32 loses
    all of the variance (fp32 spacing at 4,096 is 5e-4 > var = 1e-4); the two-pass one keeps it.
    Judged against the fp64 reference on the same bf16 inputs, with bf16 output rounding allowed."""
    packed = nk.PackedSeqs.from_sizes([(16, 16), (7, 33), (1, 1), (24, 40)], device="cuda")
    n, b, d = packed.total_tokens, packed.num_seqs, 1152
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.full((n, d), 64.0, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    gate = torch.full((b, d), 0.01, device="cuda").bfloat16()
    shift, scale = (torch.randn(2, b, d, device="cuda", generator=g) * 0.5).bfloat16()
    x_new, h = nk.residual_adaln(x, y, gate, shift, scale, packed, backend=backend)
    want_x, want_h = reference.residual_adaln(*(t.double() for t in (x, y, gate, shift, scale)), packed.cu_seqlens)
    assert torch.isfinite(h).all(), "non-finite LayerNorm output (a negative variance?)"
    assert_close(h, want_h, atol=2e-2, rtol=2**-7, name=f"residual_adaln[{backend}] h")
    assert_close(x_new, want_x, atol=1e-2, rtol=2**-7, name=f"residual_adaln[{backend}] x_new")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nit_scale_attention(dtype, causal):
    """NiT-XL attention: 52 images of 1,024 to 4,096 tokens, 16 heads of 72, both GPU backends,
    forward and every gradient against the reference, image by image (the reference's scores of
    a 4,096-token image alone take a gigabyte): the longest, the shortest and every fourth image."""
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(32, 65, (52, 2), generator=g).tolist()
    packed = nk.PackedSeqs.from_sizes(sizes, device="cuda")
    n, heads, hd = packed.total_tokens, 16, 72
    base = [torch.randn(n, heads, hd, generator=g).to(dtype).cuda() for _ in range(3)]
    dout = torch.randn(n, heads, hd, generator=g).to(dtype).cuda()
    cu, m = packed.cu_seqlens, packed.max_seqlen
    runs = {}
    for backend in BACKENDS:
        if dispatch.get(backend).load_error() is not None:
            continue
        t = [b.clone().requires_grad_(True) for b in base]
        out = nk.varlen_attention(*t, cu, cu, m, m, causal=causal, backend=backend)
        runs[backend] = [out, *torch.autograd.grad(out, t, dout)]
    if not runs:
        pytest.skip("neither GPU backend is usable")
    bounds = cu.tolist()
    lens = [h * w for h, w in sizes]
    for i in sorted(set(range(0, len(sizes), 4)) | {lens.index(max(lens)), lens.index(min(lens))}):
        s, e = bounds[i], bounds[i + 1]
        one = torch.tensor([0, e - s], dtype=torch.int32, device="cuda")

        def ref(run_dtype):
            t = [b[s:e].to(run_dtype).requires_grad_(True) for b in base]
            o = nk.varlen_attention(*t, one, one, e - s, e - s, causal=causal, backend="reference")
            return [o, *torch.autograd.grad(o, t, dout[s:e].to(run_dtype))]

        hi, lo = ref(torch.float32), ref(dtype)
        for backend, got in runs.items():
            for name, o, h, l_ in zip(("out", "dq", "dk", "dv"), got, hi, lo):
                scale = max(1.0, h.abs().max().item())
                assert_accuracy(o[s:e], h, l_, name=f"{backend} image {i} ({sizes[i]}) {name}",
                                atol=ATOL[dtype] * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_large_logits(backend, dtype, causal):
    """q and k scaled by 8 (logits up to ~100): the online softmax must rescale without overflow."""
    lens = [h * w for h, w in ODD_PACKS[4]] + [300, 129]
    _attention_check(backend, dtype, lens, lens, 4, 2, 72, causal, logit_scale=8.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("head_dim", [64, 72])
def test_strided_views_of_a_fused_qkv(backend, dtype, head_dim):
    """q, k, v = qkv.view(N, 3, H, D).unbind(1) (token stride 3*H*D), forward and backward."""
    packed = nk.PackedSeqs.from_sizes(ODD_PACKS[4] + ((17, 12),), device="cuda")
    n, heads = packed.total_tokens, 4
    g = torch.Generator().manual_seed(2)
    qkv0 = torch.randn(n, 3 * heads * head_dim, generator=g).to(dtype).cuda()
    dout = torch.randn(n, heads, head_dim, generator=g).to(dtype).cuda()
    cu, m = packed.cu_seqlens, packed.max_seqlen

    def run(run_dtype, which):
        qkv = qkv0.to(run_dtype).requires_grad_(True)
        q, k, v = qkv.view(n, 3, heads, head_dim).unbind(1)
        assert q.stride(0) == 3 * heads * head_dim
        out = nk.varlen_attention(q, k, v, cu, cu, m, m, backend=which)
        return out, torch.autograd.grad(out, qkv, dout.to(run_dtype))[0]

    hi, lo, got = run(torch.float32, "reference"), run(dtype, "reference"), run(dtype, backend)
    for name, o, h, l_ in zip(("out", "dqkv"), got, hi, lo):
        scale = max(1.0, h.abs().max().item())
        assert_accuracy(o, h, l_, name=f"{backend} {name}", atol=ATOL[dtype] * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_seqlen_too_large_too_small_and_zero(backend):
    """Too large: the same output (it bounds work, it must not change it, nor take long); too small
    or 0 for a non-empty pack: an error, not rows left unwritten; 0 for an empty pack: fine."""
    packed = nk.PackedSeqs.from_sizes([(3, 5), (9, 11), (1, 1)], device="cuda")
    n, cu, longest = packed.total_tokens, packed.cu_seqlens, packed.max_seqlen
    q, k, v = torch.randn(3, n, 2, 64, device="cuda", dtype=torch.float16)
    want = nk.varlen_attention(q, k, v, cu, cu, longest, longest, backend=backend)
    for big in (longest + 1, 2 * longest, 2**24):
        got = nk.varlen_attention(q, k, v, cu, cu, big, big, backend=backend)
        torch.cuda.synchronize()
        assert torch.equal(got, want), f"max_seqlen={big} changed the output"
    for small in (longest - 1, 0):
        with pytest.raises((ValueError, RuntimeError), match="max_seqlen"):
            nk.varlen_attention(q, k, v, cu, cu, small, longest, backend=backend)
            torch.cuda.synchronize()
    empty = torch.zeros(2, dtype=torch.int32, device="cuda")
    e = torch.empty(0, 2, 64, device="cuda", dtype=torch.float16)
    assert nk.varlen_attention(e, e, e, empty, empty, 0, 0, backend=backend).shape == (0, 2, 64)


# ---------------------------------------------------------------------------------------------
# scale: 2**31 elements, more than 65,535 images
# ---------------------------------------------------------------------------------------------
def _slice_pack(sizes, i, device="cuda"):
    return nk.PackedSeqs.from_sizes([sizes[i]], device=device)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_of_2_31_elements_and_more(backend):
    """x [N, 1152] and q [N, 16, 72] bf16 with N * 1152 > 2**31: the rows past element 2**31 are
    where 32-bit offsets would wrap. Each image's rows are checked against the reference run on
    that image alone (first and last image)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    sizes = [(1000, 1000), (932, 1000), (3, 47)]
    packed = nk.PackedSeqs.from_sizes(sizes, device="cuda")
    n, d, heads, hd = packed.total_tokens, 1152, 16, 72
    assert n * d > 2**31 and n * heads * hd > 2**31
    bounds = packed.cu_seqlens.tolist()
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    shift, scale = (torch.randn(2, len(sizes), d, device="cuda") * 0.5).bfloat16()
    h = nk.adaln_modulate(x, shift, scale, packed, backend=backend)
    for i in (0, len(sizes) - 1):
        s, e = bounds[i], bounds[i + 1]
        args = (x[s:e], shift[i:i + 1], scale[i:i + 1], _slice_pack(sizes, i).cu_seqlens)
        hi = reference.adaln_modulate(*(a.float() if a.is_floating_point() else a for a in args))
        lo = reference.adaln_modulate(*args)
        assert_accuracy(h[s:e], hi, lo, name=f"adaln_modulate[{backend}] image {i}", atol=1e-2)
    del x, h
    q = torch.randn(n, heads, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, 1, hd, device="cuda", dtype=torch.bfloat16)
    freqs = nk.rope_freqs(hd).cuda()
    qr, kr = nk.rope_2d(q, k, packed, freqs, backend=backend)
    for i in (0, len(sizes) - 1):
        s, e = bounds[i], bounds[i + 1]
        one = _slice_pack(sizes, i)
        hi = reference.rope_2d(q[s:e].float(), k[s:e].float(), one.cu_seqlens, one.sizes, freqs)
        lo = reference.rope_2d(q[s:e], k[s:e], one.cu_seqlens, one.sizes, freqs)
        for name, o, r32, r16 in (("q", qr[s:e], hi[0], lo[0]), ("k", kr[s:e], hi[1], lo[1])):
            assert_accuracy(o, r32, r16, name=f"rope_2d[{backend}] image {i} {name}", atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_65535_images_in_one_pack(backend):
    """70,000 images of 1x3 tokens: images must not sit on a grid axis limited to 65,535."""
    sizes = [(1, 3)] * 70_000
    packed = nk.PackedSeqs.from_sizes(sizes, device="cuda")
    n, b, heads, hd = packed.total_tokens, packed.num_seqs, 2, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(3, n, heads, hd, device="cuda", generator=g).half()
    dout = torch.randn(n, heads, hd, device="cuda", generator=g).half()

    def run(which, dtype):
        t = [x.to(dtype).requires_grad_(True) for x in qkv]
        if which == "batched":  # the reference for equal-sized images: one batched SDPA call
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                o = torch.nn.functional.scaled_dot_product_attention(
                    *(x.view(b, 3, heads, hd).transpose(1, 2) for x in t)).transpose(1, 2).reshape(n, heads, hd)
        else:
            o = nk.varlen_attention(*t, packed.cu_seqlens, packed.cu_seqlens, 3, 3, backend=which)
        return [o, *torch.autograd.grad(o, t, dout.to(dtype))]

    hi, lo, got = run("batched", torch.float32), run("batched", torch.float16), run(backend, torch.float16)
    for name, o, h, l_ in zip(("out", "dq", "dk", "dv"), got, hi, lo):
        assert_accuracy(o, h, l_, name=f"varlen_attention[{backend}] {name}", atol=1e-3)
    check_against_reference("adaln_modulate", backend, packed, torch.float32, shape={"dim": 64})
    check_against_reference("rope_2d", backend, packed, torch.float32, shape={"heads": 2, "head_dim": 16})


# ---------------------------------------------------------------------------------------------
# torch.compile over many packs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_over_many_packs_recompiles_at_most_twice(backend):
    """12 packs of different image counts, sizes and max_seqlen through one compiled block: equal to
    eager each time, and at most two compilations (the first, then one with dynamic sizes)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    d, heads, hd = 128, 2, 64

    def block(x, shift, scale, w, packed):
        h = nk.adaln_modulate(x, shift, scale, packed, backend=backend)
        q, k, v = (h @ w).view(-1, 3, heads, hd).unbind(1)
        cu, m = packed.cu_seqlens, packed.max_seqlen
        o = nk.varlen_attention(q, k, v, cu, cu, m, m, backend=backend)
        return o.float().square().sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    w = torch.randn(d, 3 * heads * hd, device="cuda") * d**-0.5
    for i in range(12):
        sizes = random_sizes(3 + i, max_side=6 + 2 * i, seed=i)
        packed = nk.PackedSeqs.from_sizes(sizes, device="cuda")
        x = torch.randn(packed.total_tokens, d, device="cuda", requires_grad=True)
        shift, scale = torch.randn(2, packed.num_seqs, d, device="cuda") * 0.5
        want = block(x, shift, scale, w, packed)
        (gw,) = torch.autograd.grad(want, x)
        got = compiled(x, shift, scale, w, packed)
        (gg,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, msg=f"pack {i}")
        torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-4, msg=f"pack {i} gradient")
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 12 packs"
