"""nit-kernels: fused packed AdaLN, axial 2D RoPE and varlen attention for NiT.

Quick start::

    import torch, nit_kernels as nk
    packed = nk.PackedSeqs.from_sizes([(16, 16), (8, 24), (1, 1)])   # (h, w) in tokens per image
    x = torch.randn(packed.total_tokens, 384)
    shift, scale = torch.randn(2, packed.num_seqs, 384)
    y = nk.adaln_modulate(x, shift, scale, packed)                     # backend chosen automatically

``python -m nit_kernels`` prints which backends are usable on this machine, and why not.
"""
from .dispatch import BackendUnavailable, available_backends, backends_report
from .freqs import ROPE_METHODS, rope_freqs, rope_mscale
from .ops import (adaln_modulate, bias_gelu, bias_gelu_backward, gated_residual, qk_norm_rope, residual_adaln, rope_2d,
                  varlen_attention)
from .packed import PackedSeqs
from . import reference  # noqa: F401,E402  (nk.reference: the spec of every op)

__version__ = "0.1.0"

__all__ = [
    "PackedSeqs",
    "adaln_modulate",
    "gated_residual",
    "bias_gelu",
    "bias_gelu_backward",
    "residual_adaln",
    "rope_freqs",
    "rope_mscale",
    "rope_2d",
    "qk_norm_rope",
    "varlen_attention",
    "available_backends",
    "backends_report",
    "BackendUnavailable",
    "ROPE_METHODS",
]
