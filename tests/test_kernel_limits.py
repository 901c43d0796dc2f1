"""The head-dim limits of the CUDA kernels are stated once, in csrc/cuda/launchers.h, and the
extension reports them: op ``limits() -> (varlen_attention_max_head_dim,
qk_norm_rope_max_head_dim)`` in the ``nit`` library (the compiled extension, CPU-only builds
included) and in the ``nit_sim`` library (the cuda_sim build of the same sources).

These tests hold the reported values to the limits the Python dispatch enforces for the cuda
backend (nit_kernels.backends.cuda), and to the glue's own argument checks (through cuda_sim).
"""
import pytest
import torch

from nit_kernels import dispatch
from nit_kernels.backends import _extension, cuda
from nit_kernels.backends.cuda import LIMIT_OPS
from nit_kernels.dispatch import Call

_SIM_WHY = dispatch.get("cuda_sim").load_error()


def _limits(ns: str) -> dict:
    values = getattr(torch.ops, ns).limits()
    assert len(values) == len(LIMIT_OPS) and all(isinstance(v, int) for v in values), values
    return dict(zip(LIMIT_OPS, values))


def _python_refuses(op: str, head_dim: int):
    return cuda.refuse_kernel(Call(op, torch.device("cuda"), torch.float32, head_dim=head_dim))


@pytest.mark.skipif(_extension.IMPORT_ERROR is not None, reason=f"nit_kernels._C unavailable: {_extension.IMPORT_ERROR}")
def test_extension_reports_the_limits_python_enforces():
    limits = _limits("nit")
    assert limits == {"varlen_attention": 128, "qk_norm_rope": 256}
    assert cuda.head_dim_limits() == limits
    for op, limit in limits.items():
        assert _python_refuses(op, limit) is None, f"{op}: head_dim {limit} is within the kernel's limit"
        why = _python_refuses(op, limit + 1)
        assert why is not None and f"head_dim <= {limit}" in why, (op, why)


@pytest.mark.skipif(_SIM_WHY is not None, reason=f"cuda_sim unavailable: {_SIM_WHY}")
def test_cuda_sim_reports_the_limits_its_glue_checks():
    from nit_kernels.backends import cuda_sim

    cuda_sim.build()
    limits = _limits("nit_sim")
    if _extension.IMPORT_ERROR is None:
        assert limits == _limits("nit")
    ops = torch.ops.nit_sim
    cu, sizes = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([[1, 1]], dtype=torch.int32)

    def qk_norm_rope(dh):
        q = torch.randn(1, 1, dh)
        w, b = torch.ones(dh), torch.zeros(dh)
        return ops.qk_norm_rope_fwd(q, q, cu, sizes, torch.ones(2, dh // 4), w, b, w, b, 1e-5, "grid", 1.0)

    def attention(dh):
        q = torch.randn(1, 1, dh)
        return ops.varlen_attention_fwd(q, q, q, cu, cu, 1, 1, 1.0, False)

    for op, run, message in ((("qk_norm_rope", qk_norm_rope, "head_dim <= {}")),
                             ("varlen_attention", attention, "head_dim 1..{}")):
        limit = limits[op]
        run(limit)  # the largest head_dim runs
        with pytest.raises(RuntimeError, match=message.format(limit).replace(".", r"\.")):
            run(limit + 4)
