"""Training machinery behind ``nit_model.train``: config tree, data stream, EMA, checkpoints, DDP, loop."""
from .checkpointing import CheckpointNotFound, resolve_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .ema import EMA

__all__ = ["TrainConfig", "ConfigError", "EMA", "CheckpointNotFound", "resolve_checkpoint", "save_checkpoint"]
