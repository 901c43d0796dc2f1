"""Varlen attention over packed images (compute-bound; reported in GFLOP/s).

FLOPs follow flash-attention's benchmarks: forward 4 * sum_i(s_i^2) * H * Dh (two matmuls of
2 * s_i^2 * Dh each, per head), backward 2.5x the forward (five matmuls instead of two), for
non-causal attention. Only useful work is counted: the padded baseline does B * max_len^2
instead of sum_i(s_i^2) and is charged for the useful FLOPs only, so its GFLOP/s shows the waste.

Peers of this package's kernels:
  flash_attn    flash_attn_varlen_func (FlashAttention-2, Dao 2023); CUDA, fp16/bf16
  sdpa_loop     torch SDPA once per image, a Python loop over cu_seqlens, on 4-D [1, H, s, Dh] views
                (the layout for which CPU SDPA takes its fused flash kernel)
  sdpa_padded   the FiT-style baseline (Lu et al. 2024): every image padded to the pack's longest,
                [B, max_len, H, Dh], one SDPA call with a key-padding mask. Inputs are padded in
                set-up, as a model that keeps the padded layout holds them; padding_waste is the
                padded tokens / useful tokens that every other layer of such a model also pays.
  flex          FlexAttention (torch.compile'd, dynamic=True) with a document mask built once per
                pack in set-up (not timed), as a model shares it across its layers
  torch_varlen  torch.nn.attention.varlen.varlen_attn, where the installed torch has it

Precision: fp32, and bf16 too where the device multiplies bf16 natively (harness.BothPrecisions);
every provider of a row runs in the row's precision, and its speed-ups are over the reference of
that precision. ``--dtype`` runs one precision only.
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from .harness import BothPrecisions, Prepared, ProviderSpec, Skip, describe_error, register
from .opsuite import KernelSuite, OpCase, backend_provider

# The padded baseline is skipped on CPU when one forward+backward would cost more than this many
# FLOPs (about 2 s at the machine's 146 GFLOP/s fp32 matmul rate, more in practice).
CPU_PADDED_FLOP_LIMIT = 300e9


def attention_flops(seqlens, heads: int, head_dim: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of non-causal attention: fwd 4 * sum(s^2) * H * Dh, bwd 2.5 x fwd."""
    fwd = 4.0 * sum(int(s) ** 2 for s in seqlens) * heads * head_dim
    return fwd, 2.5 * fwd


def _seqlens(case: OpCase) -> list[int]:
    return [h * w for h, w in case.packed.size_list]


def _qkv(case: OpCase):
    inp = case.activation_leaves()
    return inp, inp["q"], inp["k"], inp["v"]


def sdpa_loop_setup(case: OpCase) -> Prepared:
    _, q, k, v = _qkv(case)
    lens = _seqlens(case)
    scale = case.dims[2] ** -0.5

    def fn():
        # 4-D [1, H, s, Dh] views: on CPU, 3-D inputs fall back to SDPA's unfused math path
        outs = [F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None],
                                               vi.transpose(0, 1)[None], scale=scale)[0].transpose(0, 1)
                for qi, ki, vi in zip(q.split(lens), k.split(lens), v.split(lens))]
        return torch.cat(outs)

    return Prepared(fn=fn, leaves=[q, k, v], grad_outs=case.grad_outs, leaf_names=["q", "k", "v"])


def padding_waste(lens) -> float:
    """Padded tokens per useful token when every image is padded to the longest."""
    return (len(lens) * max(lens) - sum(lens)) / sum(lens)


def sdpa_padded_setup(case: OpCase) -> Prepared:
    lens = _seqlens(case)
    b, longest = len(lens), max(lens)
    _, h, dh = case.dims
    padded_flops = sum(attention_flops([longest] * b, h, dh))
    waste = padding_waste(lens)
    if case.device.type == "cpu" and padded_flops > CPU_PADDED_FLOP_LIMIT:
        raise Skip(f"padding {b} images to {longest} tokens costs {padded_flops / 1e9:.0f} GFLOP per fwd+bwd "
                   f"({padded_flops / sum(attention_flops(lens, h, dh)):.1f}x the useful work; padding waste "
                   f"{waste:.2f}), over the CPU limit of {CPU_PADDED_FLOP_LIMIT / 1e9:.0f} GFLOP")
    dev = case.device
    starts = torch.tensor([0] + lens[:-1], device=dev).cumsum(0)
    seg = case.packed.seg_ids.long()
    flat = seg * longest + (torch.arange(case.packed.total_tokens, device=dev) - starts[seg])

    def pad(t):
        out = t.new_zeros(b * longest, *t.shape[1:])
        out[flat] = t
        return out.view(b, longest, *t.shape[1:])

    inp = case.activation_leaves()
    q, k, v = (pad(inp[n].detach()).requires_grad_(True) for n in ("q", "k", "v"))
    # key-padding mask only: padded queries still see real keys, so no row is all -inf (no NaN)
    mask = (torch.arange(longest, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None])[:, None, None, :]
    scale = dh ** -0.5

    def fn():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, scale=scale).transpose(1, 2)

    def to_packed(outs, grads):
        unpad = lambda t: t.reshape(b * longest, *t.shape[2:])[flat]  # noqa: E731
        named = {n: unpad(g) for n, g in zip("qkv", grads)} if grads is not None else {}
        return (unpad(outs[0]),), named

    return Prepared(fn=fn, leaves=[q, k, v], grad_outs=[pad(case.grad_outs[0])], leaf_names=["q", "k", "v"],
                    to_packed=to_packed, notes={"padding_waste": waste})


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # dynamic=True: on CPU the default dynamic=None crashes on the second sequence length
    return torch.compile(flex_attention, dynamic=True)


def _flex_backward_error(device: torch.device, dtype: torch.dtype):
    """Why FlexAttention cannot differentiate here (None if it can); asks flex_attention itself."""
    from torch.nn.attention.flex_attention import flex_attention
    t = torch.zeros(1, 1, 16, 16, device=device, dtype=dtype, requires_grad=True)
    try:
        flex_attention(t, t, t)
    except NotImplementedError as e:
        return f"FlexAttention in torch {torch.__version__}: {' '.join(str(e).split())}"
    except Exception:
        return None  # other failures show up, with their message, in the timed calls
    return None


def flex_setup(case: OpCase) -> Prepared:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise Skip(f"torch {torch.__version__} has no FlexAttention ({e})") from None
    seg = case.packed.seg_ids.long()
    n = case.packed.total_tokens

    def document(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    t0 = time.perf_counter()
    block_mask = create_block_mask(document, None, None, n, n, device=case.device)
    mask_ms = (time.perf_counter() - t0) * 1e3
    no_bwd = _flex_backward_error(case.device, case.dtype)
    _, q, k, v = _qkv(case)
    if no_bwd:
        q, k, v = (t.detach() for t in (q, k, v))
    flex, scale = _compiled_flex(), case.dims[2] ** -0.5

    def fn():
        o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=block_mask, scale=scale)
        return o[0].transpose(0, 1)

    remark = f"document block mask built once per pack in set-up ({mask_ms:.0f} ms, not timed)"
    if no_bwd:
        remark += "; forward without autograd (no backward here)"
    return Prepared(fn=fn, leaves=[] if no_bwd else [q, k, v], grad_outs=case.grad_outs, leaf_names=["q", "k", "v"],
                    no_backward=no_bwd, notes={"reason": remark})


def torch_varlen_setup(case: OpCase) -> Prepared:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        raise Skip(f"torch {torch.__version__} has no torch.nn.attention.varlen") from None
    probe = torch.zeros(4, 1, case.dims[2], device=case.device, dtype=case.dtype)
    cu4 = torch.tensor([0, 4], device=case.device, dtype=torch.int32)
    try:
        varlen_attn(probe, probe, probe, cu4, cu4, 4, 4)
    except Exception as e:
        msg = describe_error(e).split(". ")[0]
        raise Skip(f"torch.nn.attention.varlen.varlen_attn cannot run {case.dtype} on {case.device.type} "
                   f"in torch {torch.__version__}: {msg}") from None
    _, q, k, v = _qkv(case)
    cu, m, scale = case.packed.cu_seqlens, case.packed.max_seqlen, case.dims[2] ** -0.5
    return Prepared(fn=lambda: varlen_attn(q, k, v, cu, cu, m, m, scale=scale), leaves=[q, k, v],
                    grad_outs=case.grad_outs, leaf_names=["q", "k", "v"])


def attention_in_dtype(q, k, v, lens, scale):
    """Per-image attention with every matmul and the softmax in the inputs' dtype: flash-attention's
    low-precision test reference (upcast=False), the baseline of the accuracy rule for fp16/bf16."""
    outs = []
    for qi, ki, vi in zip(q.split(lens), k.split(lens), v.split(lens)):
        s = (qi.transpose(0, 1) @ ki.transpose(0, 1).transpose(-1, -2)) * scale
        outs.append((torch.softmax(s, dim=-1).to(vi.dtype) @ vi.transpose(0, 1)).transpose(0, 1))
    return torch.cat(outs)


class VarlenAttention(BothPrecisions, KernelSuite):
    op = "varlen_attention"
    description = "softmax(q k^T / sqrt(Dh)) v inside each image only; q, k, v [N, H, Dh], non-causal"

    def __init__(self):
        super().__init__()
        self.providers.update({
            "flash_attn": ProviderSpec("flash_attn", backend_provider("flash_attn"),
                                       doc="flash_attn_varlen_func (FlashAttention-2), CUDA fp16/bf16"),
            "sdpa_loop": ProviderSpec("sdpa_loop", sdpa_loop_setup, doc="SDPA per image, Python loop"),
            "sdpa_padded": ProviderSpec("sdpa_padded", sdpa_padded_setup,
                                        doc="FiT-style: pad to the longest image, SDPA with a key-padding mask"),
            "flex": ProviderSpec("flex", flex_setup, compiled=True,
                                 doc="FlexAttention, document mask, torch.compile(dynamic=True)"),
            "torch_varlen": ProviderSpec("torch_varlen", torch_varlen_setup,
                                         doc="torch.nn.attention.varlen.varlen_attn"),
        })

    def shape_doc(self, d, h, dh):
        return f"H={h} Dh={dh}"

    def input_shape(self, d, h, dh):
        return {"heads": h, "head_dim": dh}

    def lowp_baselines(self, case: OpCase) -> list:
        # the reference upcasts internally, so its fp16/bf16 error is only the rounding of the output;
        # kernels that keep P in low precision (flash-attn, SDPA) are judged against low-precision math
        inp = case.activation_leaves()
        with torch.enable_grad():
            out = attention_in_dtype(inp["q"], inp["k"], inp["v"], _seqlens(case), case.dims[2] ** -0.5)
            grads = torch.autograd.grad(out, [inp[n] for n in "qkv"], case.grad_outs)
        return [((out.detach(),), dict(zip("qkv", grads)))]

    def work(self, case: OpCase, pass_: str):
        _, h, dh = case.dims
        fwd, bwd = attention_flops(_seqlens(case), h, dh)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_], "flops"


register(VarlenAttention())
