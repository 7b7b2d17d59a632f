"""The IR: capture a denoiser into a DiffusionGraph, inspect its blocks, lint it, export it."""
from .blocks import BLOCK_KINDS, Block, Residual
from .capture import capture, find_denoiser
from .graph import CONDITIONING, LATENT, TIMESTEP, DiffusionGraph, Signature, TensorInput, TensorOutput
from .lint import lint
from .stepping import StepTracker
from .plan import CompiledPlan, Plan, Segment, Variant
from .step_plan import Region, Schedule, StepPlan

__all__ = [
    "BLOCK_KINDS", "Block", "Residual", "capture", "CONDITIONING", "LATENT", "TIMESTEP", "DiffusionGraph",
    "Signature", "TensorInput", "TensorOutput", "lint", "CompiledPlan", "Plan", "Schedule", "Segment", "Variant", "StepTracker",
    "find_denoiser", "Region", "StepPlan",
]
