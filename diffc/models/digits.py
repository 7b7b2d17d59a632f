"""The scikit-learn digits data set (bundled, offline) as 16x16 images in [-1, 1]."""

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
# 20% of the 1797 images are held out; the split is fixed by this seed so every
# model and the scorer see the same test images.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def load_digits_16(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels): images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) int64.

    split is "train", "test" or "all".
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if split == "all":
        return images, labels

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    num_test = int(round(len(labels) * _TEST_FRACTION))
    indices = order[:num_test] if split == "test" else order[num_test:]
    return images[indices], labels[indices]


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, filling with background (-1)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets.tolist())]
    )
