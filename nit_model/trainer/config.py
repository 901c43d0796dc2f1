"""Training configuration: a tree of dataclasses read from YAML, with overrides and validation.

A config file has one mapping per section; every key is optional (the defaults below apply)::

    model:  {preset: tiny, <any NiTConfig field>: value}   # the preset, then field overrides
    data:   {kind: shapes | latents | folder, path, token_budget, ...}
    flow:   {mu, sigma, label_dropout, dir_weight, proj_weight, repa_encoder}
    optim:  {lr, base_packs, scale_lr, betas, weight_decay, eps, max_grad_norm, warmup_steps,
             schedule, min_lr_ratio}
    ema:    {decay}
    train:  {steps, grad_accum, seed, precision, device, num_threads, log_every, ckpt_every,
             keep_last, init_from}

Unknown keys are an error that names the valid ones. ``apply_overrides(["train.steps=200"])``
sets single keys from the command line (values are parsed as YAML: ``true``, ``1.0e-4``,
``[0.9, 0.95]``). ``validate()`` checks types and ranges; it does not touch the file system
(the trainer checks data paths when it opens the data, before the first step).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from ..model_config import NiTConfig
from ..data.shapes import PALETTES

__all__ = ["ConfigError", "ModelSection", "DataSection", "FlowSection", "OptimSection", "EMASection",
           "TrainSection", "TrainConfig", "CONFIG_DIR", "shipped_configs", "resolve_config_path"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A training configuration is invalid: the message names the key, what was expected and what came."""


def _choices(*values):
    return dataclasses.field(default=values[0], metadata={"choices": values})


@dataclasses.dataclass
class ModelSection:
    """The NiT to train: a preset of :class:`NiTConfig` (``tiny``, ``NiT-S`` ... ``NiT-XXL``) and
    overrides of its fields (kept in ``overrides``; in YAML they sit next to ``preset``)."""

    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSection":
        d = dict(d)
        preset = d.pop("preset", cls.preset)
        if not isinstance(preset, str):
            raise ConfigError(f"model.preset must be a preset name (tiny, NiT-S, ...), got {preset!r}")
        nested = d.pop("overrides", None)
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise ConfigError(f"model.overrides must be a mapping, got {nested!r}")
            d = {**nested, **d}
        return cls(preset=preset, overrides=d)

    def to_dict(self) -> dict:
        return {"preset": self.preset, **copy.deepcopy(self.overrides)}

    def nit_config(self) -> NiTConfig:
        """The resolved NiTConfig (raises ConfigError naming the bad key)."""
        try:
            return NiTConfig.from_name(self.preset, **self.overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclasses.dataclass
class DataSection:
    """Where the training images come from and how they are packed.

    kind: ``shapes`` (the built-in procedural dataset, pixels), ``latents`` (a folder written by
    ``nit_model.data.LatentWriter``, e.g. DC-AE latents) or ``folder`` (``root/<class>/<image>``
    at native resolution, pixels). ``path`` is the folder for ``latents`` and ``folder``.
    Images are split into ``model.patch_size`` patches; ``token_budget`` tokens per pack (one
    pack per micro-step and rank), packed with ``packing`` (``lpfhp`` or ``ffd``).
    The ``shapes`` keys (num_items, min_side, max_side, max_aspect, shapes_seed, shapes_palette)
    size and colour the synthetic dataset; ``max_area`` caps the pixel area for ``folder`` (NiT: 2048^2).
    """

    kind: str = _choices("shapes", "latents", "folder")
    path: Optional[str] = None
    token_budget: int = 1024
    packing: str = _choices("lpfhp", "ffd")
    max_items: Optional[int] = None
    drop_oversized: bool = False
    shuffle: bool = True
    num_workers: int = 0
    num_items: int = 20000
    min_side: int = 16
    max_side: int = 64
    max_aspect: float = 3.0
    shapes_seed: int = 0
    shapes_palette: str = _choices(*PALETTES)
    max_area: Optional[int] = 2048 * 2048


@dataclasses.dataclass
class FlowSection:
    """Flow-matching objective (see nit_model.flow): logit-normal t with (mu, sigma); labels
    dropped to the null class with ``label_dropout`` (None: the model's ``class_dropout_prob``);
    direction loss weight; REPA projection weight and encoder, an import path
    ``"package.module:factory"`` whose ``factory(nit_config)`` returns a callable
    ``(x_clean, packed) -> features [N, z_dim]`` (None: no REPA term)."""

    mu: float = 0.0
    sigma: float = 1.0
    label_dropout: Optional[float] = None
    dir_weight: float = 0.0
    proj_weight: float = 1.0
    repa_encoder: Optional[str] = None


@dataclasses.dataclass
class OptimSection:
    """AdamW. With ``scale_lr`` the learning rate is ``lr * packs_per_step / base_packs`` where
    packs_per_step = world_size * grad_accum (the official NiT rule: lr 5e-5 at 4 packs).
    After ``warmup_steps`` of linear warm-up the rate stays at its peak (``schedule: constant``,
    the official NiT schedule) or decays to ``min_lr_ratio`` x peak by ``train.steps``
    (``cosine`` or ``linear``): short runs end with a lower rate and a lower loss."""

    lr: float = 5.0e-5
    base_packs: int = 4
    scale_lr: bool = True
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 1.0e-2
    eps: float = 1.0e-6
    max_grad_norm: Optional[float] = 1.0
    warmup_steps: int = 0
    schedule: str = _choices("constant", "cosine", "linear")
    min_lr_ratio: float = 0.0


@dataclasses.dataclass
class EMASection:
    """Exponential moving average of the weights: ema = decay * ema + (1 - decay) * param, every step."""

    decay: float = 0.9999


@dataclasses.dataclass
class TrainSection:
    """The run: number of optimizer steps, micro-steps per step, seed, numerics and bookkeeping.

    precision: ``auto`` (bf16 autocast on CUDA devices with bf16, fp32 on CPU), ``fp32`` or ``bf16``
    (autocast; weights, optimizer state, EMA and checkpoints stay fp32; see nit_model.precision).
    device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    num_threads: torch CPU threads (None: torch's default).
    init_from: a weights file (safetensors or a weights-only torch file) or a checkpoint
    directory (its EMA weights) to start from instead of a random init.
    """

    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    precision: str = _choices("auto", "fp32", "bf16")
    device: str = _choices("auto", "cpu", "cuda")
    num_threads: Optional[int] = None
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    init_from: Optional[str] = None


SECTIONS = {"model": ModelSection, "data": DataSection, "flow": FlowSection, "optim": OptimSection,
            "ema": EMASection, "train": TrainSection}


_DESCRIBE = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             tuple: "a list of numbers", dict: "a mapping"}


def _type_name(tp) -> str:
    return _DESCRIBE.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, where: str):
    """value checked against the annotation `tp` (int, float, bool, str, tuple, dict, Optional[...])."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if value is None:
        raise ConfigError(f"{where} must be {_type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        v = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
        elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                v = float(value)
            except ValueError:
                pass
        if v is not None:
            if not math.isfinite(v):  # NaN passes every range check below (comparisons are False)
                raise ConfigError(f"{where} must be a finite number, got {v}")
            return v
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, float, f"{where}[{i}]") for i, v in enumerate(value))
    elif tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _section_from_dict(cls, d, name: str):
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {d!r}")
    if cls is ModelSection:
        return ModelSection.from_dict(d)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"valid keys of {name!r}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        v = _coerce(v, hints[k], f"{name}.{k}")
        choices = fields[k].metadata.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{name}.{k} must be one of {', '.join(map(str, choices))}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


@dataclasses.dataclass
class TrainConfig:
    """The whole training configuration (see the module docstring for the sections)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    flow: FlowSection = dataclasses.field(default_factory=FlowSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    ema: EMASection = dataclasses.field(default_factory=EMASection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "TrainConfig":
        """Build and validate; unknown sections or keys raise ConfigError naming the valid ones."""
        d = {} if d is None else d
        if not isinstance(d, Mapping):
            raise ConfigError(f"a training config is a mapping of sections, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(map(repr, unknown))}; valid sections: {', '.join(SECTIONS)}")
        cfg = cls(**{name: _section_from_dict(sec, d.get(name), name) for name, sec in SECTIONS.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Read a YAML file (a path, or the name of a shipped config such as ``tiny-shapes``),
        then apply ``key.sub=value`` overrides."""
        path = resolve_config_path(path)
        with open(path) as f:
            try:
                d = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"{path}: a training config is a YAML mapping of sections (model, data, ...), "
                              f"got {type(d).__name__}")
        try:
            return cls.from_dict(_apply(d or {}, overrides))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def coerce(cls, config: Union["TrainConfig", Mapping, str, None]) -> "TrainConfig":
        """A TrainConfig from a TrainConfig (validated copy), a dict, or a YAML path / shipped name."""
        if isinstance(config, TrainConfig):
            return cls.from_dict(config.to_dict())
        if isinstance(config, (str, os.PathLike)):
            return cls.from_yaml(os.fspath(config))
        return cls.from_dict(config)

    def to_dict(self) -> dict:
        out = {}
        for name in SECTIONS:
            sec = getattr(self, name)
            out[name] = sec.to_dict() if isinstance(sec, ModelSection) else {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sec).items()}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def apply_overrides(self, overrides: Sequence[str]) -> "TrainConfig":
        """A new validated config with ``section.key=value`` overrides applied."""
        return TrainConfig.from_dict(_apply(self.to_dict(), overrides))

    def replace(self, **sections: Mapping[str, Any]) -> "TrainConfig":
        """A new config with some keys changed: ``cfg.replace(train={"steps": 10})``."""
        d = self.to_dict()
        for name, changes in sections.items():
            if name not in SECTIONS:
                raise ConfigError(f"unknown section {name!r}; valid sections: {', '.join(SECTIONS)}")
            d[name] = {**d[name], **changes}
        return TrainConfig.from_dict(d)

    # ------------------------------------------------------------------ derived values
    def nit_config(self) -> NiTConfig:
        return self.model.nit_config()

    @property
    def label_dropout(self) -> float:
        p = self.flow.label_dropout
        return self.nit_config().class_dropout_prob if p is None else p

    def lr(self, world_size: int = 1) -> float:
        """The peak learning rate for `world_size` ranks (linear scaling with packs per step)."""
        o = self.optim
        packs = world_size * self.train.grad_accum
        return o.lr * packs / o.base_packs if o.scale_lr else o.lr

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Types are checked on construction; this checks ranges and cross-section rules."""
        nit = self.nit_config()
        d, f, o, e, t = self.data, self.flow, self.optim, self.ema, self.train

        def positive(where, v, allow_zero=False):
            if v is not None and (v < 0 or (v == 0 and not allow_zero)):
                raise ConfigError(f"{where} must be {'>= 0' if allow_zero else 'positive'}, got {v}")

        if d.kind in ("latents", "folder") and not d.path:
            raise ConfigError(f"data.path is required for data.kind={d.kind!r} (the {d.kind} folder)")
        for k in ("token_budget", "num_items", "min_side", "max_side", "max_items", "max_area"):
            positive(f"data.{k}", getattr(d, k))
        positive("data.num_workers", d.num_workers, allow_zero=True)
        if d.max_aspect < 1:
            raise ConfigError(f"data.max_aspect must be >= 1 (longer / shorter side), got {d.max_aspect}")
        if d.kind == "shapes" and nit.in_channels != 3:
            raise ConfigError(f"data.kind='shapes' gives RGB images (3 channels) but model.in_channels={nit.in_channels}")
        if d.kind in ("shapes", "folder") and d.min_side < nit.patch_size:
            raise ConfigError(f"data.min_side={d.min_side} px is smaller than one patch (model.patch_size={nit.patch_size})")
        if d.kind == "shapes" and d.max_side < d.min_side:
            raise ConfigError(f"data.max_side={d.max_side} must be >= data.min_side={d.min_side}")
        if d.token_budget < 1:
            raise ConfigError(f"data.token_budget must be positive, got {d.token_budget}")

        positive("flow.sigma", f.sigma)
        p = self.label_dropout
        if not 0 <= p < 1:
            raise ConfigError(f"flow.label_dropout must be in [0, 1), got {p}")
        if p > 0 and nit.class_dropout_prob == 0:
            raise ConfigError("flow.label_dropout > 0 needs the null-class row: set model.class_dropout_prob > 0")
        positive("flow.dir_weight", f.dir_weight, allow_zero=True)
        positive("flow.proj_weight", f.proj_weight, allow_zero=True)
        if f.repa_encoder is not None and ":" not in f.repa_encoder:
            raise ConfigError(f"flow.repa_encoder must be an import path 'package.module:factory', got {f.repa_encoder!r}")

        positive("optim.lr", o.lr)
        positive("optim.base_packs", o.base_packs)
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
        positive("optim.weight_decay", o.weight_decay, allow_zero=True)
        positive("optim.eps", o.eps)
        positive("optim.max_grad_norm", o.max_grad_norm)
        positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1] (the final rate over the peak), "
                              f"got {o.min_lr_ratio}")

        if not 0 <= e.decay < 1:
            raise ConfigError(f"ema.decay must be in [0, 1), got {e.decay}")

        for k in ("steps", "grad_accum", "log_every", "ckpt_every", "keep_last", "num_threads"):
            positive(f"train.{k}", getattr(t, k))


def _set_key(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must look like section.key (e.g. train.steps)")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"override {dotted!r}: unknown section {parts[0]!r}; valid sections: {', '.join(SECTIONS)}")
    node = d
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _apply(d: Mapping, overrides: Sequence[str]) -> dict:
    out = copy.deepcopy(dict(d))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must be key=value (e.g. train.steps=200)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_key(out, key.strip(), value)
    return out


def shipped_configs() -> list[str]:
    """Names of the configs shipped in nit_model/configs (usable as ``--config <name>``)."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    """A YAML path as given, or the shipped config of that name (``tiny-shapes`` -> .../tiny-shapes.yaml)."""
    p = os.fspath(name_or_path)
    if os.path.isfile(p):
        return p
    shipped = os.path.join(CONFIG_DIR, p if p.endswith(".yaml") else p + ".yaml")
    if os.sep not in p and os.path.isfile(shipped):
        return shipped
    raise ConfigError(f"no config file {p!r}; shipped configs: {', '.join(shipped_configs()) or 'none'}")
