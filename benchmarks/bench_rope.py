"""Axial 2D RoPE: rope_2d and qk_norm_rope (memory-bound; reported in GB/s).

Byte counts are what an ideal kernel must move: q [N, H, Dh] and k [N, H, Dh] read and the rotated
pair written in the forward; the backward reads the output gradients and writes the input
gradients (qk_norm_rope's backward also reads q and k to recompute the normalisation). The
frequency table and LayerNorm weights (a few hundred bytes) are not counted; angles are computed
in-kernel, so no per-token cos/sin table is part of the ideal traffic.
"""
from __future__ import annotations

from .harness import register
from .opsuite import KernelSuite


class _RopeSuite(KernelSuite):
    def shape_doc(self, d, h, dh):
        return f"H={h} Dh={dh}"

    def input_shape(self, d, h, dh):
        return {"heads": h, "head_dim": dh}


class Rope2D(_RopeSuite):
    op = "rope_2d"
    description = "axial 2D rotary embedding of q, k [N, H, Dh], angles from each token's (row, col)"

    def bytes_moved(self, n, b, d, h, dh, esize):
        qk = 2 * n * h * dh * esize
        return 2 * qk, 2 * qk                      # fwd: read q, k, write q_rot, k_rot; bwd: the same shapes


class QKNormRope(_RopeSuite):
    op = "qk_norm_rope"
    description = "LayerNorm over Dh (affine) of q and k, then axial 2D RoPE, in one pass"

    def bytes_moved(self, n, b, d, h, dh, esize):
        qk = 2 * n * h * dh * esize
        return 2 * qk, 3 * qk                      # bwd: read dq_rot, dk_rot, q, k; write dq, dk


for _suite in (Rope2D(), QKNormRope()):
    register(_suite)
