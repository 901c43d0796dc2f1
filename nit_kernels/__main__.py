"""python -m nit_kernels: print which backends are usable here and why not."""
import torch

from . import __version__, backends_report

print(f"nit-kernels {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
print(backends_report())
