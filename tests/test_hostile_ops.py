"""Hostile input at the public op API: answers that are right or clear errors, never silent zeros.

- Second derivatives: the compiled backends implement first derivatives only; a double backward
  through them raises an error naming the op and the backend that can do it (the reference), not
  zeros with a PyTorch warning. rope_2d's backward is rope_2d itself, so its double backward is exact.
- Packs that were changed in place or put together without the constructor are checked again.
- Arguments a flash-attn user can get wrong (max_seqlen beyond int32, zero heads, head_dim 0,
  a strided cu_seqlens) get the same answer on every backend: a ValueError saying what is allowed,
  or the same result.
- A fuzz test throws malformed packing metadata and shapes at every op in a child process and
  checks each answer there (see the end of this file).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import nit_kernels as nk
from nit_kernels import dispatch
from nit_kernels.testing import assert_close, call_op, cast_inputs, op_inputs

PACK = nk.PackedSeqs.from_sizes([(2, 3), (3, 3)])
CPU_OK = dispatch.get("cpu").load_error() is None
needs_cpu = pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {dispatch.get('cpu').load_error()}")
OPS_WITH_BWD_KERNEL = ("adaln_modulate", "gated_residual", "residual_adaln", "qk_norm_rope", "varlen_attention")


def _double_backward(op, backend, dtype):
    """grad of sum(|first gradients|^2), the first gradients taken with create_graph=True."""
    inp = cast_inputs(op, op_inputs(op, PACK, dim=8, head_dim=8, seed=3), dtype, dtype)
    leaves = [t for t in inp.values() if t.requires_grad]
    out = call_op(op, PACK, inp, backend)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() ** 3).sum() for o in outs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    second = torch.autograd.grad(sum((g.float() ** 2).sum() for g in first), leaves, allow_unused=True)
    return second


@needs_cpu
@pytest.mark.parametrize("op", OPS_WITH_BWD_KERNEL)
def test_double_backward_through_cpu_raises_naming_the_op(op):
    with pytest.raises(RuntimeError, match=rf"{op}: the cpu backend .*second derivative.*backend=\"reference\""):
        _double_backward(op, "cpu", torch.float32)


@needs_cpu
def test_double_backward_of_rope_2d_is_exact_on_cpu():
    got = _double_backward("rope_2d", "cpu", torch.float32)
    want = _double_backward("rope_2d", "reference", torch.float64)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-4 * max(1.0, w.abs().max().item()), name="rope_2d second derivative")


def test_reference_attention_has_a_second_derivative():
    # the reference attention is a custom op (whole in a compiled graph); its backward op must be
    # differentiable too: compare with autograd through the plain math
    from nit_kernels.reference import attention_math

    inp = cast_inputs("varlen_attention", op_inputs("varlen_attention", PACK, head_dim=8, seed=4),
                      torch.float64, torch.float64)
    leaves = [inp[n] for n in ("q", "k", "v")]
    cu = PACK.cu_seqlens

    def second(fn):
        out = fn(*leaves)
        first = torch.autograd.grad((out ** 3).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in first), leaves)

    got = second(lambda q, k, v: nk.varlen_attention(q, k, v, cu, cu, 9, 9, backend="reference"))
    want = second(lambda q, k, v: attention_math(q, k, v, cu, cu, 8 ** -0.5, False))
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, atol=1e-10 * max(1.0, w.abs().max().item()), name=f"d2/d{name}")


# ------------------------------------------------------------------------------------------------
# argument checks that every backend shares (nit_kernels/ops.py)
# ------------------------------------------------------------------------------------------------
ARG_BACKENDS = ["reference"] + (["cpu"] if CPU_OK else [])


def _attn(backend, *, q_heads=2, kv_heads=2, head_dim=8, max_q=9, max_k=9, cu=None, scale=None):
    n = PACK.total_tokens
    q, k, v = (torch.randn(n, h, head_dim) for h in (q_heads, kv_heads, kv_heads))
    cu = PACK.cu_seqlens if cu is None else cu
    return nk.varlen_attention(q, k, v, cu, cu, max_q, max_k, softmax_scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
@pytest.mark.parametrize("which, value", [("max_q", 2 ** 70), ("max_k", 2 ** 31), ("max_q", -1), ("max_k", 9.0)])
def test_max_seqlen_outside_int32_is_a_clear_error(backend, which, value):
    with pytest.raises(ValueError, match=rf"max_seqlen_{which[-1]} must be a Python int in \[0, 2\*\*31 - 1\]"):
        _attn(backend, **{which: value})


@pytest.mark.parametrize("backend", ARG_BACKENDS)
@pytest.mark.parametrize("q_heads, kv_heads", [(0, 0), (2, 0), (0, 2)])
def test_zero_heads_is_a_clear_error(backend, q_heads, kv_heads):
    with pytest.raises(ValueError, match=r"at least one head"):
        _attn(backend, q_heads=q_heads, kv_heads=kv_heads)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
@pytest.mark.parametrize("q_heads, k_heads", [(0, 0), (2, 0)])
def test_rope_of_zero_heads_or_head_dim_is_a_clear_error(backend, q_heads, k_heads):
    n, freqs = PACK.total_tokens, nk.rope_freqs(8)
    with pytest.raises(ValueError, match=r"rope_2d: q and k need at least one head"):
        nk.rope_2d(torch.randn(n, q_heads, 8), torch.randn(n, k_heads, 8), PACK, freqs, backend=backend)
    with pytest.raises(ValueError, match=r"rope_2d: head_dim must be a positive multiple of 4"):
        nk.rope_2d(torch.randn(n, 2, 0), torch.randn(n, 2, 0), PACK, freqs[:, :0], backend=backend)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
def test_zero_head_dim_and_non_finite_scale_are_clear_errors(backend):
    with pytest.raises(ValueError, match=r"head_dim must be positive"):
        _attn(backend, head_dim=0)
    for scale in (float("nan"), float("inf"), "large"):
        with pytest.raises(ValueError, match=r"softmax_scale must be a finite float or None"):
            _attn(backend, scale=scale)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
def test_strided_cu_seqlens_is_accepted_like_a_contiguous_one(backend):
    strided = torch.stack([PACK.cu_seqlens, PACK.cu_seqlens], dim=1)[:, 0]
    assert not strided.is_contiguous()
    torch.manual_seed(1)
    got = _attn(backend, cu=strided)
    torch.manual_seed(1)
    want = _attn(backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
def test_a_pack_built_from_strided_tensors_works(backend):
    sizes = torch.tensor([[2, 3, 0], [3, 3, 0]], dtype=torch.int32)[:, :2]
    cu = torch.tensor([[0, 6, 15], [0, 0, 0]], dtype=torch.int32)[0, ::1]
    cu = torch.stack([cu, cu], dim=1)[:, 0]
    packed = nk.PackedSeqs(sizes=sizes, cu_seqlens=cu, max_seqlen=9, total_tokens=15, num_seqs=2)
    inp = cast_inputs("qk_norm_rope", op_inputs("qk_norm_rope", PACK, head_dim=8, seed=5), torch.float32)
    got = call_op("qk_norm_rope", packed, inp, backend)
    want = call_op("qk_norm_rope", PACK, inp, backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _forged(**fields):
    """A PackedSeqs put together without its constructor (as PackedSeqs.to does), fields as given."""
    good = {f: getattr(PACK, f) for f in ("sizes", "cu_seqlens", "max_seqlen", "total_tokens", "num_seqs")}
    good.update(fields)
    p = object.__new__(nk.PackedSeqs)
    for k, v in good.items():
        object.__setattr__(p, k, v)
    return p


FORGED = {
    "cu past the end": lambda: _forged(cu_seqlens=torch.tensor([0, 6, 16], dtype=torch.int32)),
    "cu decreasing": lambda: _forged(cu_seqlens=torch.tensor([0, 9, 6], dtype=torch.int32), total_tokens=6),
    "sizes not matching cu": lambda: _forged(sizes=torch.tensor([[3, 3], [2, 3]], dtype=torch.int32)),
    "total_tokens forged": lambda: _forged(total_tokens=16),
    "cu changed in place": lambda: _modified_in_place(),
}


def _modified_in_place():
    p = nk.PackedSeqs.from_sizes([(2, 3), (3, 3)])
    p.cu_seqlens[1] = 7
    return p


@pytest.mark.parametrize("backend", ARG_BACKENDS)
@pytest.mark.parametrize("case", FORGED, ids=list(FORGED))
@pytest.mark.parametrize("op", ["adaln_modulate", "rope_2d"])
def test_forged_or_modified_packs_are_refused(backend, case, op):
    packed = FORGED[case]()
    inp = cast_inputs(op, op_inputs(op, PACK, dim=8, head_dim=8, seed=6), torch.float32)
    with pytest.raises(ValueError, match=rf"{op}: .*(cu_seqlens|sizes|total_tokens)"):
        call_op(op, packed, inp, backend)


# ------------------------------------------------------------------------------------------------
# fuzz: malformed metadata and shapes at every op, in a child process whose exit signal is checked
# ------------------------------------------------------------------------------------------------
# Each example is one op call built from a clean case by one or two mutations. A mutation says
# whether the call stays valid; a valid call must match the reference on the same arguments, an
# invalid one must raise ValueError or RuntimeError with a message. The child prints every example
# before running it, so a crash or a hang names the example that caused it.

# every example runs on each of these backends (triton under its interpreter; the child sets
# TRITON_INTERPRET=1)
FUZZ_BACKENDS = [b for b in ("reference", "cpu", "triton") if dispatch.get(b).load_error() is None]
FUZZ_EXAMPLES = 100
PACKED_OPS = ("adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope")
ALL_OPS = PACKED_OPS + ("varlen_attention",)


def _cu_mutation(kind):
    """cu_seqlens mutations: (tensor -> tensor, stays valid)."""
    return {
        "offset": (lambda c: c + 2, False),
        "decreasing": (lambda c: torch.cat([c[:1], c[1:2] * 0 - 1, c[2:]]), False),
        "past the end": (lambda c: torch.cat([c[:-1], c[-1:] + 3]), False),
        "int64": (lambda c: c.long(), False),
        "float": (lambda c: c.float(), False),
        "entry dropped": (lambda c: c[:-1], False),
        "entry added": (lambda c: torch.cat([c, c[-1:]]), False),
        "2-D": (lambda c: c[None], False),
        "list": (lambda c: c.tolist(), False),
        "strided": (lambda c: torch.stack([c, c], 1)[:, 0], True),
    }[kind]


CU_KINDS = ["offset", "decreasing", "past the end", "int64", "float", "entry dropped", "entry added", "2-D",
            "list", "strided"]
PACK_KINDS = ["sizes h+1", "sizes zero", "sizes int64", "sizes [B, 3]", "total_tokens+1", "num_seqs+1",
              "max_seqlen+1"]
SEQLEN_VALUES = ["longest-1", "longest+5", "0", "-1", "2**31-1", "2**31", "2**70", "float", "tensor"]
SHAPE_KINDS = ["rows-1", "table rows+1", "dim-1", "dtype float16", "dtype float64", "meta device", "extra dim",
               "not a tensor", "non-contiguous", "zero heads", "head_dim 6", "head_dim 0", "gqa 3 of 2",
               "nan", "inf", "causal"]


def _main_and_other(op):
    """The activation that sets the shape, and a second tensor argument to damage."""
    return {"adaln_modulate": ("x", "shift"), "gated_residual": ("x", "y"), "residual_adaln": ("x", "gate"),
            "rope_2d": ("q", "k"), "qk_norm_rope": ("q", "k"), "varlen_attention": ("q", "v")}[op]


def _clean_inputs(op, packed, shape, seed):
    """fp32 inputs of `op` for `packed` with the (possibly unusable) heads and head_dim of `shape`."""
    g = torch.Generator().manual_seed(seed)
    n, dh = packed.total_tokens, shape["head_dim"]
    if op == "varlen_attention":  # built here: op_inputs reads kv_heads=0 as "as many as q"
        return {"q": torch.randn(n, shape["heads"], dh, generator=g),
                "k": torch.randn(n, shape["kv_heads"], dh, generator=g),
                "v": torch.randn(n, shape["kv_heads"], dh, generator=g)}
    rope_ok = dh > 0 and dh % 4 == 0  # else built with head_dim 4, then q, k and the tables replaced
    inp = cast_inputs(op, op_inputs(op, packed, seed=seed, **{**shape, "head_dim": dh if rope_ok else 4}),
                      torch.float32, requires_grad=False)
    if op in ("rope_2d", "qk_norm_rope") and not rope_ok:
        inp["q"], inp["k"] = (torch.randn(n, h, dh, generator=g) for h in (shape["heads"], shape["kv_heads"]))
        inp["freqs"] = torch.ones(2, dh // 4)
        for name in ("q_weight", "q_bias", "k_weight", "k_bias"):
            if name in inp:
                inp[name] = torch.ones(dh)
    return inp


def _build(spec):
    """(call, valid): call(backend) runs the op of `spec` on its (mutated) arguments."""
    op, sizes = spec["op"], [tuple(s) for s in spec["sizes"]]
    packed = nk.PackedSeqs.from_sizes(sizes)
    heads, group, head_dim = spec["heads"], spec["group"], spec["head_dim"]
    shape = dict(dim=spec["dim"], heads=heads * group, kv_heads=heads, head_dim=head_dim)
    valid = True
    for kind, value in spec["mutations"]:
        if kind == "shape" and value in ("zero heads", "head_dim 6", "head_dim 0", "gqa 3 of 2"):
            # heads and head_dim do not concern the modulation ops; rope and attention need a
            # head and a head_dim (rope: % 4 == 0); rope takes fewer k heads, attention a divisor
            modulation = op in ("adaln_modulate", "gated_residual", "residual_adaln")
            if value == "zero heads":
                shape.update(heads=0, kv_heads=0)
                valid &= modulation
            elif value == "gqa 3 of 2":
                shape.update(heads=3, kv_heads=2)
                valid &= op != "varlen_attention"
            else:
                shape["head_dim"] = int(value.split()[1])
                valid &= modulation or (value == "head_dim 6" and op == "varlen_attention")
    inp = _clean_inputs(op, packed, shape, spec["seed"])
    fields = {f: getattr(packed, f) for f in ("sizes", "cu_seqlens", "max_seqlen", "total_tokens", "num_seqs")}
    longest = packed.max_seqlen
    attn = {"cu_q": packed.cu_seqlens, "cu_k": packed.cu_seqlens, "max_q": longest, "max_k": longest,
            "causal": False}
    main, other = _main_and_other(op)
    for kind, value in spec["mutations"]:
        targets = (attn["cu_q"], fields["cu_seqlens"], inp[main], inp[other])
        if not all(isinstance(t, torch.Tensor) for t in targets):
            break  # a second mutation of something that is already not a tensor
        if kind == "cu":
            fn, ok = _cu_mutation(value)
            valid &= ok
            if op == "varlen_attention":
                attn["cu_q"] = fn(attn["cu_q"])
            else:
                fields["cu_seqlens"] = fn(fields["cu_seqlens"])
        elif kind == "pack":
            valid = False
            s = fields["sizes"].clone()
            if value == "sizes h+1":
                s[0, 0] += 1
            elif value == "sizes zero":
                s[0, 0] = 0
            elif value == "sizes int64":
                s = s.long()
            elif value == "sizes [B, 3]":
                s = torch.cat([s, s[:, :1]], 1)
            else:
                name = value.split("+")[0]
                fields[name] += 1
            fields["sizes"] = s
        elif kind == "max_seqlen":
            m = {"longest-1": longest - 1, "longest+5": longest + 5, "0": 0, "-1": -1, "2**31-1": 2**31 - 1,
                 "2**31": 2**31, "2**70": 2**70, "float": float(longest), "tensor": torch.tensor(longest)}[value]
            valid &= value in ("longest+5", "2**31-1")
            attn["max_k" if spec["seed"] % 2 else "max_q"] = m
        elif kind == "shape":
            t = inp[other]
            if value == "rows-1":
                inp[main] = inp[main][:-1]
                valid = False
            elif value == "table rows+1":
                inp[other] = torch.cat([t, t[:1]])
                valid = False
            elif value == "dim-1":
                inp[other] = t[..., :-1] if t.shape[-1] > 0 else torch.cat([t, t], -1)
                # attention takes a head_dim of v other than that of q and k (but not 0)
                valid &= op == "varlen_attention" and inp[other].shape[-1] > 0
            elif value in ("dtype float16", "dtype float64"):
                inp[other] = t.to(getattr(torch, value.split()[1]))
                valid = False
            elif value == "meta device":
                inp[other] = t.to("meta")
                valid = False
            elif value == "extra dim":
                inp[main] = inp[main][None]
                valid = False
            elif value == "not a tensor":
                inp[other] = t.tolist()
                valid = False
            elif value == "non-contiguous":
                inp[main] = inp[main].t().contiguous().t() if inp[main].dim() == 2 else \
                    inp[main].transpose(0, 1).contiguous().transpose(0, 1)
            elif value in ("nan", "inf") and inp[main].numel():
                inp[main] = inp[main].clone()
                inp[main].view(-1)[spec["seed"] % inp[main].numel()] = float(value)
            elif value == "causal":
                attn["causal"] = True
    forged = object.__new__(nk.PackedSeqs)
    for k, v in fields.items():
        object.__setattr__(forged, k, v)

    def call(backend):
        if op != "varlen_attention":
            return call_op(op, forged, inp, backend)
        return nk.varlen_attention(inp["q"], inp["k"], inp["v"], attn["cu_q"], attn["cu_k"], attn["max_q"],
                                   attn["max_k"], causal=attn["causal"], backend=backend)

    return call, valid


def _check_example(spec, backends_):
    for backend in backends_:
        _check_one(spec, backend)


def _check_one(spec, backend):
    call, valid = _build(spec)
    try:
        got = call(backend)
    except (ValueError, RuntimeError) as e:
        assert str(e).strip(), f"{backend}: {type(e).__name__} without a message"
        assert not valid, f"{backend}: a valid call was refused: {type(e).__name__}: {e}"
        return
    assert valid, f"{backend}: an invalid call was answered (silently): {spec['mutations']}"
    want = call("reference")
    got, want = (t if isinstance(t, tuple) else (t,) for t in (got, want))
    for i, (g, w) in enumerate(zip(got, want)):
        finite = w[torch.isfinite(w)]
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        assert_close(g, w, atol=1e-4 * scale, name=f"{backend}: output {i}")


def _fuzz_child(backends_: list, examples: int):
    """Entry point of the child process: hypothesis draws examples, each is printed, then checked."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    side = st.integers(1, 4)
    mutation = st.one_of(st.tuples(st.just("cu"), st.sampled_from(CU_KINDS)),
                         st.tuples(st.just("pack"), st.sampled_from(PACK_KINDS)),
                         st.tuples(st.just("max_seqlen"), st.sampled_from(SEQLEN_VALUES)),
                         st.tuples(st.just("shape"), st.sampled_from(SHAPE_KINDS)))
    spec_st = st.fixed_dictionaries({
        "op": st.sampled_from(ALL_OPS),
        "sizes": st.lists(st.tuples(side, side), min_size=1, max_size=3),
        "heads": st.integers(1, 2), "group": st.integers(1, 2), "head_dim": st.sampled_from([4, 8, 12]),
        "dim": st.sampled_from([1, 5, 8]), "seed": st.integers(0, 999),
        "mutations": st.lists(mutation, min_size=1, max_size=2),
    })

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(spec_st)
    def run(spec):
        spec = {**spec, "mutations": [m for m in spec["mutations"]
                                      if not (m[0] in ("pack",) and spec["op"] == "varlen_attention")
                                      and not (m[0] == "max_seqlen" and spec["op"] != "varlen_attention")]}
        print(json.dumps(spec), flush=True)
        _check_example(spec, backends_)

    run()


@pytest.mark.slow
def test_fuzz_malformed_metadata_and_shapes_in_a_child_process():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            f"import test_hostile_ops as t; t._fuzz_child({FUZZ_BACKENDS!r}, {FUZZ_EXAMPLES})")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"fuzz child hung (> 240 s); last example: {out.strip().splitlines()[-1:]}")
    last = proc.stdout.strip().splitlines()[-1:]
    assert proc.returncode >= 0, f"fuzz child killed by signal {-proc.returncode}; last example: {last}"
    assert proc.returncode == 0, f"fuzz child failed on {last} (backends {FUZZ_BACKENDS}):\n{proc.stderr[-4000:]}"
    assert len(proc.stdout.splitlines()) >= FUZZ_EXAMPLES, "the child ran fewer examples than asked"
