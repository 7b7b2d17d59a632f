"""diffc: a compiler for diffusion denoisers.

    fast = diffc.optimize(pipe, target="torch")   # or pipe.unet / pipe.transformer
    pipe.unet = fast
    fast.save("out/"); fast = diffc.load("out/")
"""
from .api import load, optimize
from .errors import (ArtifactError, CaptureError, DiffcError, InputError, LintError, PassError, TargetError)
from .ir import capture
from .runtime import OptimizedModel

__version__ = "0.1.0"

__all__ = [
    "optimize", "load", "capture", "OptimizedModel", "DiffcError", "CaptureError", "LintError", "PassError",
    "TargetError", "InputError", "ArtifactError", "__version__",
]
