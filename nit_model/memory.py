"""Peak-memory estimates of sampling and training, checked before anything large is allocated.

A simple model, calibrated against measured runs (``tests/model/test_memory.py`` asserts the
estimate lies within [0.75, 1.6] x the measured growth of the peak resident memory):

* inference, per token of the biggest pack (both guidance halves counted), fp32:
  ``4 B x (6 D + 2 M + 6 P)`` -- the residual stream and its modulated norm, the qkv/attention
  outputs and the MLP's [N, M] hidden and GELU of the block running now, and the solver's few
  [N, P] token tensors (D = hidden size, M = MLP width, P = values per token);
* training, per token of a pack: ``4 B x (depth x (8 D + M) + 4 D + 2 M + 6 P)`` -- what each block
  keeps for backward (about 8 [N, D] with selective recomputation, plus the fc1 output [N, M]),
  plus the transient tensors of the block in backward; with gradient checkpointing only the
  block inputs (2 D per block) are kept;
* training state: ``24 B`` per parameter (fp32 weights, gradients, AdamW's two moments, EMA and
  the optimizer's temporaries);
* attention of the longest image L: the fused backends keep ``2 L Dh`` floats of K and V per
  worker thread; the reference backend materialises ``L^2`` scores per head (x3 in training);
* outputs of sampling: every image's tokens and its decoded pixels (~32 B a pixel);
* a fixed 192 MiB for the allocator, thread pools and small tensors.

The available memory is the smallest of MemAvailable (/proc/meminfo), the cgroup's headroom
(memory.max - memory.current, or the v1 limit) and the address-space limit (RLIMIT_AS) minus
what the process maps now; on CUDA the free device memory.
"""
from __future__ import annotations

import dataclasses
import os
import resource
from typing import Optional, Sequence

import torch

__all__ = ["MemoryRefusal", "MemoryEstimate", "available_memory", "sampling_estimate", "training_estimate",
           "check_fits", "fmt_bytes", "FIXED_BYTES"]

FIXED_BYTES = 192 << 20


class MemoryRefusal(RuntimeError):
    """The estimated peak memory of a plan exceeds the memory available (see the message)."""


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


@dataclasses.dataclass
class MemoryEstimate:
    """bytes: the estimated peak growth; parts: name -> bytes; what: a phrase for messages."""

    bytes: int
    parts: dict
    what: str

    def describe(self) -> str:
        return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items() if v)


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            v = f.read().strip()
    except OSError:
        return None
    return int(v) if v.isdigit() else None


def available_memory(device=None) -> tuple[int, str]:
    """(bytes, where the figure comes from) that this process may still allocate on `device`."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except OSError:
        pass
    limit, usage = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:  # cgroup v1
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        usage = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < 1 << 60:
        found.append((max(0, limit - usage), "the cgroup memory limit minus its usage"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = 0
        try:
            with open("/proc/self/status") as f:
                mapped = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
        except OSError:
            pass
        found.append((max(0, soft - mapped), "the address-space limit (ulimit -v) minus what is mapped"))
    if not found:
        return 1 << 62, "unknown (no /proc/meminfo)"
    return min(found)


def _attention_bytes(cfg, longest: int, device, training: bool) -> int:
    from nit_kernels import dispatch as backends
    if not hasattr(cfg, "num_heads"):
        return 0
    name = getattr(cfg, "backend", None) or os.environ.get("NIT_KERNELS_BACKEND")
    if name is None:
        call = backends.Call("varlen_attention", torch.device(device or "cpu"), torch.float32, head_dim=cfg.head_dim)
        name = next((n for n in backends._auto_order(call) if backends.get(n).refuse(call) is None), "reference")
    if name == "reference":
        return 4 * longest * longest * cfg.num_heads * (3 if training else 2)
    threads = torch.get_num_threads() if torch.device(device or "cpu").type == "cpu" else 1
    return 4 * threads * 2 * longest * cfg.head_dim * (3 if training else 1)


def _dims(cfg) -> tuple[int, int, int]:
    """(D, M, P) of a NiTConfig; a stand-in model's config may only have in_channels and patch_size."""
    p = int(getattr(cfg, "in_channels", 1)) * int(getattr(cfg, "patch_size", 1)) ** 2
    return int(getattr(cfg, "hidden_size", 0)), int(getattr(cfg, "mlp_hidden", 0)), p


def inference_bytes_per_token(cfg) -> int:
    d, m, p = _dims(cfg)
    return 4 * (6 * d + 2 * m + 6 * p)


def training_bytes_per_token(cfg) -> int:
    d, m, p = _dims(cfg)
    kept = 2 * d * cfg.depth + 8 * d + m if cfg.gradient_checkpointing else (8 * d + m) * cfg.depth
    return 4 * (kept + 4 * d + 2 * m + 6 * p)


def sampling_estimate(cfg, token_sizes: Sequence[tuple[int, int]], *, num: int = 1, token_budget: int,
                      guidance: bool, pixels_per_token: int, device=None) -> MemoryEstimate:
    """Peak growth of sampling `num` images at each (h, w) in tokens with a loaded model.

    The biggest pack holds at most `token_budget` tokens (both halves with guidance), or one image
    above the budget alone; no plan is built, so any request is estimated in microseconds.
    """
    factor = 2 if guidance else 1
    p = _dims(cfg)[2]
    counts = [int(h) * int(w) for h, w in token_sizes]
    longest = max(counts)
    total = sum(counts) * int(num)
    pack = max(factor * longest, min(int(token_budget), factor * total))
    parts = {
        f"activations ({pack:,} tokens in the biggest pack x {fmt_bytes(inference_bytes_per_token(cfg))})":
            pack * inference_bytes_per_token(cfg),
        f"attention (longest image {longest:,} tokens)": _attention_bytes(cfg, longest, device, False),
        f"outputs ({total:,} tokens)": total * (4 * p + 32 * int(pixels_per_token)),
        "fixed": FIXED_BYTES,
    }
    return MemoryEstimate(sum(parts.values()), parts, "sampling")


def count_parameters(cfg) -> int:
    """Parameters of a NiT of `cfg`, counted from its shapes (nothing is built); equals
    ``NiT(cfg).num_params`` (tests/model/test_memory.py)."""
    d, m, p = _dims(cfg)
    f, pd, z, dh = cfg.frequency_embedding_size, cfg.projector_dim, cfg.z_dim, cfg.head_dim
    r = cfg.adaln_lora_dim
    adaln = d * 6 * d + 6 * d if r is None else d * r + r + r * 6 * d + 6 * d
    block = (d * 3 * d + 3 * d) + (4 * dh if cfg.qk_norm else 0) + (d * d + d) + (d * m + m) + (m * d + d) + adaln
    return (d * p + d) + (f * d + d + d * d + d) + cfg.num_label_rows * d + (d * pd + pd + pd * pd + pd + pd * z + z) \
        + cfg.depth * block + (d * p + p) + (d * 2 * d + 2 * d)


def training_estimate(cfg, token_budget: int, *, device=None, processes: int = 1) -> MemoryEstimate:
    """Peak growth of training a NiT of `cfg` on packs of `token_budget` tokens, `processes` per machine."""
    n = int(token_budget)
    params = count_parameters(cfg)
    parts = {
        f"weights, gradients, AdamW and EMA ({params:,} parameters x 24 B)": 24 * params,
        f"activations ({n:,} tokens per pack x {fmt_bytes(training_bytes_per_token(cfg))})":
            n * training_bytes_per_token(cfg),
        f"attention (longest image up to {n:,} tokens)": _attention_bytes(cfg, n, device, True),
        "fixed": FIXED_BYTES,
    }
    if processes > 1:
        parts = {f"{k} x {processes} processes": v * processes for k, v in parts.items()}
    return MemoryEstimate(sum(parts.values()), parts, "training")


def check_fits(est: MemoryEstimate, *, device=None, advice: str, force: bool = False) -> None:
    """Raise MemoryRefusal when `est` exceeds the available memory (unless `force`)."""
    if force:
        return
    avail, source = available_memory(device)
    if est.bytes > avail:
        raise MemoryRefusal(f"{est.what} needs about {fmt_bytes(est.bytes)} ({est.describe()}) but only "
                            f"{fmt_bytes(avail)} is available ({source}); {advice}")
