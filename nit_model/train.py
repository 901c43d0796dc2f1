"""Native-resolution NiT training: ``nit train --config <yaml>`` and ``train(config, out_dir=...)``.

Flow matching on token-budget packs of images at their own sizes (docs/ARCHITECTURE.md, layers): v-prediction
on x_t = (1 - t) x + t eps with logit-normal t, label dropout for classifier-free guidance,
optional direction and REPA projection losses; AdamW (official NiT defaults: lr 5e-5 at 4 packs
per step, scaled linearly; betas (0.9, 0.95); weight decay 1e-2; eps 1e-6; constant schedule;
gradient clipping at 1.0; EMA 0.9999), bf16 autocast on CUDA and fp32 on CPU, gradient
accumulation, DDP under torchrun (NCCL on GPU, gloo on CPU), atomic checkpoints with exact resume.

Programmatic use::

    from nit_model.train import TrainConfig, train
    cfg = TrainConfig.from_yaml("tiny-shapes", overrides=["train.steps=200"])
    result = train(cfg, out_dir="runs/tiny")
    result.checkpoint        # .../checkpoints/step-00000200 (model/ema safetensors, optimizer, trainer state)
    result.losses            # per-step loss of this run
    result.model, result.ema # the trained NiT and its EMA state dict

Command line::

    nit train --config tiny-shapes --out runs/tiny --set train.steps=200
    nit train --config tiny-shapes --out runs/tiny      # the same command again resumes the run
    torchrun --nproc_per_node 2 -m nit_model train --config nit-s --set data.path=/data/latents
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable, Mapping, Optional, Sequence, Union

from .weights import CheckpointMismatchError
from .memory import MemoryRefusal
from .trainer.checkpointing import CheckpointNotFound
from .trainer.config import ConfigError, TrainConfig, resolve_config_path, shipped_configs

__all__ = ["TrainConfig", "TrainResult", "ConfigError", "CheckpointMismatchError", "CheckpointNotFound", "train",
           "add_train_arguments", "main_train"]


@dataclasses.dataclass
class TrainResult:
    """What a training run produced (on every rank; `checkpoint` is the same path everywhere).

    checkpoint: the final checkpoint directory (model.safetensors, ema.safetensors, ...).
    step: the optimizer step reached. losses / loss_steps: the loss (token-weighted mean over all
    ranks) of every step this run made. history: the rows written to log.jsonl by this run.
    tokens: image tokens trained on by this run (all ranks); tokens_per_s: tokens / time in
    training steps (checkpoint writing excluded); wall_time: seconds of the whole loop.
    model: the trained NiT (on its training device); ema: its EMA state dict.
    """

    checkpoint: Optional[str]
    out_dir: str
    step: int
    losses: list
    loss_steps: list
    history: list
    tokens: int
    tokens_per_s: float
    wall_time: float
    log_path: str
    config: TrainConfig
    model: object = dataclasses.field(repr=False, default=None)
    ema: dict = dataclasses.field(repr=False, default=None)

    def ema_model(self):
        """A copy of the trained NiT holding the EMA weights (for sampling)."""
        import copy
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.ema, strict=True)
        return m.eval()


def train(config: Union[TrainConfig, Mapping, str], *, out_dir: str, resume: Optional[str] = None,
          overrides: Sequence[str] = (), progress: bool = True, encoder=None,
          callback: Optional[Callable[[dict], None]] = None, overwrite: bool = False,
          force: bool = False) -> TrainResult:
    """Train a NiT as `config` says; write logs and checkpoints under `out_dir`.

    Args:
        config: a TrainConfig, a dict of sections, or a YAML path / shipped config name.
        out_dir: run directory: config.yaml, log.jsonl, checkpoints/step-*/ and checkpoints/latest.
        resume: "auto" or None (the default): resume from the newest undamaged checkpoint in out_dir
            when there is one and its config fits (else refuse, naming the differences), start
            afresh when there is none -- one command for every state of the run directory.
            "latest": the newest complete checkpoint in out_dir (an error when there is none);
            or a checkpoint / run directory. The run continues exactly: same data order, same
            random draws, same optimizer state. Damaged checkpoints (files that do not match their
            manifest) are skipped with a warning and moved to checkpoints/corrupt-<name>.
        overrides: ``section.key=value`` strings applied to the config.
        progress: show a tqdm bar (rank 0) with the loss and tokens/s.
        encoder: a REPA encoder ``(x_clean [N, C, p, p], packed) -> [N, z_dim]`` (overrides
            flow.repa_encoder); None and no flow.repa_encoder means no projection loss.
        callback: called with every row written to log.jsonl (a dict), on every rank.
        overwrite: start afresh in an out_dir that holds checkpoints of an earlier run (deleting
            them) instead of resuming it.
        force: train even when the memory estimate of a pack (`nit_model.memory`) exceeds the
            available memory (otherwise MemoryRefusal before anything is allocated).
    Only one trainer may use an out_dir at a time: it is locked (`nit_model.trainer.rundir`) and a
    second trainer gets RunDirLocked (a ConfigError) naming the holder's pid and host.
    Raises ConfigError, CheckpointNotFound, CheckpointMismatchError or MemoryRefusal before the
    first step when the configuration, the data, the run directory or the checkpoint is unusable.
    """
    from .trainer.distributed import setup_distributed
    from .trainer.loop import Trainer

    cfg = TrainConfig.coerce(config)
    if overrides:
        cfg = cfg.apply_overrides(overrides)
    dist = setup_distributed(cfg.train.device)
    trainer = None
    try:
        trainer = Trainer(cfg, out_dir, dist, resume=resume, encoder=encoder, progress=progress, callback=callback,
                          overwrite=overwrite, force=force)
        ckpt = trainer.run()
        dist.barrier()
        return TrainResult(checkpoint=ckpt, out_dir=trainer.out_dir, step=trainer.step, losses=trainer.losses,
                           loss_steps=trainer.loss_steps, history=trainer.rows, tokens=trainer.tokens_this_run,
                           tokens_per_s=trainer.tokens_this_run / max(trainer.train_time, 1e-9),
                           wall_time=trainer.wall_time, log_path=trainer.log_path, config=cfg,
                           model=trainer.model, ema=trainer.ema.state_dict())
    finally:
        if trainer is not None:
            trainer.close()
        dist.cleanup()


# ---------------------------------------------------------------------------------------------
# command line


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    names = ", ".join(shipped_configs())
    p.add_argument("--config", help=f"YAML config: a path or a shipped name ({names})")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (default: resume from the newest checkpoint in --out when there is one with the same "
                        "config, else start afresh), 'latest' (it must exist) or a checkpoint / run directory")
    p.add_argument("--force", action="store_true",
                   help="train even when the memory estimate of a pack exceeds the available memory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")


def main_train(args) -> int:
    if args.list_configs:
        for n in shipped_configs():
            print(n)
        return 0
    if not args.config:
        print("nit train: error: --config is required (a YAML path or one of: " + ", ".join(shipped_configs()) + ")",
              file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig.from_yaml(args.config, overrides=args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        stem = os.path.splitext(os.path.basename(resolve_config_path(args.config)))[0]
        out = args.out or os.path.join("runs", stem)
        result = train(cfg, out_dir=out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
                       force=args.force)
    except (ValueError, OSError, MemoryRefusal) as e:  # ConfigError, CheckpointNotFound, ... included
        from .checks import error_line
        print(f"nit train: error: {error_line(e)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        h = result.history
        first, last = (h[0]["loss"], h[-1]["loss"]) if h else (float("nan"), float("nan"))
        print(f"trained to step {result.step}: loss {first:.4f} (first log window) -> {last:.4f} (last); "
              f"{result.tokens_per_s:,.0f} tokens/s; {result.wall_time:.1f} s; checkpoint {result.checkpoint}")
    return 0
