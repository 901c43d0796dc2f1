"""NiT configuration: one dataclass, named presets for the official sizes and a CPU-sized one.

Official sizes (NiT paper, Table 1; github WZDTHU/NiT configs): depth / hidden / heads
    NiT-S 12/384/6, NiT-B 12/768/12, NiT-L 24/1024/16, NiT-XL 28/1152/16, NiT-XXL 40/1536/24,
all with patch size 1 on DC-AE f32c32 latents (in_channels 32), qk-norm, MLP ratio 4 with
tanh-GELU, 1000 classes plus a null class for classifier-free guidance. NiT-XXL uses adaLN-LoRA
(SiLU, Linear(D, 512), Linear(512, 6D)) in every block.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from nit_kernels import ROPE_METHODS, rope_freqs, rope_mscale

__all__ = ["NiTConfig", "PRESETS"]

_BACKENDS = (None, "reference", "cpu", "cuda", "triton", "flash_attn")


@dataclasses.dataclass
class NiTConfig:
    """Hyper-parameters of a NiT model.

    Shapes: tokens are ``patch_size x patch_size`` patches of a ``in_channels``-channel latent
    (or image); ``hidden_size = num_heads * head_dim``; the label table has ``num_classes + 1``
    rows when ``class_dropout_prob > 0`` (row ``num_classes`` is the null class).

    RoPE: ``rope_method`` is one of ``nit_kernels.ROPE_METHODS``; the extrapolation methods read
    ``rope_max_pe_len_h/w`` (the largest test-time sides, in tokens), ``rope_ori_max_pe_len``
    (the training max side) and ``rope_decouple`` (scale each axis by its own side), as the
    official ``VisionRotaryEmbedding`` does. ``rope_positions`` is "grid" (true 2D positions,
    the default for new training) or "official" (the order the released checkpoints were
    trained with; equal to "grid" on square images).

    ``backend`` is passed to every nit_kernels op (None = automatic choice).
    ``gradient_checkpointing`` recomputes each block in backward (torch.utils.checkpoint);
    ``selective_recompute`` recomputes only cheap element-wise results in backward instead of
    storing them: the MLP's GELU output ([N, 4D] per block) and the modulated LayerNorm outputs
    that feed the qkv, fc1 and final Linears (rebuilt from the residual the fused kernels keep).
    """

    in_channels: int = 32
    patch_size: int = 1
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    frequency_embedding_size: int = 256
    encoder_depth: int = 4
    projector_dim: int = 2048
    z_dim: int = 768
    adaln_lora_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_method: str = "normal"
    rope_positions: str = "grid"
    rope_max_pe_len_h: Optional[int] = None
    rope_max_pe_len_w: Optional[int] = None
    rope_ori_max_pe_len: Optional[int] = None
    rope_decouple: bool = False
    backend: Optional[str] = None
    gradient_checkpointing: bool = False
    selective_recompute: bool = True

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def patch_dim(self) -> int:
        """Values per token: in_channels * patch_size**2, in (c, p1, p2) order."""
        return self.in_channels * self.patch_size ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_label_rows(self) -> int:
        return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes

    def rope_table(self):
        """(freqs fp32 [2, head_dim // 4], mscale) for nit_kernels.rope_2d, as the official
        VisionRotaryEmbedding builds them for this configuration."""
        m = self.rope_method
        if m == "normal":
            return rope_freqs(self.head_dim, theta=self.rope_theta), 1.0
        h, w, ori = self.rope_max_pe_len_h, self.rope_max_pe_len_w, self.rope_ori_max_pe_len
        if self.rope_decouple:
            # each axis by the side its positions span: under "grid" axis 0 is the column
            # (p0 = t % w), under "official" p0 = t % h spans h and p1 = t // h spans w
            scale = (w / ori, h / ori) if self.rope_positions == "grid" else (h / ori, w / ori)
        else:
            scale = max(h, w) / ori
        freqs = rope_freqs(self.head_dim, theta=self.rope_theta, method=m, scale=scale, ori_max_pe_len=ori)
        return freqs, rope_mscale(m, max_pe_len=(h, w), ori_max_pe_len=ori)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def fail(msg):
            raise ValueError(f"NiTConfig: {msg}")

        for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes",
                     "frequency_embedding_size", "projector_dim", "z_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(f"{name} must be a positive int, got {v!r}")
        for name in ("mlp_ratio", "class_dropout_prob", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(f"{name} must be a finite number, got {v!r}")
        if self.hidden_size % self.num_heads:
            fail(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 4:
            fail(f"head_dim = hidden_size / num_heads = {self.head_dim} must be a multiple of 4 (axial 2D RoPE)")
        if not 0 <= self.encoder_depth <= self.depth:
            fail(f"encoder_depth must be in [0, depth={self.depth}], got {self.encoder_depth}")
        if self.mlp_ratio <= 0:
            fail(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0 <= self.class_dropout_prob < 1:
            fail(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.adaln_lora_dim is not None and (not isinstance(self.adaln_lora_dim, int) or self.adaln_lora_dim <= 0):
            fail(f"adaln_lora_dim must be None or a positive int, got {self.adaln_lora_dim!r}")
        if self.rope_method not in ROPE_METHODS:
            fail(f"rope_method must be one of {', '.join(ROPE_METHODS)}, got {self.rope_method!r}")
        if self.rope_positions not in ("grid", "official"):
            fail(f"rope_positions must be 'grid' or 'official', got {self.rope_positions!r}")
        if self.rope_method != "normal":
            for name in ("rope_max_pe_len_h", "rope_max_pe_len_w", "rope_ori_max_pe_len"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    fail(f"rope_method {self.rope_method!r} needs {name} (a positive int, in tokens), got {v!r}")
        if self.backend not in _BACKENDS:
            fail(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, name: str, **overrides) -> "NiTConfig":
        """A preset ("NiT-S", "NiT-B", "NiT-L", "NiT-XL", "NiT-XXL", "tiny"), with overrides."""
        key = next((k for k in PRESETS if k.lower() == name.lower()), None)
        if key is None:
            raise ValueError(f"unknown NiT preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NiTConfig":
        """Build from a mapping; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"NiTConfig: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "NiTConfig":
        return self.from_dict({**self.to_dict(), **changes})


# REPA encoder depth follows REPA's convention (4 for the S/B widths, 8 for the larger ones);
# NiT-XXL's z_dim 1280 matches the official XXL config (a RADIO v2.5-h encoder).
PRESETS: dict[str, dict] = {
    "NiT-S": dict(depth=12, hidden_size=384, num_heads=6, encoder_depth=4),
    "NiT-B": dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4),
    "NiT-L": dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8),
    "NiT-XL": dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8),
    "NiT-XXL": dict(depth=40, hidden_size=1536, num_heads=24, encoder_depth=8, z_dim=1280, adaln_lora_dim=512),
    # CPU-sized: RGB pixels in 4x4 patches (a 32x32 image is 8x8 tokens); trains in minutes on 2 cores.
    "tiny": dict(in_channels=3, patch_size=4, depth=4, hidden_size=128, num_heads=4, num_classes=10,
                 encoder_depth=2, projector_dim=256, z_dim=64),
}
