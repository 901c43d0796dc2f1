"""The training loop: set-up (everything validated before the first step), steps, logs, checkpoints.

One optimizer step consumes ``grad_accum`` packs on each of the W ranks. Every token of the
step weighs the same: a micro-step's loss (a mean over its pack's tokens) is scaled by
``n_tokens(pack) * W / n_tokens(step, all ranks)`` before backward, and DDP averages gradients
over ranks (divides by W), so the gradient is that of the token-weighted mean over the step's
packs. A 2-rank step therefore equals a single-process step accumulating the same two packs.

The noise, times and label dropout of a micro-step come from a generator seeded with
(seed, step, slot), slot = micro * W + rank: the pack that holds slot s in a W-rank run holds
slot s in a 1-rank run with W times the accumulation, and a resumed run draws what an
uninterrupted one draws.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import os
import shutil
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..atomic import atomic_write_text
from ..weights import (CheckpointMismatchError, check_state_dict, load_state_dict_file, save_weights,
                          CONFIG_KEY)
from ..flow import FlowMatchingLoss
from ..memory import check_fits, training_estimate
from ..model import NiT
from . import checkpointing as ck
from .config import ConfigError, TrainConfig
from .data import PackStream, build_dataset, check_dataset
from .distributed import DistInfo
from .rundir import RunDirLocked, RunLock
from .ema import EMA

__all__ = ["Trainer", "TRAINER_FORMAT", "RESUME_MAY_CHANGE", "check_resume_config", "micro_seed"]

TRAINER_FORMAT = "nit-trainer-v1"
# keys that may differ between a checkpoint's config and the resuming run's (the rest must match,
# as they change the model, the data stream or the random draws)
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_last", "train.num_threads",
                     "train.device", "train.precision", "train.init_from", "data.num_workers", "optim.", "ema.")


def micro_seed(seed: int, step: int, slot: int) -> int:
    """A 64-bit seed for the draws of micro-step `slot` of optimizer step `step`."""
    return int(np.random.SeedSequence([int(seed), int(step), int(slot)]).generate_state(1, np.uint64)[0])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_config(saved: TrainConfig, now: TrainConfig, where: str) -> list[str]:
    """Raise ConfigError when the configs differ in a key outside RESUME_MAY_CHANGE; return the
    allowed differences (for a notice)."""
    def resolved(c: TrainConfig) -> dict:  # the model as built, whether a field came from the preset or not
        return _flatten({**c.to_dict(), "model": c.nit_config().to_dict()})

    a, b = resolved(saved), resolved(now)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    allowed = [k for k in diff if any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)]
    bad = [k for k in diff if k not in allowed]
    if bad:
        lines = "; ".join(f"{k}: checkpoint {a.get(k, '(unset)')!r}, now {b.get(k, '(unset)')!r}" for k in bad)
        raise ConfigError(f"cannot resume from {where}: it was trained with a different configuration ({lines}). "
                          f"Resume with the checkpoint's config, or start a new run (init_from loads weights only)")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in allowed]


def _row_step(line: str) -> Optional[int]:
    """The step of a log.jsonl row; None for a blank or half-written one (a kill mid-write)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


def load_encoder(spec: Optional[str], nit_config):
    """The REPA encoder named by an import path 'package.module:factory' (factory(nit_config))."""
    if spec is None:
        return None
    mod, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"flow.repa_encoder={spec!r} cannot be imported: {type(e).__name__}: {e}") from None
    return factory(nit_config)


@dataclasses.dataclass
class _Pending:
    step: int
    epoch: int
    lr: float
    stats: torch.Tensor  # [5]: token sums of loss, mse, dir, proj, and the token count
    grad_norm: torch.Tensor


class Trainer:
    """Builds everything from a TrainConfig (raising before any step on bad input) and runs it.

    Use through ``nit_model.train.train``; ``run()`` returns when ``train.steps`` is reached.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str, dist: DistInfo, *, resume: Optional[str] = None,
                 encoder=None, progress: bool = True, callback: Optional[Callable[[dict], None]] = None,
                 overwrite: bool = False, force: bool = False):
        self.cfg, self.dist, self.progress, self.callback = cfg, dist, progress, callback
        self.overwrite = overwrite
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.log_path = os.path.join(self.out_dir, "log.jsonl")
        t = cfg.train
        self.nit_config = cfg.nit_config()
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.device = dist.device
        self.amp_dtype = self._amp_dtype()

        self.lock = None
        try:
            self._setup(resume, encoder, force)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (the kernel releases it too if the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, resume, encoder, force) -> None:
        cfg, dist, t = self.cfg, self.dist, self.cfg.train
        # 0. the memory a pack needs, from the config alone (nothing allocated yet)
        check_fits(training_estimate(self.nit_config, cfg.data.token_budget, device=self.device,
                                     processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                                     if self.device.type == "cpu" else 1),
                   device=self.device, force=force,
                   advice="lower data.token_budget (smaller packs; raise train.grad_accum to keep the tokens per "
                          "step), set model.gradient_checkpointing=true, or pass --force (force=True) to try anyway")

        # 1. the data: opened and checked against the model (read-only, before touching out_dir)
        ds = build_dataset(cfg)
        lengths = check_dataset(ds, cfg)
        self.stream = PackStream(ds, lengths, cfg, dist.rank, dist.world_size, pin_memory=self.device.type == "cuda")

        # 2. the run directory: locked by rank 0, debris of killed saves removed, the checkpoint to
        #    resume from chosen (damaged ones moved aside) and its configuration checked
        decision = None
        if dist.is_main:
            try:
                self.lock = RunLock(self.out_dir).acquire()
                ck.clean_debris(self.ckpt_root)
                decision = ("ok", self._choose_resume(resume))
            except (ConfigError, ck.CheckpointNotFound) as e:
                decision = ("error", type(e).__name__, str(e))
        decision = dist.broadcast_object(decision)
        if decision[0] == "error":
            raise (ck.CheckpointNotFound if decision[1] == "CheckpointNotFound" else
                   RunDirLocked if decision[1] == "RunDirLocked" else ConfigError)(decision[2])
        self.resume_path, self.resume_notes = decision[1], []
        if self.resume_path:
            saved = TrainConfig.from_yaml(os.path.join(self.resume_path, "config.yaml"))
            self.resume_notes = check_resume_config(saved, cfg, self.resume_path)
            self._resume_state = ck.load_pt(os.path.join(self.resume_path, "trainer.pt"))
            self._check_trainer_state(self._resume_state)

        # 3. the model, its initial weights, EMA, optimizer, objective
        self.encoder = encoder if encoder is not None else load_encoder(cfg.flow.repa_encoder, self.nit_config)
        self.use_repa = self.encoder is not None and cfg.flow.proj_weight > 0
        torch.manual_seed(t.seed)
        model = NiT(self.nit_config)
        if not self.use_repa:  # unused without a REPA term: frozen, so DDP finds no missing gradient
            model.projector.requires_grad_(False)
        if t.init_from and not self.resume_path:
            self._load_weights(model, self._init_file(t.init_from), f"train.init_from={t.init_from!r}")
        self.model = model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = EMA(self.model, cfg.ema.decay)
        o = cfg.optim
        self.peak_lr = cfg.lr(dist.world_size)
        # the fused kernel: one pass over the weights and both moments instead of about ten
        # multi-tensor passes (NiT-S on 1 CPU thread: 38 vs 146 ms a step); foreach elsewhere
        fused = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(self.trainable, lr=self.peak_lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay, fused=fused, foreach=None if fused else True)
        self.loss_fn = FlowMatchingLoss.for_config(self.nit_config, mu=cfg.flow.mu, sigma=cfg.flow.sigma, label_dropout=cfg.label_dropout,
                                        dir_weight=cfg.flow.dir_weight, proj_weight=cfg.flow.proj_weight,
                                        encoder=self.encoder if self.use_repa else None)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        if self.resume_path:
            self._load_resume()
        self.ddp = None
        if dist.enabled:
            # the model's buffers are constants (RoPE frequencies): no per-forward broadcast
            sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else {"broadcast_buffers": False})
            self.ddp = DDP(self.model, device_ids=None, gradient_as_bucket_view=True, **sync)
        self.fwd = self.ddp if self.ddp is not None else self.model  # what the loss calls
        if self.use_repa:
            self._check_encoder(ds)

    # ------------------------------------------------------------------ set-up helpers
    def _choose_resume(self, resume: Optional[str]) -> Optional[str]:
        """The checkpoint to resume from, or None to start afresh (rank 0, holding the lock).

        "auto" (the default): the newest undamaged checkpoint of out_dir when there is one and its
        configuration fits this one, None when there is none; overwrite=True: None.
        """
        mode = resume or "auto"
        if mode != "auto":
            own = os.path.abspath(os.fspath(mode)).startswith(self.out_dir + os.sep) or mode == "latest"
            return ck.resolve_checkpoint(mode, self.out_dir, quarantine=own)
        if self.overwrite:
            return None
        path = ck.newest_verified(self.ckpt_root, quarantine=True)
        if path is None:
            return None
        saved = TrainConfig.from_yaml(os.path.join(path, "config.yaml"))
        try:
            check_resume_config(saved, self.cfg, path)
        except ConfigError as e:
            raise ConfigError(f"{self.out_dir} holds a run with another configuration, so it is not resumed: {e}; "
                              f"or pass overwrite=True (--overwrite) to replace that run, or choose another out_dir "
                              f"(--out)") from None
        return path

    def _amp_dtype(self) -> Optional[torch.dtype]:
        """bf16 autocast dtype or None (fp32); "auto" is bf16 on CUDA devices that support it, fp32 on CPU."""
        from ..precision import PrecisionError, amp_dtype, check_precision, default_precision
        p = self.cfg.train.precision
        if p == "auto":
            p = default_precision(self.device) if self.device.type == "cuda" else "fp32"
        try:
            return amp_dtype(check_precision(p, self.device, where="train.precision"))
        except PrecisionError as e:
            raise ConfigError(str(e)) from None

    def _init_file(self, spec: str) -> str:
        if os.path.isdir(spec):
            path = os.path.join(spec, "ema.safetensors")
            if not os.path.isfile(path):
                raise ConfigError(f"train.init_from={spec!r} is a directory without ema.safetensors (not a checkpoint)")
            return path
        if not os.path.isfile(spec):
            raise ConfigError(f"train.init_from={spec!r} does not exist")
        return spec

    def _load_weights(self, model, path: str, what: str, target=None):
        try:
            sd = load_state_dict_file(path)
            check_state_dict(model, sd)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{what}: {path}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"{what}: {e}") from None
        if target is None:
            model.load_state_dict(sd, strict=True)
        else:
            target(sd)

    def _check_trainer_state(self, st) -> None:
        where = self.resume_path
        if not isinstance(st, dict) or st.get("format") != TRAINER_FORMAT:
            raise ConfigError(f"{where}/trainer.pt is not a {TRAINER_FORMAT} trainer state")
        if st["world_size"] != self.dist.world_size:
            raise ConfigError(f"cannot resume from {where}: it was written by {st['world_size']} process(es), this run has "
                              f"{self.dist.world_size}; the data stream is sharded per process, so resume with the same number")

    def _load_resume(self) -> None:
        path, st = self.resume_path, self._resume_state
        self._load_weights(self.model, os.path.join(path, "model.safetensors"), f"resume from {path}")
        ema_sd = {}
        self._load_weights(self.model, os.path.join(path, "ema.safetensors"), f"resume from {path} (EMA)",
                           target=ema_sd.update)
        self.ema.load_state_dict(ema_sd)
        opt_sd = ck.load_pt(os.path.join(path, "optimizer.pt"), map_location=self.device)
        try:
            self.opt.load_state_dict(opt_sd)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"resume from {path}: the optimizer state does not fit this model: {e}") from None
        o = self.cfg.optim
        for g in self.opt.param_groups:  # the config's hyper-parameters win over the saved ones
            g.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.step, self.tokens_seen = int(st["step"]), int(st["tokens"])
        self.elapsed_before = float(st["wall_time"])
        self.stream.load_state({"epoch": st["epoch"], "pos": st["pos"]})
        rng = st["rng"]
        ck.set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])

    def _check_encoder(self, ds) -> None:
        x, _ = ds[0]
        from ..data import collate_packed
        b = collate_packed([(x, 0)], self.nit_config.patch_size)
        packed = b.packed()
        with torch.no_grad():
            feats = self.encoder(b.x.to(self.device), packed.to(self.device))
        feats = feats if isinstance(feats, (list, tuple)) else [feats]
        want = (packed.total_tokens, self.nit_config.z_dim)
        for f in feats:
            if tuple(f.shape) != want:
                raise ConfigError(f"flow.repa_encoder returns features of shape {tuple(f.shape)} for a pack of "
                                  f"{packed.total_tokens} tokens; expected [N, model.z_dim] = {list(want)}")

    # ------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        """The rate of optimizer step `step` (0-based): linear warm-up, then the schedule."""
        o, total = self.cfg.optim, self.cfg.train.steps
        w = o.warmup_steps
        if w and step < w:
            return self.peak_lr * (step + 1) / w
        if o.schedule == "constant" or total <= w:
            return self.peak_lr
        frac = min(1.0, (step - w) / max(1, total - w))
        decay = 0.5 * (1.0 + math.cos(math.pi * frac)) if o.schedule == "cosine" else 1.0 - frac
        return self.peak_lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay)

    def _generator(self, step: int, slot: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(micro_seed(self.cfg.train.seed, step, slot))

    def train_step(self) -> _Pending:
        """One optimizer step over grad_accum packs per rank."""
        cfg, dist = self.cfg, self.dist
        accum, world = cfg.train.grad_accum, dist.world_size
        epoch = self.stream.epoch
        batches = [next(self.stream) for _ in range(accum)]
        n_local = [b.num_tokens for b in batches]
        n_step = dist.all_reduce_sum(torch.tensor(float(sum(n_local)), dtype=torch.float64, device=self.device))
        stats = torch.zeros(5, dtype=torch.float64, device=self.device)
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        for m, b in enumerate(batches):
            packed = b.packed(device="cpu").to(self.device)
            x, y = b.x.to(self.device, non_blocking=True), b.labels.to(self.device, non_blocking=True)
            gen = self._generator(self.step, m * world + dist.rank)
            sync = self.ddp.no_sync() if self.ddp is not None and m < accum - 1 else contextlib.nullcontext()
            with sync:
                with amp:
                    out = self.loss_fn(self.fwd, x, y, packed, generator=gen)
                weight = (n_local[m] * world / n_step).float()
                (out.loss.float() * weight).backward()
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            parts = [out.loss.detach(), out.mse, out.dir, out.proj]
            stats += n_local[m] * torch.stack([zero if v is None else v.detach().double() for v in parts] + [zero + 1])
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm, foreach=True)
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        return _Pending(self.step, epoch, lr, stats, grad_norm.detach())

    # ------------------------------------------------------------------ logging
    def _prepare_log(self) -> None:
        if not self.dist.is_main:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        self._write_config(os.path.join(self.out_dir, "config.yaml"))
        if self.resume_path:
            print(f"resuming from {self.resume_path} (step {self.step})"
                  + (f"; changed: {', '.join(self.resume_notes)}" if self.resume_notes else ""))
            self._set_aside_newer_checkpoints()
        if self.resume_path and os.path.isfile(self.log_path):  # drop rows of steps after the checkpoint
            with open(self.log_path) as f:
                rows = [line for line in f if _row_step(line) is not None and _row_step(line) <= self.step]
            atomic_write_text(self.log_path, "".join(rows))
        elif not self.resume_path:
            if os.path.exists(self.log_path):
                os.remove(self.log_path)
            if self.overwrite and os.path.isdir(self.ckpt_root):
                shutil.rmtree(self.ckpt_root)

    def _set_aside_newer_checkpoints(self) -> None:
        """Resuming this run from an older checkpoint starts a new timeline: its later checkpoints
        move to checkpoints/abandoned-<time>/ so that neither `latest` nor keep-last-N mix them in."""
        if os.path.dirname(os.path.abspath(self.resume_path)) != self.ckpt_root:
            return
        newer = [p for s, p in ck.list_checkpoints(self.ckpt_root) if s > self.step]
        if not newer:
            return
        aside = os.path.join(self.ckpt_root, f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside, exist_ok=True)
        for p in newer:
            os.rename(p, os.path.join(aside, os.path.basename(p)))
        print(f"resuming from step {self.step}: moved {len(newer)} later checkpoint(s) to {aside}")

    def _flush(self, pending: list, t_window: float) -> list[dict]:
        """Reduce the pending steps' statistics over ranks, log one row for the window."""
        if not pending:
            return []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        stats = self.dist.all_reduce_sum(torch.stack([p.stats for p in pending])).cpu().tolist()
        norms = torch.stack([p.grad_norm.float() for p in pending]).cpu().tolist()
        window_tokens = sum(s[4] for s in stats)
        self.tokens_seen += int(window_tokens)
        self.train_time += now - t_window
        for p, s in zip(pending, stats):
            loss = s[0] / s[4]
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {p.step}; the last checkpoint is "
                                         f"{ck._latest_in(self.ckpt_root) or 'none'} (lower optim.lr or check the data)")
            self.losses.append(loss)
            self.loss_steps.append(p.step)
        n = len(pending)
        mean = [sum(s[i] / s[4] for s in stats) / n for i in range(4)]
        row = {"step": pending[-1].step, "epoch": pending[-1].epoch, "steps": n, "loss": mean[0], "mse": mean[1],
               "dir": mean[2] if self.cfg.flow.dir_weight else None, "proj": mean[3] if self.use_repa else None,
               "lr": pending[-1].lr, "grad_norm": sum(norms) / n, "tokens": self.tokens_seen,
               "tokens_per_s": window_tokens / max(now - t_window, 1e-9),
               "wall_time": self.elapsed_before + now - self._t_start}
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        if self.callback is not None:
            self.callback(row)
        return [row]

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        rngs = self.dist.all_gather_object(ck.rng_state())
        st = self.stream.state()
        return {"format": TRAINER_FORMAT, "step": self.step, "epoch": st["epoch"], "pos": st["pos"],
                "world_size": self.dist.world_size, "tokens": self.tokens_seen,
                "wall_time": self.elapsed_before + time.perf_counter() - self._t_start, "rng": rngs,
                "sampler": {"seed": self.cfg.train.seed, "token_budget": self.cfg.data.token_budget,
                            "packs_per_epoch_per_rank": self.stream.packs_per_epoch}}

    def _write_config(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.cfg.to_yaml())

    def save(self) -> Optional[str]:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part)."""
        state = self.trainer_state()  # a collective: every rank calls it
        path = None
        if self.dist.is_main:
            meta = {CONFIG_KEY: json.dumps(self.nit_config.to_dict())}
            writers = [
                ("model.safetensors", lambda p: save_weights(self.model, p)),
                ("ema.safetensors", lambda p: save_weights(self.ema.state_dict(), p, metadata=meta)),
                ("optimizer.pt", lambda p: torch.save(self.opt.state_dict(), p)),
                ("trainer.pt", lambda p: torch.save(state, p)),
                ("config.yaml", self._write_config),
            ]
            path = ck.save_checkpoint(self.ckpt_root, self.step, writers, keep_last=self.cfg.train.keep_last)
        path = self.dist.broadcast_object(path)
        return path

    # ------------------------------------------------------------------ the loop
    def run(self):
        """Train until train.steps; returns (final checkpoint path, rows logged)."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        self.losses, self.loss_steps, self.rows, self.train_time = [], [], [], 0.0
        self._prepare_log()
        self._t_start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        bar = tqdm(total=t.steps, initial=min(self.step, t.steps), desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.dist.is_main))
        last_ckpt = self.resume_path
        pending, t_window = [], time.perf_counter()
        try:
            while self.step < t.steps:
                pending.append(self.train_step())
                bar.update(1)
                at_ckpt = self.step % t.ckpt_every == 0 or self.step == t.steps
                if self.step % t.log_every == 0 or at_ckpt:
                    for row in self._flush(pending, t_window):
                        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                    pending, t_window = [], time.perf_counter()
                if at_ckpt:
                    last_ckpt = self.save()
                    t_window = time.perf_counter()  # checkpoint time is not training throughput
        finally:
            bar.close()
        self.wall_time = time.perf_counter() - self._t_start
        self.tokens_this_run = self.tokens_seen - tokens_at_start
        return last_ckpt
