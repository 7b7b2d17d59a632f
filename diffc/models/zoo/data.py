"""Procedural image sets for the evaluation zoo: shapes, textures, two-object compositions and
moving shapes (video), each drawn from a seed and conditioned by a short attribute prompt.

Every sample has a prompt ("large red circle", "blue checker", "red circle left of square",
"triangle moving up") and its attribute indices (one per attribute the scorer classifies).
Images are float32 in [-1, 1]: (N, 3, S, S), or (N, 3, F, S, S) for video.
"""

from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIZES = ("small", "large")
PATTERNS = ("stripes", "bars", "checker", "dots")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (0.08, 0.08, 0.1)


@dataclass(frozen=True)
class Dataset:
    """One procedural set: what its prompts say and what its scorer classifies."""

    name: str
    image_size: int
    attributes: tuple[tuple[str, tuple[str, ...]], ...]  # (attribute, its values), in prompt order
    num_frames: int = 0  # 0: images; otherwise a video of this many frames

    @property
    def num_classes(self) -> tuple[int, ...]:
        return tuple(len(values) for _, values in self.attributes)

    def prompt(self, indices: list[int]) -> str:
        words = {name: values[index] for (name, values), index in zip(self.attributes, indices)}
        return PROMPT_FORMATS[self.name].format(**words)

    def parse(self, prompt: str) -> list[int]:
        """Attribute indices of a prompt written in this set's format (the inverse of `prompt`)."""
        template, words = PROMPT_FORMATS[self.name].split(), prompt.split()
        if len(words) != len(template):
            raise ValueError(f"prompt {prompt!r} does not follow the {self.name} format {PROMPT_FORMATS[self.name]!r}")
        by_slot = {slot[1:-1]: word for slot, word in zip(template, words) if slot.startswith("{")}
        try:
            return [values.index(by_slot[name]) for name, values in self.attributes]
        except ValueError as error:
            raise ValueError(f"prompt {prompt!r} names a value outside the {self.name} set: {error}") from None

    def vocabulary(self) -> list[str]:
        words = set(PROMPT_FORMATS[self.name].format(**{name: "" for name, _ in self.attributes}).split())
        for _, values in self.attributes:
            words.update(values)
        return sorted(words)

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(images, attribute indices (count, num attributes), prompts)."""
        labels = torch.stack(
            [torch.randint(0, n, (count,), generator=generator) for n in self.num_classes], dim=1
        )
        images = torch.stack([DRAW[self.name](self, row.tolist(), generator) for row in labels])
        return images * 2.0 - 1.0, labels, [self.prompt(row.tolist()) for row in labels]

    def all_conditions(self) -> list[list[int]]:
        """Every attribute combination, in a fixed order."""
        combos = [[]]
        for n in self.num_classes:
            combos = [combo + [index] for combo in combos for index in range(n)]
        return combos


PROMPT_FORMATS = {
    "shapes": "{size} {colour} {shape}",
    "textures": "{colour} {pattern}",
    "compositions": "{colour} {left} left of {right}",
    "motion": "{shape} moving {direction}",
}


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coordinates = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.meshgrid(coordinates, coordinates, indexing="ij")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def shape_mask(shape: str, size: int, centre: tuple[float, float], radius: float) -> torch.Tensor:
    """Soft (anti-aliased) mask in [0, 1] of one shape on a size x size canvas."""
    y, x = _grid(size)
    dy, dx = y - centre[0], x - centre[1]
    if shape == "circle":
        distance = (dy**2 + dx**2).sqrt() - radius
    elif shape == "square":
        distance = torch.maximum(dy.abs(), dx.abs()) - radius * 0.85
    elif shape == "triangle":
        # apex up at (-r, 0), base corners at (0.8 r, +-r): the largest of the three edges' signed distances
        base = dy - 0.8 * radius
        slope = 1.8
        sides = (dx.abs() - (dy + radius) / slope) * slope / (1.0 + slope**2) ** 0.5
        distance = torch.maximum(base, sides)
    elif shape == "cross":
        arm = radius * 0.35
        horizontal = torch.maximum(dy.abs() - arm, dx.abs() - radius)
        vertical = torch.maximum(dx.abs() - arm, dy.abs() - radius)
        distance = torch.minimum(horizontal, vertical)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return (0.5 - distance).clamp(0.0, 1.0)


def _paint(canvas: torch.Tensor, mask: torch.Tensor, colour: tuple[float, float, float]) -> torch.Tensor:
    rgb = torch.tensor(colour).view(3, 1, 1)
    return canvas * (1.0 - mask) + rgb * mask


def _background(size: int, generator: torch.Generator) -> torch.Tensor:
    noise = 0.03 * torch.randn((1, size, size), generator=generator)
    return (torch.tensor(BACKGROUND).view(3, 1, 1) + noise).expand(3, size, size).clamp(0.0, 1.0)


def _draw_shapes(dataset: Dataset, indices: list[int], generator: torch.Generator) -> torch.Tensor:
    size_index, colour_index, shape_index = indices
    size = dataset.image_size
    radius = (_uniform(generator, 2.6, 3.4) if SIZES[size_index] == "small" else _uniform(generator, 5.0, 6.2)) \
        * size / 16
    margin = radius + 1.0
    centre = (_uniform(generator, margin, size - margin), _uniform(generator, margin, size - margin))
    mask = shape_mask(SHAPES[shape_index], size, centre, radius)
    return _paint(_background(size, generator), mask, list(COLOURS.values())[colour_index])


def _draw_textures(dataset: Dataset, indices: list[int], generator: torch.Generator) -> torch.Tensor:
    colour_index, pattern_index = indices
    size = dataset.image_size
    y, x = _grid(size)
    period = _uniform(generator, 3.5, 5.5) * size / 16
    phase_y, phase_x = _uniform(generator, 0, period), _uniform(generator, 0, period)
    wave_y = torch.sin(2 * torch.pi * (y + phase_y) / period)
    wave_x = torch.sin(2 * torch.pi * (x + phase_x) / period)
    pattern = PATTERNS[pattern_index]
    if pattern == "stripes":
        value = wave_y
    elif pattern == "bars":
        value = wave_x
    elif pattern == "checker":
        value = wave_y * wave_x * 2.0
    else:
        value = (wave_y + wave_x) - 1.0
    mask = (value * 2.0 + 0.5).clamp(0.0, 1.0)
    return _paint(_background(size, generator), mask, list(COLOURS.values())[colour_index])


def _draw_compositions(dataset: Dataset, indices: list[int], generator: torch.Generator) -> torch.Tensor:
    colour_index, left_index, right_index = indices
    size = dataset.image_size
    canvas = _background(size, generator)
    colour = list(COLOURS.values())[colour_index]
    radius = _uniform(generator, 2.6, 3.2) * size / 16
    for shape_index, column in ((left_index, size * 0.27), (right_index, size * 0.73)):
        centre = (_uniform(generator, size * 0.3, size * 0.7), column + _uniform(generator, -0.8, 0.8))
        canvas = _paint(canvas, shape_mask(SHAPES[shape_index], size, centre, radius), colour)
    return canvas


def _draw_motion(dataset: Dataset, indices: list[int], generator: torch.Generator) -> torch.Tensor:
    shape_index, direction_index = indices
    size, frames = dataset.image_size, dataset.num_frames
    radius = _uniform(generator, 2.8, 3.6) * size / 16
    speed = _uniform(generator, 1.6, 2.2) * size / 16
    travel = speed * (frames - 1)
    direction = DIRECTIONS[direction_index]
    step = {"left": (0.0, -speed), "right": (0.0, speed), "up": (-speed, 0.0), "down": (speed, 0.0)}[direction]
    low, high = radius + 1.0, size - radius - 1.0
    start = []
    for axis_step in step:
        if axis_step > 0:
            start.append(_uniform(generator, low, high - travel))
        elif axis_step < 0:
            start.append(_uniform(generator, low + travel, high))
        else:
            start.append(_uniform(generator, low, high))
    colour = list(COLOURS.values())[int(torch.randint(0, len(COLOURS), (), generator=generator))]
    background = _background(size, generator)
    video = [
        _paint(background, shape_mask(SHAPES[shape_index], size,
                                       (start[0] + step[0] * frame, start[1] + step[1] * frame), radius), colour)
        for frame in range(frames)
    ]
    return torch.stack(video, dim=1)


DRAW = {"shapes": _draw_shapes, "textures": _draw_textures, "compositions": _draw_compositions,
        "motion": _draw_motion}

DATASETS = {
    "shapes": Dataset("shapes", 16, (("size", SIZES), ("colour", tuple(COLOURS)), ("shape", SHAPES))),
    "textures": Dataset("textures", 16, (("colour", tuple(COLOURS)), ("pattern", PATTERNS))),
    "textures-32": Dataset("textures", 32, (("colour", tuple(COLOURS)), ("pattern", PATTERNS))),
    "compositions": Dataset("compositions", 16, (("colour", tuple(COLOURS)), ("left", SHAPES), ("right", SHAPES))),
    "motion": Dataset("motion", 16, (("shape", SHAPES), ("direction", DIRECTIONS)), num_frames=4),
}


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown zoo dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[name]
