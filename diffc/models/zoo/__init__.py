"""The evaluation zoo: small models trained by this project that differ from the shipped digits
defaults in family, prediction type, sampler, size and data (see `specs.ZOO`), with a scorer per
data set. Their weights live outside the package, in the checkout's benchmarks/zoo (or $DIFFC_ZOO).

    from diffc.models import zoo
    zoo.available()                                  # names whose weights are present
    pipe = zoo.load("shapes-flux")
    prompts = zoo.prompts("shapes-flux", 8)
    images = pipe(prompts, generator=torch.Generator().manual_seed(0)).images
    zoo.load_scorer("shapes-flux").accuracy(images, prompts)
"""

import os
from pathlib import Path

from .data import DATASETS, Dataset, dataset
from .encoder import AttributeEncoder
from .pipeline import FAMILIES, ZooPipeline
from .scorer import AttributeClassifier, ZooScorer
from .specs import ZOO, ZooSpec, spec

ROOT_VARIABLE = "DIFFC_ZOO"


def default_root() -> Path:
    """$DIFFC_ZOO, else benchmarks/zoo of the checkout this package runs from."""
    if os.environ.get(ROOT_VARIABLE):
        return Path(os.environ[ROOT_VARIABLE])
    return Path(__file__).resolve().parents[3] / "benchmarks" / "zoo"


def _complete(folder: Path) -> bool:
    return (folder / "model_index.json").exists()


def available(root: Path | None = None) -> list[str]:
    root = Path(root or default_root())
    return [name for name in ZOO if _complete(root / name)]


def load(name: str, root: Path | None = None) -> ZooPipeline:
    """The named zoo pipeline from local weights (nothing is downloaded)."""
    zoo_spec = spec(name)
    folder = Path(root or default_root()) / name
    if not _complete(folder):
        raise ValueError(f"zoo model {name!r} has no weights in {folder}; set ${ROOT_VARIABLE} to the zoo folder or "
                         f"train it: python -m diffc.models.zoo.train --model {name}")
    pipe = ZooPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.family == zoo_spec.family
    return pipe


def load_scorer(name: str, root: Path | None = None) -> ZooScorer:
    """The scorer of the named zoo model's data set."""
    data_name = spec(name).data
    folder = Path(root or default_root()) / "scorers" / data_name
    if not (folder / "config.json").exists():
        raise ValueError(f"no scorer weights for data set {data_name!r} in {folder}; train them: "
                         f"python -m diffc.models.zoo.train --model scorer-{data_name}")
    classifier = AttributeClassifier.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    return ZooScorer(classifier, dataset(data_name))


def prompts(name: str, count: int, offset: int = 0) -> list[str]:
    """`count` prompts of the model's data set, cycling through every attribute combination from
    `offset` in a fixed shuffled order, so consecutive calls cover the set evenly."""
    import random

    data = spec(name).dataset
    combos = data.all_conditions()
    random.Random(0).shuffle(combos)
    return [data.prompt(combos[(offset + index) % len(combos)]) for index in range(count)]


__all__ = [
    "DATASETS", "FAMILIES", "ROOT_VARIABLE", "ZOO", "AttributeClassifier", "AttributeEncoder", "Dataset",
    "ZooPipeline", "ZooScorer", "ZooSpec", "available", "dataset", "default_root", "load", "load_scorer",
    "prompts", "spec",
]
