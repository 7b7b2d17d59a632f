"""Sample-quality scoring: a small CNN digit classifier trained on the digits train split.

`DigitScorer.accuracy` tells whether generated digits are recognisable as the requested
class; `DigitScorer.fid` is the Fréchet distance between classifier features of generated
images and of the real test images (an FID with this classifier in place of Inception).
"""

import argparse
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .digits import NUM_CLASSES, load_digits_16


class DigitClassifier(ModelMixin, ConfigMixin):
    """Three conv layers and a feature layer; input (N, 1, 16, 16) in [-1, 1]."""

    @register_to_config
    def __init__(self, channels: int = 32, feature_dim: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(2 * channels * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # Near-singular product (few samples, many dims): regularise as in the reference FID code.
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # sqrtm returns tiny imaginary parts from numerical error; the true root is real.
    covmean = np.real(covmean)
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    return float(distance)


class DigitScorer:
    """Scores images in the pipelines' "np" output format: (N, 16, 16, 1) floats in [0, 1]."""

    def __init__(self, classifier: DigitClassifier):
        self.classifier = classifier.eval()
        self._reference_features: dict[str, np.ndarray] = {}

    def _to_model_input(self, images_np: np.ndarray) -> torch.Tensor:
        images = np.asarray(images_np, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 1:
            raise ValueError(f"expected images of shape (N, H, W, 1) in [0, 1], got {images.shape}")
        return torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0

    @torch.no_grad()
    def predict(self, images_np: np.ndarray) -> np.ndarray:
        return self.classifier(self._to_model_input(images_np)).argmax(dim=1).numpy()

    def accuracy(self, images_np: np.ndarray, labels) -> float:
        labels = np.asarray(labels)
        if len(labels) != len(images_np):
            raise ValueError(f"got {len(images_np)} images but {len(labels)} labels")
        return float((self.predict(images_np) == labels).mean())

    @torch.no_grad()
    def features(self, images_np: np.ndarray) -> np.ndarray:
        return self.classifier.features(self._to_model_input(images_np)).numpy().astype(np.float64)

    def fid(self, images_np: np.ndarray, reference: str = "test") -> float:
        if reference not in self._reference_features:
            real_images, _ = load_digits_16(reference)
            self._reference_features[reference] = self.features(pipeline_format(real_images))
        return frechet_distance(self.features(images_np), self._reference_features[reference])


def pipeline_format(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H, W, 1) numpy in [0, 1], the pipelines' "np" output."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


def evaluate_pipeline(pipe, scorer: DigitScorer, samples_per_class: int, num_inference_steps: int, seed: int = 0):
    """Sample every class equally and return (accuracy, fid)."""
    labels = [label for label in range(NUM_CLASSES) for _ in range(samples_per_class)]
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        class_labels=labels, num_inference_steps=num_inference_steps, generator=generator, output_type="np"
    ).images
    return scorer.accuracy(images, labels), scorer.fid(images)


def main() -> None:
    from . import load, load_scorer

    parser = argparse.ArgumentParser(description="Score a shipped model's samples with the digit classifier.")
    parser.add_argument("model", help="model name, e.g. digits-unet, or 'classifier' for the scorer's test accuracy")
    parser.add_argument("--samples-per-class", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: shipped weights)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scorer = load_scorer()
    if args.model == "classifier":
        images, labels = load_digits_16("test")
        print(f"classifier test accuracy: {scorer.accuracy(pipeline_format(images), labels.numpy()):.4f}")
        return
    accuracy, fid = evaluate_pipeline(load(args.model, weights_dir=args.weights), scorer, args.samples_per_class, args.steps)
    print(f"{args.model}: {args.steps} steps, accuracy {accuracy:.4f}, FID {fid:.3f}")


if __name__ == "__main__":
    main()
