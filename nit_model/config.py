"""Former name of `nit_model.model_config` (NiTConfig and its presets), kept so that existing imports
work: importing it gives that same module. New code imports nit_model.model_config."""
import sys

from . import model_config

sys.modules[__name__] = model_config
