"""Running compiled plans: OptimizedModel, step tracking, artifacts."""
from .artifact import load_plan, read_manifest, save_artifact
from .model import OptimizedModel

__all__ = ["OptimizedModel", "load_plan", "read_manifest", "save_artifact"]
