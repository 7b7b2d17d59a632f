"""Running compiled plans: OptimizedModel, step tracking, artifacts."""
from .artifact import load_plan, read_manifest, save_artifact
from .model import OptimizedModel
from .stepping import StepTracker

__all__ = ["OptimizedModel", "StepTracker", "load_plan", "read_manifest", "save_artifact"]
