"""The triton backend against the reference: forward and every gradient, every op, odd shapes.

On a CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports them). On a GPU machine run ``TRITON_INTERPRET=0 pytest tests/test_triton*.py``
to run the same grid compiled on CUDA tensors. The grid is small because the interpreter costs
about 6 ms per program; bf16 attention is GPU-only (the interpreter's tl.dot is wrong on bf16).
"""
import pytest
import torch

import nit_kernels as nk
from nit_kernels import PackedSeqs, dispatch
from nit_kernels.testing import ODD_PACKS, assert_accuracy, check_against_reference, random_sizes

_WHY = dispatch.get("triton").load_error()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton backend unavailable: {_WHY}")

if _WHY is None:
    from nit_kernels.backends.triton import _common, interpreting

    if interpreting():
        _common.contiguous_interpreter_transpose()
    DEVICE = "cpu" if interpreting() else "cuda"
else:
    DEVICE = "cpu"

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
PACKS = {
    "odd": ODD_PACKS[4],          # 1x1, 1x7, 5x1, 3x5, 4x4, 2x9 in one pack
    "1x1": ((1, 1),),
    "1xW": ((1, 13),),
    "Hx1": ((11, 1),),
    "3x97": ((3, 97),),
    "many": tuple(random_sizes(12, max_side=7, seed=5)),
    "mixed": ODD_PACKS[4] + ((3, 97), (2, 2)),
    "small": ((1, 1), (2, 9), (5, 7), (4, 4)),
}
ROPE_OPS = ("rope_2d", "qk_norm_rope")
GRID = {"positions": "grid"}
OFFICIAL = {"positions": "official", "mscale": 1.25}


def _packed(name):
    return PackedSeqs.from_sizes(PACKS[name], device=DEVICE)


# ---------------------------------------------------------------------------------------------
# adaln_modulate, gated_residual, residual_adaln
# ---------------------------------------------------------------------------------------------
MODULATION = ("adaln_modulate", "gated_residual", "residual_adaln")
MODULATION_CASES = (
    [(op, dt, "odd", 769) for op in MODULATION for dt in (F32, F16, BF16)]      # D not a power of two
    + [(op, F32, pack, 64) for op in MODULATION for pack in ("1x1", "3x97", "many")]
    + [(op, dt, "many", 128) for op in MODULATION for dt in (F16, BF16)]
)


@pytest.mark.parametrize("op, dtype, pack, dim", MODULATION_CASES,
                         ids=[f"{o}-{str(d)[6:]}-{p}-D{n}" for o, d, p, n in MODULATION_CASES])
def test_modulation_matches_reference(op, dtype, pack, dim):
    check_against_reference(op, "triton", _packed(pack), dtype, shape={"dim": dim})


@pytest.mark.parametrize("op", MODULATION)
def test_modulation_deterministic_mode_matches_reference(op):
    """The deterministic backward (tile partials + fixed-order reduction) against the reference;
    the 3x97 image spans two tiles."""
    torch.use_deterministic_algorithms(True)
    try:
        check_against_reference(op, "triton", _packed("mixed"), F32, shape={"dim": 64})
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture
def gpu_tiling(monkeypatch):
    """The launchers' GPU tile sizes under the interpreter: backward tiles of 32 rows walked in
    chunks of a few rows (the 5x7 image spans two tiles), rope heads in groups of 4 (5 q heads: two
    groups), small token blocks; the interpreter otherwise takes one big block."""
    if not interpreting():
        pytest.skip("already compiled for the GPU")
    from nit_kernels.backends.triton import adaln, rope
    for mod in (_common, adaln, rope):
        monkeypatch.setattr(mod, "INTERPRETED", False)


GPU_TILING_CASES = (
    [(op, {"dim": 384}, {}, det) for op in MODULATION for det in (False, True)]
    + [(op, {"heads": 5, "kv_heads": 1, "head_dim": 40}, OFFICIAL, False) for op in ROPE_OPS]
)


@pytest.mark.parametrize("op, shape, kw, deterministic", GPU_TILING_CASES,
                         ids=[f"{c[0]}{'-deterministic' if c[3] else ''}" for c in GPU_TILING_CASES])
def test_gpu_tiling_matches_reference(gpu_tiling, op, shape, kw, deterministic):
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_reference(op, "triton", _packed("small"), F32, shape=shape, **kw)
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------------
# rope_2d, qk_norm_rope
# ---------------------------------------------------------------------------------------------
ROPE = ROPE_OPS
ROPE_CASES = (
    [(op, dt, "odd", {"heads": 3, "head_dim": 64}, GRID) for op in ROPE for dt in (F32, F16, BF16)]
    + [(op, dt, "odd", {"heads": 3, "kv_heads": 1, "head_dim": 72}, OFFICIAL) for op in ROPE for dt in (F32, F16, BF16)]
    + [(op, F32, pack, {"heads": 2, "kv_heads": 1, "head_dim": 72}, kw) for op in ROPE
       for pack, kw in (("3x97", OFFICIAL), ("1x1", GRID), ("Hx1", GRID), ("1xW", OFFICIAL))]
    + [(op, F32, "many", {"heads": 2, "head_dim": 8}, GRID) for op in ROPE]    # Dh/2 below one block
)


@pytest.mark.parametrize("op, dtype, pack, shape, kw", ROPE_CASES,
                         ids=[f"{o}-{str(d)[6:]}-{p}-hd{s['head_dim']}-kvh{s.get('kv_heads', s['heads'])}-"
                              f"{k['positions']}" for o, d, p, s, k in ROPE_CASES])
def test_rope_matches_reference(op, dtype, pack, shape, kw):
    check_against_reference(op, "triton", _packed(pack), dtype, shape=shape, **kw)


def test_rope_on_strided_views_of_a_qkv_tensor():
    """q and k as views of a fused qkv projection [N, 3, H, Dh] (row stride 3*H*Dh) need no copy."""
    packed = _packed("odd")
    n, h, dh = packed.total_tokens, 2, 16
    qkv = torch.randn(n, 3, h, dh, device=DEVICE)
    q, k = qkv[:, 0], qkv[:, 1]
    assert not q.is_contiguous()
    freqs = nk.rope_freqs(dh).to(DEVICE)
    got = nk.rope_2d(q, k, packed, freqs, backend="triton")
    want = nk.rope_2d(q.contiguous(), k.contiguous(), packed, freqs, backend="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# varlen_attention
# ---------------------------------------------------------------------------------------------
ATTN_CASES = (
    [(dt, "odd", {"heads": 2, "head_dim": hd}, c) for dt in (F32, F16) for hd in (64, 72, 128) for c in (False, True)]
    + [(dt, "3x97", {"heads": 1, "head_dim": 72}, c) for dt in (F32, F16) for c in (False, True)]
    + [(F32, "many", {"heads": 4, "kv_heads": 2, "head_dim": 32}, c) for c in (False, True)]   # grouped-query
    + [(F16, "1x1", {"heads": 2, "head_dim": 64}, False)]
    + [(F32, "odd", {"heads": 2, "head_dim": 40}, True), (F16, "odd", {"heads": 2, "head_dim": 96}, False)]  # tails
)


@pytest.mark.parametrize("dtype, pack, shape, causal", ATTN_CASES,
                         ids=[f"{str(d)[6:]}-{p}-hd{s['head_dim']}-h{s['heads']}/{s.get('kv_heads', s['heads'])}"
                              f"{'-causal' if c else ''}" for d, p, s, c in ATTN_CASES])
def test_attention_matches_reference(dtype, pack, shape, causal):
    check_against_reference("varlen_attention", "triton", _packed(pack), dtype, shape=shape, causal=causal)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_queries_and_keys_of_different_lengths(dtype, causal):
    _check_queries_and_keys_of_different_lengths(dtype, causal)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=["BM16-BN32", "BM32-BN16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_small_unequal_blocks(monkeypatch, blocks, causal):
    """Many blocks per sequence with BLOCK_M != BLOCK_N: the unmasked / masked loop split of all
    three kernels at block sizes like the GPU configs' (the interpreter otherwise uses 64 x 64)."""
    if not interpreting():
        pytest.skip("compiled kernels use their autotune configs")
    from nit_kernels.backends.triton import attention
    monkeypatch.setitem(attention._INTERPRETER_CONFIG, "BLOCK_M", blocks[0])
    monkeypatch.setitem(attention._INTERPRETER_CONFIG, "BLOCK_N", blocks[1])
    _check_queries_and_keys_of_different_lengths(F32, causal)


def _check_queries_and_keys_of_different_lengths(dtype, causal):
    """cu_seqlens_q != cu_seqlens_k: causal is bottom-right aligned, rows that see no key output 0
    (first two queries of the first sequence), a sequence with keys but no queries gets dk = dv = 0."""
    lq, lk = [5, 1, 0, 9, 70], [3, 4, 2, 9, 65]
    cu_q, cu_k = _cu(lq), _cu(lk)
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(n, 2, 72, generator=g, dtype=torch.float64) for n in (sum(lq), sum(lk), sum(lk))]
    dout = torch.randn(sum(lq), 2, 72, generator=g, dtype=torch.float64)
    rounded = [t.to(dtype).double() for t in base]

    def run(backend, dt):
        q, k, v = [t.to(DEVICE, dt).requires_grad_() for t in rounded]
        o = nk.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, backend=backend)
        return (o, *torch.autograd.grad(o, (q, k, v), dout.to(DEVICE, dt)))

    ref_hi, ref_lo = run("reference", torch.float64), run("reference", dtype)
    if dtype == F32:
        ref_lo = [t.float() for t in ref_lo]
    got = run("triton", dtype)
    for name, o, hi, lo in zip(("out", "dq", "dk", "dv"), got, ref_hi, ref_lo):
        scale = max(1.0, hi.abs().max().item())
        assert_accuracy(o, hi, lo, name=f"{name} {dtype}", atol={F32: 1e-5, F16: 1e-4}[dtype] * scale)
    if causal:
        assert torch.all(got[0][:2] == 0), "queries that see no key must output 0"
    assert torch.all(got[2][7:9] == 0) and torch.all(got[3][7:9] == 0), "keys without queries get no gradient"


def test_attention_rejects_unsupported_head_dim():
    q = torch.randn(4, 1, 160, device=DEVICE)
    cu = _cu([4])
    with pytest.raises(nk.BackendUnavailable, match="head_dim 160 is not supported"):
        nk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="triton")


def test_head_dims_are_split_not_padded_to_a_power_of_two():
    """72 (NiT-XL) runs as a 64-wide block plus a 16-wide tail (8 real columns), not as 128."""
    from nit_kernels.backends.triton import attention
    assert attention.split_head_dim(72) == (64, 16, True)
    assert attention.split_head_dim(96) == (64, 32, True)
    assert attention.split_head_dim(40) == (32, 16, True)
    for d in (16, 32, 64, 128):
        assert attention.split_head_dim(d) == (d, 16, False)
    for d in range(1, 129):
        head, tail, has_tail = attention.split_head_dim(d)
        assert head + tail * has_tail >= d and head + tail * has_tail <= max(16, 1 << (d - 1).bit_length())
    meta = attention._meta(torch.empty(1, 1, 72), torch.empty(1, 1, 72), False)
    assert (meta["BLOCK_D"], meta["BLOCK_D1"], meta["TAIL"]) == (64, 16, True)


@pytest.mark.parametrize("dv", [40, 72])
def test_attention_value_head_dim_differs_from_the_query_head_dim(dv):
    """v [N, Hk, Dv] with Dv != D: the two head dims are split independently (72 -> 64 + 16, 40 -> 32 + 16)."""
    packed = _packed("small")
    n, cu, m = packed.total_tokens, packed.cu_seqlens, packed.max_seqlen
    g = torch.Generator().manual_seed(4)
    d = 112 - dv  # (72, 40) and (40, 72)
    q, k = (torch.randn(n, 2, d, generator=g).to(DEVICE) for _ in range(2))
    v = torch.randn(n, 2, dv, generator=g).to(DEVICE)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(n, 2, dv, generator=g).to(DEVICE)
    got = nk.varlen_attention(q, k, v, cu, cu, m, m, backend="triton")
    want = nk.varlen_attention(q, k, v, cu, cu, m, m, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
