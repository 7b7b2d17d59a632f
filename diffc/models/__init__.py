"""Small diffusion models trained by this project on the scikit-learn digits, shipped in the package.

    from diffc import models
    models.available()                      # ["digits-unet", "digits-dit"]
    pipe = models.load("digits-unet")
    images = pipe(class_labels=[0, 3, 5, 7], generator=torch.Generator().manual_seed(0)).images
    scorer = models.load_scorer()
    scorer.accuracy(images, [0, 3, 5, 7])
"""

from pathlib import Path

from diffusers import (
    DDIMScheduler,
    ModelMixin,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)

from .components import ClassTokenEmbedding
from .pipelines import DigitsDiTPipeline, DigitsUNetPipeline
from .quality import DigitClassifier, DigitScorer

WEIGHTS_DIR = Path(__file__).parent / "weights"
SCORER_NAME = "classifier"

# name -> (pipeline class, {component name: class with from_pretrained}); each component
# is stored in WEIGHTS_DIR/<name>/<component>/ as a JSON config (+ safetensors weights).
PIPELINE_SPECS = {
    "digits-unet": (
        DigitsUNetPipeline,
        {"unet": UNet2DConditionModel, "class_embedding": ClassTokenEmbedding, "scheduler": DDIMScheduler},
    ),
    "digits-dit": (
        DigitsDiTPipeline,
        {"transformer": DiTTransformer2DModel, "scheduler": FlowMatchEulerDiscreteScheduler},
    ),
}


def _from_pretrained(component_class, folder: Path):
    """Load one component from a local folder, never from the network."""
    options = {"local_files_only": True}
    if issubclass(component_class, ModelMixin):
        # The models are tiny; this avoids needing `accelerate` (and its warning).
        options["low_cpu_mem_usage"] = False
    return component_class.from_pretrained(folder, **options)


def _is_complete(folder: Path, components) -> bool:
    return all(any((folder / component).glob("*.json")) for component in components)


def available(weights_dir: Path | None = None) -> list[str]:
    """Names of the models whose weights are present."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    return [name for name, (_, components) in PIPELINE_SPECS.items() if _is_complete(weights_dir / name, components)]


def load(name: str, device: str = "cpu", weights_dir: Path | None = None):
    """Build the named pipeline from local weights (nothing is downloaded)."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    names = available(weights_dir)
    if name not in names:
        raise ValueError(f"unknown or missing model {name!r}; available models: {names}")
    pipeline_class, component_classes = PIPELINE_SPECS[name]
    components = {
        component: _from_pretrained(component_class, weights_dir / name / component)
        for component, component_class in component_classes.items()
    }
    return pipeline_class(**components).to(device)


def save_pipeline(pipe, folder: Path) -> None:
    """Write each pipeline component to folder/<component>/ in the layout `load` reads."""
    for component_name, component in pipe.components.items():
        component.save_pretrained(Path(folder) / component_name)


def load_scorer(weights_dir: Path | None = None) -> DigitScorer:
    """The digit classifier used to score samples (accuracy, features, FID)."""
    folder = Path(weights_dir or WEIGHTS_DIR) / SCORER_NAME
    if not (folder / "config.json").exists():
        raise ValueError(f"scorer weights not found in {folder}; train them with python -m diffc.models.train --model classifier")
    return DigitScorer(_from_pretrained(DigitClassifier, folder))


__all__ = [
    "available",
    "load",
    "load_scorer",
    "save_pipeline",
    "ClassTokenEmbedding",
    "DigitClassifier",
    "DigitScorer",
    "DigitsDiTPipeline",
    "DigitsUNetPipeline",
]
