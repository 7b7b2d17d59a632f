"""A classifier per zoo data set that reads each attribute of a sample back (shape, colour,
pattern, direction...), so generated samples can be scored: a sample counts as correct when every
attribute its prompt asked for is recognised."""

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .data import Dataset, dataset


class AttributeClassifier(ModelMixin, ConfigMixin):
    """Small CNN with one head per attribute; a video's frames are stacked as channels so motion is
    visible to it. Input in [-1, 1]: (N, 3, S, S) or (N, 3, F, S, S)."""

    @register_to_config
    def __init__(self, num_classes: tuple[int, ...] = (4,), num_frames: int = 0, width: int = 32):
        super().__init__()
        channels = 3 * max(1, num_frames)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(8 * width, count) for count in num_classes)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() == 5:
            images = images.flatten(1, 2)
        features = self.features(images)
        return [head(features) for head in self.heads]


class ZooScorer:
    """Scores samples of one zoo data set against the prompts that asked for them."""

    def __init__(self, classifier: AttributeClassifier, data: Dataset):
        self.classifier = classifier.eval()
        self.data = data

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """Attribute indices read from samples in [0, 1], as a ZooPipeline returns them ("np" or "pt")."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images).movedim(-1, 1)
        logits = self.classifier(images.float() * 2.0 - 1.0)
        return torch.stack([head.argmax(1) for head in logits], dim=1)

    def accuracy(self, images, prompts: list[str]) -> float:
        """Fraction of samples whose every attribute matches its prompt (in the data set's format)."""
        return self._matches(images, prompts).all(dim=1).float().mean().item()

    def attribute_accuracy(self, images, prompts: list[str]) -> dict[str, float]:
        """Per attribute, the fraction of samples that show the prompt's value of it."""
        shares = self._matches(images, prompts).float().mean(dim=0).tolist()
        return {name: share for (name, _), share in zip(self.data.attributes, shares)}

    def _matches(self, images, prompts: list[str]) -> torch.Tensor:
        wanted = torch.tensor([self.data.parse(prompt) for prompt in prompts])
        return self.predict(images) == wanted


def build_classifier(data_name: str) -> AttributeClassifier:
    data = dataset(data_name)
    return AttributeClassifier(num_classes=data.num_classes, num_frames=data.num_frames)
