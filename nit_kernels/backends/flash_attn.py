"""The flash_attn backend: FlashAttention-2's ``flash_attn_varlen_func`` (Dao 2023), attention only.

Installed with ``pip install 'nit-kernels[flash-attn]'`` on a machine with a CUDA build of torch.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import Call

try:
    from flash_attn import flash_attn_varlen_func
    _ERROR: Optional[str] = None
except Exception as e:  # ImportError, or a binary built for another torch
    flash_attn_varlen_func = None
    _ERROR = f"flash-attn is not importable ({type(e).__name__}: {e}); it needs a CUDA GPU and a CUDA build of torch"


def load_error() -> Optional[str]:
    if _ERROR is None and not torch.cuda.is_available():
        return "no CUDA device is available"
    return _ERROR


def refuse(call: Call) -> Optional[str]:
    if call.device.type != "cuda":
        return f"needs CUDA tensors, got {call.device}"
    if call.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn supports float16 and bfloat16 only, got {call.dtype}"
    if call.head_dim is not None and (call.head_dim > 256 or call.head_dim % 8):
        return f"flash-attn needs head_dim <= 256 and a multiple of 8, got {call.head_dim}"
    return None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p=0.0, softmax_scale=softmax_scale, causal=causal)


OPS = {"varlen_attention": varlen_attention}
