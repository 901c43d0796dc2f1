"""Loading and saving NiT weights.

Reads safetensors files and plain PyTorch ``.pt``/``.pth``/``.bin`` state dicts; the latter only
through ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects. Common
wrappers are unwrapped: a state dict under "ema", "model", "state_dict" or "module" (EMA first,
the weights one samples with), and key prefixes "module." (DistributedDataParallel) and
"_orig_mod." (torch.compile). Loading is strict: a checkpoint of another configuration fails with
the missing, unexpected and mis-shaped keys named, and the configuration it looks like.
Saving writes safetensors atomically (`nit_model.atomic`), with the model's NiTConfig as JSON
metadata when it has one.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .atomic import atomic_save

__all__ = ["CheckpointMismatchError", "load_state_dict_file", "unwrap_state_dict", "check_state_dict",
           "load_weights", "save_weights", "read_config", "infer_config", "config_from_state_dict", "load_model"]

PathLike = Union[str, os.PathLike]
WRAPPER_KEYS = ("ema", "model", "state_dict", "module")
PREFIXES = ("module.", "_orig_mod.")
CONFIG_KEY = "nit_config"


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: missing, unexpected or mis-shaped keys."""


def _is_tensor_dict(d) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def unwrap_state_dict(obj, prefer: Sequence[str] = WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint object.

    Descends into the first key of `prefer` present (repeatedly, for nested wrappers), then strips
    a "module." / "_orig_mod." prefix shared by every key.
    """
    seen = 0
    while not _is_tensor_dict(obj):
        if not isinstance(obj, Mapping):
            raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
        key = next((k for k in prefer if k in obj and isinstance(obj[k], Mapping)), None)
        if key is None or seen > 4:
            keys = ", ".join(map(repr, list(obj)[:8]))
            raise ValueError(f"checkpoint is not a state dict of tensors and has none of the wrapper keys "
                             f"{', '.join(prefer)} (top-level keys: {keys})")
        obj, seen = obj[key], seen + 1
    sd = dict(obj)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path: PathLike, prefer: Sequence[str] = WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """Tensors (on CPU) of a safetensors file or a weights-only torch checkpoint, unwrapped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # SafetensorError, or an OSError of a half-written file
            raise _unreadable(path, e) from None
        return unwrap_state_dict(sd, prefer)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint (arbitrary pickled "
                         f"objects are refused): {type(e).__name__}: {e}") from None
    return unwrap_state_dict(obj, prefer)


def _unreadable(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}")


def _shape(t) -> tuple:
    return tuple(t.shape)


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """The NiTConfig fields a NiT state dict determines (shapes and block count)."""
    out = {}
    try:
        w = sd["x_embedder.proj.weight"]
        out.update(hidden_size=w.shape[0], in_channels=w.shape[1], patch_size=w.shape[2])
        out["depth"] = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        if "blocks.0.attn.q_norm.weight" in sd:
            out["num_heads"] = out["hidden_size"] // sd["blocks.0.attn.q_norm.weight"].shape[0]
        out["qk_norm"] = "blocks.0.attn.q_norm.weight" in sd
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        out["num_label_rows"] = rows
        out["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / out["hidden_size"]
        out["projector_dim"] = sd["projector.0.weight"].shape[0]
        out["z_dim"] = sd["projector.4.weight"].shape[0]
        out["frequency_embedding_size"] = sd["t_embedder.mlp.0.weight"].shape[1]
        lora = sd.get("blocks.0.adaLN_modulation.2.weight")
        out["adaln_lora_dim"] = None if lora is None else lora.shape[1]
    except (KeyError, IndexError):
        pass
    return out


def _summary(cfg: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], limit: int = 10) -> None:
    """Raise CheckpointMismatchError naming every missing / unexpected / mis-shaped key (first `limit`)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [k for k in own if k in sd and _shape(own[k]) != _shape(sd[k])]
    if not (missing or unexpected or shaped):
        return

    def listing(title, keys, fmt):
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return f"{len(keys)} {title}: " + ", ".join(fmt(k) for k in keys[:limit]) + more

    parts = []
    if missing:
        parts.append(listing("missing key(s)", missing, str))
    if unexpected:
        parts.append(listing("unexpected key(s)", unexpected, str))
    if shaped:
        parts.append(listing("mis-shaped key(s)", shaped,
                             lambda k: f"{k} (checkpoint {_shape(sd[k])}, model {_shape(own[k])})"))
    msg = "checkpoint does not match the model: " + "; ".join(parts)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        theirs, ours = infer_config(sd), infer_config(own)
        diff = {k: v for k, v in theirs.items() if ours.get(k) != v}
        if diff:
            msg += f". The checkpoint looks like {_summary(theirs)}; the model has {_summary({k: ours.get(k) for k in diff})}"
    raise CheckpointMismatchError(msg)


def load_weights(model: nn.Module, source: Union[PathLike, Mapping[str, torch.Tensor]],
                 prefer: Sequence[str] = WRAPPER_KEYS) -> nn.Module:
    """Load a checkpoint file (or a state dict) into `model` with strict=True; returns the model."""
    sd = load_state_dict_file(source, prefer) if isinstance(source, (str, os.PathLike)) else unwrap_state_dict(source, prefer)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    return model


def save_weights(model: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                 metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write the state dict as safetensors, atomically; the NiTConfig goes into the metadata."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"weights are saved as safetensors; give a path ending in .safetensors, got {path}")
    meta = dict(metadata or {})
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        meta[CONFIG_KEY] = json.dumps(cfg.to_dict())
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    return atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()}))


def read_config(path: PathLike):
    """The NiTConfig stored in a safetensors file by save_weights, or None."""
    from safetensors import safe_open

    from .model_config import NiTConfig
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # SafetensorError: a header that cannot be parsed
        raise _unreadable(path, e) from None
    if CONFIG_KEY not in meta:
        return None
    try:
        return NiTConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: the NiT config in its metadata is unusable: {e}") from None


def config_from_state_dict(sd: Mapping[str, torch.Tensor], **overrides):
    """A NiTConfig for a state dict without NiT metadata (e.g. an official checkpoint).

    Sizes come from the tensor shapes; ``rope_positions`` is "official" (the order the released
    checkpoints were trained with); encoder_depth follows the preset of the same width and depth.
    """
    from .model_config import PRESETS, NiTConfig
    inferred = infer_config(sd)
    if "hidden_size" not in inferred or "num_heads" not in inferred:
        raise ValueError("cannot infer a NiT config from this state dict (no x_embedder / qk-norm keys)")
    rows = inferred.pop("num_label_rows")
    cfg = dict(inferred, num_classes=rows - 1, class_dropout_prob=0.1, rope_positions="official")
    preset = next((p for p in PRESETS.values() if (p.get("depth"), p.get("hidden_size")) ==
                   (cfg["depth"], cfg["hidden_size"])), {})
    cfg["encoder_depth"] = min(preset.get("encoder_depth", 4), cfg["depth"])
    return NiTConfig.from_dict({**cfg, **overrides})


def load_model(path: PathLike, config=None, **overrides):
    """A NiT with the weights of `path`.

    The config is, in order: `config`; the NiTConfig saved in the file by save_weights; or one
    inferred from the tensor shapes (official checkpoints; see config_from_state_dict).
    `overrides` replace fields (e.g. backend="reference", rope_method=...).
    """
    from .model import NiT
    if config is None and os.fspath(path).endswith(".safetensors"):
        config = read_config(path)
    if config is None:
        config = config_from_state_dict(load_state_dict_file(path), **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return load_weights(NiT(config), path)
