"""Synthetic scenes of solid shapes on a light background, with exact per-pixel masks.

They are the whole world of the small demo model: simple enough to train on a CPU,
rich enough to exercise captions, detection, segmentation and questions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
COLOUR_JITTER = 20
BACKGROUND_RANGE = (180, 255)
MAX_NOISE_SIGMA = 8.0
SIDE_RANGE = (40, 110)
MAX_OBJECTS = 3
PLACEMENT_TRIES = 1000

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels; x2 and y2 exclusive


@dataclasses.dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    box: Box
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)  # bool [H, W], True on the object

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value: scenes compare by identity
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    objects: tuple[SceneObject, ...]  # left to right by box centre


def shape_mask(kind: str, box: Box, size: int = IMAGE_SIZE) -> np.ndarray:
    """Rasterises one solid shape (no anti-aliasing) filling `box` exactly."""
    if kind not in KINDS:
        raise ValueError(f"unknown shape kind {kind!r}; accepted: {', '.join(KINDS)}")
    x1, y1, x2, y2 = box
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    corners = (x1, y1, x2 - 1, y2 - 1)  # Pillow's boxes include their last pixel
    if kind == "circle":
        draw.ellipse(corners, fill=1)
    elif kind == "square":
        draw.rectangle(corners, fill=1)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=1)
    return np.array(canvas, dtype=bool)


def boxes_overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _check_placements(placements: Sequence[tuple[str, str, Box]], size: int) -> None:
    """Raises ValueError when hand-given placements break the scene rules."""
    if not 1 <= len(placements) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(placements)}")
    seen = set()
    for index, (kind, colour, box) in enumerate(placements):
        if kind not in KINDS:
            raise ValueError(f"unknown shape kind {kind!r}; accepted: {', '.join(KINDS)}")
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; accepted: {', '.join(COLOURS)}")
        if (colour, kind) in seen:
            raise ValueError(f"{colour} {kind} appears twice; each (colour, kind) pair at most once")
        seen.add((colour, kind))
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size):
            raise ValueError(f"box {box} must lie inside the {size}x{size} image as x1<x2, y1<y2")
        for other in placements[:index]:
            if boxes_overlap(box, other[2]):
                raise ValueError(f"boxes {other[2]} and {box} overlap; objects must not overlap")


def compose_scene(
    placements: Sequence[tuple[str, str, Box]],
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
) -> Scene:
    """Paints (kind, colour, box) placements over a noisy light background.

    The colours, background and noise come from `rng`; the layout is given, so tests
    can build scenes whose answers they know.
    """
    _check_placements(placements, size)
    background = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1], size=3, endpoint=True)
    sigma = rng.uniform(0.0, MAX_NOISE_SIGMA)
    canvas = background + sigma * rng.standard_normal((size, size, 3), dtype=np.float32)
    objects = []
    for kind, colour, box in placements:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER, size=3, endpoint=True)
        mask = shape_mask(kind, box, size)
        canvas[mask] = np.add(COLOURS[colour], jitter)
        objects.append(SceneObject(kind, colour, tuple(int(v) for v in box), mask))
    objects.sort(key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, objects=tuple(objects))


def _random_box(kind: str, rng: np.random.Generator, size: int) -> Box:
    """Circles and squares get square boxes; triangles any width and height."""
    width = int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1], endpoint=True))
    height = width if kind != "triangle" else int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1], endpoint=True))
    x1 = int(rng.integers(0, size - width, endpoint=True))
    y1 = int(rng.integers(0, size - height, endpoint=True))
    return (x1, y1, x1 + width, y1 + height)


def random_placements(rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[tuple[str, str, Box]]:
    """Draws 1-3 distinct (colour, kind) pairs and places them without overlap.

    Each object gets fresh (side, position) draws until one fits; small sides almost
    always fit, so the rare crowded scene simply gets a smaller last object.
    """
    pairs = [(colour, kind) for colour in COLOURS for kind in KINDS]
    count = int(rng.integers(1, MAX_OBJECTS, endpoint=True))
    chosen = rng.choice(len(pairs), size=count, replace=False)
    placements: list[tuple[str, str, Box]] = []
    for pair_index in chosen:
        colour, kind = pairs[pair_index]
        for _ in range(PLACEMENT_TRIES):
            box = _random_box(kind, rng, size)
            if not any(boxes_overlap(box, placed[2]) for placed in placements):
                placements.append((kind, colour, box))
                break
        else:
            raise RuntimeError(f"could not place object {len(placements) + 1} in {PLACEMENT_TRIES} tries")
    return placements


def random_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    return compose_scene(random_placements(rng, size), rng, size)


def scene_for(seed: int, index: int) -> Scene:
    """Scene number `index` of the series `seed`, reproducible on its own."""
    return random_scene(np.random.default_rng([seed, index]))
