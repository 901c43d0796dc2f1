"""The adaLN family: adaln_modulate, gated_residual, residual_adaln (memory-bound; reported in GB/s).

Byte counts are what an ideal kernel must move: every token tensor [N, D] read or written once,
every per-image table [B, D] once, at the workload's element size. Per-row statistics (mean,
rstd: 8 bytes a token) that a fused kernel saves for its backward are not counted, so the same
count applies to every provider and a higher GB/s means a faster kernel.
"""
from __future__ import annotations

from .harness import register
from .opsuite import KernelSuite


class AdaLNModulate(KernelSuite):
    op = "adaln_modulate"
    description = "y = LN(x) * (1 + scale[seg]) + shift[seg]; x [N, D], shift/scale [B, D]"

    def bytes_moved(self, n, b, d, h, dh, esize):
        fwd = (2 * n * d + 2 * b * d) * esize      # read x, write y; read shift, scale
        bwd = (3 * n * d + 3 * b * d) * esize      # read dy, x, write dx; read scale, write dshift, dscale
        return fwd, bwd


class GatedResidual(KernelSuite):
    op = "gated_residual"
    description = "out = x + gate[seg] * y; x, y [N, D], gate [B, D]"

    def bytes_moved(self, n, b, d, h, dh, esize):
        fwd = (3 * n * d + b * d) * esize          # read x, y, write out; read gate
        bwd = (3 * n * d + 2 * b * d) * esize      # read dout, y, write dy (dx is dout); read gate, write dgate
        return fwd, bwd


class ResidualAdaLN(KernelSuite):
    op = "residual_adaln"
    description = "x_new = x + gate[seg] * y; h = LN(x_new) * (1 + scale[seg]) + shift[seg]"

    def bytes_moved(self, n, b, d, h, dh, esize):
        fwd = (4 * n * d + 3 * b * d) * esize      # read x, y, write x_new, h; read gate, shift, scale
        bwd = (6 * n * d + 5 * b * d) * esize      # read dx_new, dh, x_new, y, write dx, dy;
        return fwd, bwd                            # read gate, scale, write dgate, dshift, dscale


for _suite in (AdaLNModulate(), GatedResidual(), ResidualAdaLN()):
    register(_suite)
