"""Non-finite input and a huge softmax_scale in the CUDA varlen attention (csrc/cuda, run by the SIMT
simulator "cuda_sim"):
NaN and inf reach out, lse and dQ/dK/dV as in the float64 reference (a NaN query row, NaN or
-inf keys of an image, NaN in k or v), forward and backward, in fp32; a row that sees no key by
the causal mask alone keeps out 0 and lse -inf. softmax_scale 1e30 (one-hot rows) gives the
reference gradients, not a rounding difference times the scale. The cases are those of the cpu
backend (tests/test_cpu_attention.py), so both backends answer the same inputs the same way.
"""
import pytest
import torch

from nit_kernels import backends, cuda_sim
from nit_kernels.testing import assert_close
from test_cpu_attention import NONFINITE, _autograd_run, _cu, _fwd, _inputs, _one_thread, check_nan_query_rows

_WHY = backends.get("cuda_sim").load_error() if "cuda_sim" in backends.BACKENDS else "not registered"
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cuda_sim backend not built: {_WHY}")


def _sim_fwd(q, k, v, cu_q, cu_k, scale, causal):
    """(out, lse) of the simulated forward kernel."""
    cuda_sim.build()  # registers the nit_sim ops
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    return torch.ops.nit_sim.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, scale, causal)


@pytest.mark.parametrize("case", NONFINITE, ids=list(NONFINITE))
def test_nan_and_inf_propagate_like_the_reference(case):
    lq, lk, causal, poison = NONFINITE[case]
    q, k, v, do = _inputs(lq, lk, 2, 2, 16, 16, 7)
    t = dict(q=q, k=k, v=v, do=do)
    poison(t)
    cu_q, cu_k = _cu(lq), _cu(lk)
    with _one_thread():
        ref = _autograd_run("reference", q, k, v, do, cu_q, cu_k, 0.25, causal)
    got = _autograd_run("cuda_sim", *(x.float() for x in (q, k, v, do)), cu_q, cu_k, 0.25, causal)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        finite = e[torch.isfinite(e)]
        scale = max(1.0, finite.abs().max().item() if finite.numel() else 1.0)
        assert_close(a, e, atol=1e-5 * scale, name=f"cuda_sim {name}")
    assert torch.isnan(got[0]).any() or case.startswith("causal, nan query of a row without"), "nothing propagated"
    # the lse the backward recomputes P from: NaN exactly where the reference's log-sum-exp is
    ref_lse = _fwd(*(x.float() for x in (q, k, v)), cu_q, cu_k, 0.25, causal)[1]
    lse = _sim_fwd(*(x.float() for x in (q, k, v)), cu_q, cu_k, 0.25, causal)[1]
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse)), "lse NaN positions differ from the cpu kernel's"


def test_nan_query_gives_nan_lse_and_the_documented_zero_rows_stay():
    check_nan_query_rows(_sim_fwd)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_huge_softmax_scale_gives_the_reference_gradients(causal):
    # scale 1e30: every softmax row is one-hot; dP - delta must be exactly 0 at the key (delta in
    # dP's fmaf order), not a rounding difference times 1e30 in dq and dk
    lq = [10, 10, 70]
    cu = _cu(lq)
    for seed in range(2):
        for head_dim in (16, 64):
            q, k, v, do = _inputs(lq, lq, 2, 2, head_dim, head_dim, seed)
            with _one_thread():
                ref = _autograd_run("reference", q, k, v, do, cu, cu, 1e30, causal)
            got = _autograd_run("cuda_sim", *(x.float() for x in (q, k, v, do)), cu, cu, 1e30, causal)
            for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
                assert torch.isfinite(a).all(), f"cuda_sim {name}: not finite"
                assert_close(a, e, atol=1e-5 * max(1.0, e.abs().max().item()), name=f"cuda_sim {name}")
