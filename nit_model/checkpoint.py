"""Former name of `nit_model.weights` (loading and saving model weights), kept so that existing
imports work: importing it gives that same module. New code imports nit_model.weights."""
import sys

from . import weights

sys.modules[__name__] = weights
