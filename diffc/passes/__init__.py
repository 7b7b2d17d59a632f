"""Passes over the IR and the PassManager that runs pipelines of them."""
from .base import (CONDITIONS, PASSES, PRESETS, Condition, Pass, PassConfig, PassContext, PassManager, PassResult,
                   available_passes, build_pipeline, register_condition, register_pass)

__all__ = [
    "CONDITIONS", "PASSES", "PRESETS", "Condition", "Pass", "PassConfig", "PassContext", "PassManager", "PassResult",
    "available_passes", "build_pipeline", "register_condition", "register_pass",
]

from . import cache  # noqa: E402,F401  registers the cache pass
from . import quant  # noqa: E402,F401  registers the quant pass
from . import prune  # noqa: E402,F401  registers the prune pass
from . import moe  # noqa: E402,F401  registers the moe pass
