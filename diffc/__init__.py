"""diffc: a compiler for diffusion denoisers.

    fast = diffc.optimize(pipe, target="torch")   # or pipe.unet / pipe.transformer
    pipe.unet = fast
    fast.save("out/"); fast = diffc.load("out/")
    again = diffc.replay("out/", pipe.unet)       # the recorded passes, re-run on a model
"""
from .api import load, optimize, replay
from .errors import (ArtifactError, CaptureError, DiffcError, InputError, LintError, PassError, TargetError)
from .ir import capture
from .runtime import OptimizedModel

__version__ = "0.1.0"

__all__ = [
    "optimize", "replay", "load", "capture", "OptimizedModel", "DiffcError", "CaptureError", "LintError", "PassError",
    "TargetError", "InputError", "ArtifactError", "__version__",
]
