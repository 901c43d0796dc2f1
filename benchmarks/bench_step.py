"""The whole NiT step: a training step and a sampling step, per model size, per provider (tokens/s).

Passes:
  train   one optimizer step as ``nit_model.trainer.loop.Trainer.train_step`` makes it, without the
          data stream and logging: the flow-matching objective (``nit_model.flow.FlowMatchingLoss``,
          label dropout 0.1, t and noise drawn in set-up), backward, gradient clipping at 1.0,
          AdamW with the trainer's defaults (``trainer.config.OptimSection``) and the EMA update
          (``trainer.ema.EMA``). fp32 on CPU. Tokens/s counts the pack's tokens.
  sample  one guided Euler step of the sampler (``nit_model.solvers.guided`` + ``solve``, cfg 4.0)
          under ``torch.no_grad``: one forward of a CFG pack, whose first half holds the images with
          their labels and whose second half the same images with the null class, as
          ``nit_model.sampling`` packs them. Tokens/s counts the tokens of both halves.

Workloads (model x pack); every pack holds about ``budget`` tokens (4,096; ``--quick`` 512):
  imagenet-4k   images of benchmarks/assets/imagenet_like_sizes.csv at stride 32 (DC-AE f32,
                patch 1), drawn until the budget is full (``benchmarks.workloads.imagenet_like_pack``);
                its CFG pack is a half-budget draw, twice.
  fixed-256px   the fixed-resolution case: 8x8-token images (256x256 pixels at stride 32).
Models: ``tiny`` (depth 4, D 128), ``NiT-S`` (12, 384), ``NiT-XL`` (28, 1152). The packs are token
grids; every model sees the same (h, w) sizes, with random values in its own patch layout.

Providers (the same weights in each: the model's initialisation with the adaLN-Zero tensors drawn
N(0, 0.02), so that every block contributes and the check below is not vacuous):
  reference  NiT with ``backend="reference"``: the pure-PyTorch ops everywhere.
  auto       NiT with ``backend=None``: the fastest available backend per op (CPU: the C++ kernels);
             the row's remark names the backend each op resolved to.
  official   ``nit_model.official.NiTOfficialFormulation``: the official implementation's
             formulation (per-token conditioning, per-token cos/sin tables, the model's own
             attention with SDPA per image in place of flash-attn), no nit_kernels op.
All three use the official RoPE position order (``rope_positions="official"``) so that their
outputs agree on non-square images.

Check before timing: on a sub-pack of the workload (its first images, up to 512 tokens), each
provider's velocity prediction, the gradient of the flow-matching loss with respect to every
parameter (one vector) and the state after one guided Euler step are compared with the same model
in float64 (``backend="reference"``), by the project's accuracy rule (error at most 2x the error
of the fp32 reference, plus atol).

Precision (the ``dtype`` column): every workload runs in fp32 and, where the device multiplies bf16
natively (``nit_model.precision.default_precision``: CPUs with AMX-BF16, CUDA devices with bf16), in
bf16, each provider under the same policy: the weights, AdamW and EMA stay fp32 and the forward
runs under ``torch.autocast`` in bf16, as the trainer does with ``train.precision=bf16``.
``--dtype`` runs one precision only.

Peak memory (both passes): ``harness.peak_memory`` (torch profiler allocations on CPU, CUDA
allocator statistics on GPU) of one more call after timing. The weights, AdamW and EMA state are
held before the call and not counted; the call's activations, gradients (freed by
``zero_grad(set_to_none=True)`` at its end) and temporaries are.

NiT-XL runs on a GPU only: see ``XL_ON_CPU``. ``benchmarks.train_bench`` times the whole trainer
(data loading included) for one preset; this suite isolates the step so that providers can be
swapped, and is built from the same pieces.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
from torch import nn

from nit_kernels import PackedSeqs, dispatch as backends
from nit_kernels.dispatch import Call
from nit_kernels.testing import _ATOL, assert_accuracy

from .harness import BothPrecisions, Mismatch, Prepared, ProviderSpec, ProviderSuite, RunOptions, Skip, Workload, register
from .opsuite import pack_stats

MODELS = ("tiny", "NiT-S", "NiT-XL")
CFG_SCALE = 4.0
CHECK_TOKENS = 512
# measured here (full mode, 2 threads, shared machine): NiT-S's training step on the 4,096-token
# ImageNet-like pack took 4.3 s (auto) to 44 s (reference under heavy load); NiT-XL costs ~20x the
# FLOPs, and every provider and pack needs at least five steps (warm-up, three timed, memory).
NIT_S_STEP_S = (4.3, 44.0)
XL_ON_CPU = ("NiT-XL is timed on a GPU only: its training step costs {ratio:.0f}x the FLOPs of NiT-S's on the "
             "same pack (NiT-S took {lo:.0f} to {hi:.0f} s a step on a 4,096-token pack on this shared 2-core "
             "machine, so {xl_lo:.0f} to {xl_hi:.0f} min a step for NiT-XL, at least five steps per provider and "
             "pack), and its weights, gradients, AdamW and EMA state alone take {gb:.0f} GB")


def step_flops(cfg, n_tokens: int, sum_sq: int) -> float:
    """FLOPs of one training step: 3x the forward's matmul FLOPs (forward + backward) plus attention.

    Forward per token: 2 * (qkv 3D^2 + proj D^2 + MLP 2 * D * 4D) per block, and attention
    4 * sum_i(s_i^2) * D per block (scores and values, all heads).
    """
    d, depth = cfg.hidden_size, cfg.depth
    dense = 2 * n_tokens * depth * (4 * d * d + 2 * d * cfg.mlp_hidden)
    attn = 4 * sum_sq * d * depth
    return 3 * (dense + attn)


@functools.lru_cache(maxsize=None)
def step_packs(quick: bool, seed: int = 0) -> dict[str, tuple[tuple, tuple]]:
    """Pack name -> (training pack sizes, CFG half sizes), (h, w) in tokens."""
    from .workloads import imagenet_like_pack

    budget = 512 if quick else 4096
    name = "imagenet-512" if quick else "imagenet-4k"
    return {name: (tuple(imagenet_like_pack(budget, seed=seed)), tuple(imagenet_like_pack(budget // 2, seed=seed))),
            "fixed-256px": (((8, 8),) * (budget // 64), ((8, 8),) * (budget // 128))}


@dataclasses.dataclass
class StepCase:
    workload: Workload
    config: Any                 # NiTConfig
    device: torch.device
    dtype: torch.dtype          # the row's dtype: fp32 runs in fp32, fp16/bf16 under autocast
    state: dict                 # initial weights shared by every provider (fp32, on the device)
    train: dict                 # x, y, t, eps, packed
    sample: dict                # x (noise of the cond half), y2, packed2
    check: dict                 # the same on the sub-pack, plus the fp64 and fp32 reference results


@dataclasses.dataclass
class StepPrepared(Prepared):
    """``fn`` is the training step; ``sample`` the sampling step; ``check_fn`` the results compared
    with the reference (velocity, flat gradient, state after a guided step) on the check sub-pack."""

    sample: Optional[Callable[[], Any]] = None
    check_fn: Optional[Callable[[], tuple]] = None


def autocast_for(device: torch.device, dtype: torch.dtype):
    """torch.autocast in dtype for fp16/bf16 (weights stay fp32), else no autocast."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weights and inputs: fp32 under autocast, else the dtype itself (fp32, fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------------------------
# models and the step
# ---------------------------------------------------------------------------------------------
def _nit(cfg, backend: Optional[str]) -> nn.Module:
    from nit_model.model import NiT

    return NiT(cfg.replace(backend=backend))


def _official(cfg, backend: Optional[str] = None) -> nn.Module:
    from nit_model.official import NiTOfficialFormulation

    return NiTOfficialFormulation(cfg)


def initial_state(cfg, seed: int) -> dict:
    """The model's initialisation with every all-zero tensor (adaLN-Zero, output layer) drawn N(0, 0.02)."""
    torch.manual_seed(seed)
    model = _nit(cfg, "reference")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _inputs(cfg, sizes, cfg_half, device, dtype, seed: int) -> tuple[dict, dict]:
    from nit_model.flow import sample_t

    g = torch.Generator().manual_seed(seed)
    packed = PackedSeqs.from_sizes(list(sizes), device=device)
    n, b = packed.total_tokens, packed.num_seqs
    train = {"packed": packed, "x": torch.randn(n, cfg.patch_dim, generator=g).to(device, dtype),
             "eps": torch.randn(n, cfg.patch_dim, generator=g).to(device, dtype),
             "t": sample_t(b, generator=g).to(device, dtype),
             "y": torch.randint(0, cfg.num_classes, (b,), generator=g).to(device)}
    half = PackedSeqs.from_sizes(list(cfg_half), device=device)
    y = torch.randint(0, cfg.num_classes, (half.num_seqs,), generator=g)
    sample = {"packed2": PackedSeqs.from_sizes(list(cfg_half) * 2, device=device),
              "x": torch.randn(half.total_tokens, cfg.patch_dim, generator=g).to(device, dtype),
              "y2": torch.cat([y, torch.full_like(y, cfg.null_class)]).to(device)}
    return train, sample


def guided_step(model, x, y2, packed2) -> torch.Tensor:
    """One Euler step from t = 1 with classifier-free guidance, both halves in one forward."""
    from nit_model.solvers import guided, solve

    n = x.shape[0]

    def cond_and_uncond(xx, t):
        tt = torch.full((y2.shape[0],), float(t), dtype=xx.dtype, device=xx.device)
        v = model(torch.cat([xx, xx]), tt, y2, packed2).to(xx.dtype)
        return v[:n], v[n:]

    def cond_only(xx, t):
        raise AssertionError("the step is inside the guidance interval; the conditional-only path is not used")

    with torch.no_grad():
        return solve(guided(cond_only, cond_and_uncond, CFG_SCALE), x, steps=1, solver="euler")


def check_results(model, chk: dict, amp=contextlib.nullcontext) -> tuple:
    """(velocity [n, C*p*p], d loss / d parameters as one vector, state after one guided step)."""
    from nit_model.flow import interpolate, per_token, velocity_target

    tr = chk["train"]
    packed, x, eps, t = tr["packed"], tr["x"], tr["eps"], tr["t"]
    params = [(k, p) for k, p in model.named_parameters() if not k.startswith("projector.")]
    with torch.enable_grad():
        with amp():
            v_pred = model(interpolate(x, eps, per_token(t, packed)), t, tr["y"], packed)
        loss = (v_pred.to(x.dtype) - velocity_target(x, eps)).square().mean()
        grads = torch.autograd.grad(loss, [p for _, p in params])
    flat = torch.cat([gr.reshape(-1) for gr in grads])
    sm = chk["sample"]
    with amp():
        after = guided_step(model, sm["x"], sm["y2"], sm["packed2"])
    return v_pred.detach(), flat, after


def _to(d: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}


def build_step(case: StepCase, make: Callable, backend: Optional[str]) -> StepPrepared:
    """The provider's module with the shared weights, its training step and its sampling step."""
    from nit_model.flow import FlowMatchingLoss
    from nit_model.trainer.config import EMASection, OptimSection
    from nit_model.trainer.ema import EMA

    model = make(case.config, backend)
    model.load_state_dict(case.state, strict=True)
    model = model.to(case.device, storage_dtype(case.dtype))
    amp = functools.partial(autocast_for, case.device, case.dtype)
    model.projector.requires_grad_(False)  # no REPA term: the trainer freezes it too
    trainable = [p for p in model.parameters() if p.requires_grad]
    o = OptimSection()
    # the trainer's optimizer, for every provider: AdamW's fused kernel where torch has one for the device
    fused = case.device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                            fused=fused, foreach=None if fused else True)
    ema = EMA(model, EMASection().decay)
    loss_fn = FlowMatchingLoss.for_config(case.config, label_dropout=0.1)
    tr, sm = case.train, case.sample
    device = case.device

    def train_step():
        gen = torch.Generator(device=device).manual_seed(0)  # label dropout
        with amp():
            out = loss_fn(model, tr["x"], tr["y"], tr["packed"], t=tr["t"], eps=tr["eps"], generator=gen)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(trainable, o.max_grad_norm, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        return out.loss.detach()

    def sample_step():
        with amp():
            return guided_step(model, sm["x"], sm["y2"], sm["packed2"])

    return StepPrepared(fn=train_step, sample=sample_step, check_fn=lambda: check_results(model, case.check, amp))


def _auto_choice(case: StepCase) -> str:
    """Which backend each op resolves to for this model with backend=None (environment included)."""
    by: dict = {}
    for op in backends.OPS:
        try:
            name, _ = backends.select(Call(op, case.device, case.dtype, head_dim=case.config.head_dim))
        except backends.BackendUnavailable:
            name = "unavailable"
        by.setdefault(name, []).append(op)
    return "auto ran " + "; ".join(f"{name}: {', '.join(ops)}" for name, ops in by.items())


def _provider(make: Callable, backend: Optional[str], auto: bool = False) -> Callable[[StepCase], StepPrepared]:
    def setup(case: StepCase) -> StepPrepared:
        prep = build_step(case, make, backend)
        if auto:
            prep.notes["reason"] = _auto_choice(case)
        return prep
    return setup


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
class StepSuite(BothPrecisions, ProviderSuite):
    name = "step"
    description = ("NiT training step (objective, backward, clipping, AdamW, EMA) and guided sampling step "
                   "(one forward of a cond+uncond CFG pack); tokens/s")
    passes = ("train", "sample")
    memory_passes = ("train", "sample")

    def __init__(self):
        self.providers = {
            "reference": ProviderSpec("reference", _provider(_nit, "reference"),
                                      doc="NiT with backend='reference' (pure-PyTorch ops everywhere)"),
            "auto": ProviderSpec("auto", _provider(_nit, None, auto=True), ours=True,
                                 doc="NiT with backend=None (fastest available: C++ kernels on CPU)"),
            "official": ProviderSpec("official", _provider(_official, None),
                                     doc="NiTOfficialFormulation: per-token conditioning and RoPE tables, "
                                         "SDPA per image (the official formulation)"),
        }

    def workloads(self, opts: RunOptions) -> list[Workload]:
        from nit_model.model_config import NiTConfig

        out = []
        # --quick: the tiny model (seconds); NiT-XL stays listed so that its GPU-only skip is reported
        for model in (("tiny", "NiT-XL") if opts.quick else MODELS):
            cfg = NiTConfig.from_name(model)
            for pack, (sizes, half) in step_packs(opts.quick, opts.seed).items():
                doc = (f"{model} (depth {cfg.depth}, D={cfg.hidden_size}, H={cfg.num_heads}); train "
                       f"{pack_stats(sizes)}; CFG pack 2x {pack_stats(half)}")
                out.append(Workload(f"{pack}/{model}", doc, {"model": model, "sizes": sizes, "half": half}))
        return out

    def make_case(self, workload, device, dtype, opts) -> StepCase:
        from nit_model.model_config import NiTConfig

        p = workload.params
        cfg = NiTConfig.from_name(p["model"], rope_positions="official")
        sizes, half = p["sizes"], p["half"]
        if p["model"] == "NiT-XL" and device.type == "cpu":
            # the ratio on the full-size ImageNet-like pack, so that every workload states the same figure
            full = step_packs(False, 0)["imagenet-4k"][0]
            n, sq = sum(h * w for h, w in full), sum((h * w) ** 2 for h, w in full)
            ratio = step_flops(cfg, n, sq) / step_flops(NiTConfig.from_name("NiT-S"), n, sq)
            lo, hi = NIT_S_STEP_S
            raise Skip(XL_ON_CPU.format(ratio=ratio, lo=lo, hi=hi, xl_lo=ratio * lo / 60, xl_hi=ratio * hi / 60,
                                        gb=block_params(cfg) * 4 * 5 / 1e9))
        train, sample = _inputs(cfg, sizes, half, device, storage_dtype(dtype), opts.seed)
        # check sub-pack: the first images, up to CHECK_TOKENS tokens (at least one image)
        sub, used = [], 0
        for h, w in sizes:
            if sub and used + h * w > CHECK_TOKENS:
                break
            sub.append((h, w))
            used += h * w
        sub_half = sub[: max(1, len(sub) // 2)]
        ctrain, csample = _inputs(cfg, sub, sub_half, device, torch.float64, opts.seed + 7)
        case = StepCase(workload, cfg, device, dtype, initial_state(cfg, opts.seed), train, sample, {})
        case.check = {"train": ctrain, "sample": csample}
        ref = _nit(cfg, "reference")
        ref.load_state_dict(case.state, strict=True)
        hi = check_results(ref.to(device, torch.float64), case.check)
        lo_case = {"train": _to(ctrain, storage_dtype(dtype)), "sample": _to(csample, storage_dtype(dtype))}
        lo = check_results(ref.to(device, storage_dtype(dtype)), lo_case, functools.partial(autocast_for, device, dtype))
        case.check = {"train": lo_case["train"], "sample": lo_case["sample"], "hi": hi, "lo": lo}
        return case

    def prepare(self, case: StepCase, spec: ProviderSpec, opts: RunOptions) -> tuple[StepPrepared, str]:
        if spec.compiled and not opts.run_compiled:
            raise Skip("torch.compile providers run in full mode or with --compile")
        prep = spec.setup(case)
        return prep, self.verify(case, prep, (), None)

    def verify(self, case: StepCase, prepared: StepPrepared, outs, grads) -> str:
        got = prepared.check_fn()
        hi, lo = case.check["hi"], case.check["lo"]
        names = ("velocity", "d loss/d params", "guided Euler step")
        errs = []
        try:
            for name, o, h, low in zip(names, got, hi, lo):
                scale = max(1.0, h.abs().max().item())
                assert_accuracy(o.double(), h, low.double(), name=name, atol=_ATOL[case.dtype] * scale)
                errs.append((o.double() - h).abs().max().item())
        except AssertionError as e:
            raise Mismatch(" ".join(str(e).split())[:400]) from None
        n = case.check["train"]["packed"].total_tokens
        return (f"ok on a {n}-token sub-pack: max err velocity {errs[0]:.2g}, grad {errs[1]:.2g}, guided step "
                f"{errs[2]:.2g} vs fp64 (rule: <= 2x fp32-reference err + atol)")

    @staticmethod
    def pass_callables(prep: StepPrepared, pass_: str):
        if pass_ == "train":
            return (lambda _: prep.fn()), None
        if pass_ == "sample":
            return (lambda _: prep.sample()), None
        raise ValueError(f"unknown pass {pass_!r}; the step suite has 'train' and 'sample'")

    def work(self, case: StepCase, pass_: str):
        if pass_ == "train":
            return case.train["packed"].total_tokens, "tokens"
        return case.sample["packed2"].total_tokens, "tokens"


def block_params(cfg) -> int:
    """Parameters of the transformer blocks (qkv, proj, fc1, fc2, adaLN Linears; biases included)."""
    d, hid = cfg.hidden_size, cfg.mlp_hidden
    return cfg.depth * ((3 * d * d + 3 * d) + (d * d + d) + (d * hid + hid) + (hid * d + d) + (6 * d * d + 6 * d))


register(StepSuite())
