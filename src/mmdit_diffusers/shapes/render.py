"""Draw Shapes scenes: flat-filled, non-overlapping objects on a white 64x64 canvas, no antialiasing."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    MAX_OBJECT_SIZE,
    MIN_OBJECT_SIZE,
    ObjectKind,
    Scene,
    relation_holds,
    sample_scene,
)

# Wider than "no overlap" requires: a generator that places objects a few pixels off then rarely merges two
# of them into one blob or cuts one at the edge (4 px and no margin: half the counting failures were merges).
MIN_GAP = 8  # white pixels kept between any two bounding boxes
MARGIN = 2  # white pixels kept between any bounding box and the image edge
_TRIES_PER_OBJECT = 50
_TRIES_PER_LAYOUT = 1000


@dataclass(frozen=True)
class Placement:
    """An object drawn in the square box [x0, x0 + size) x [y0, y0 + size)."""

    kind: ObjectKind
    x0: int
    y0: int
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)

    def is_clear_of(self, other: Placement) -> bool:
        return (
            self.x0 + self.size + MIN_GAP <= other.x0
            or other.x0 + other.size + MIN_GAP <= self.x0
            or self.y0 + self.size + MIN_GAP <= other.y0
            or other.y0 + other.size + MIN_GAP <= self.y0
        )


@functools.lru_cache(maxsize=1024)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Read-only boolean (height, width) mask of a shape filling its box; every row and column is touched.

    A pixel belongs to the shape when its centre does. The triangle (apex at the top centre, base
    on the bottom row) is widened by half a pixel so that its apex row is never empty.
    """
    y, x = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = ((x - width / 2) / width) ** 2 + ((y - height / 2) / height) ** 2 <= 0.25
    elif shape == "triangle":
        mask = np.abs(x - width / 2) <= (y / height) * (width / 2) + 0.5
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.flags.writeable = False
    return mask


def _random_placement(kind: ObjectKind, rng: np.random.Generator) -> Placement:
    size = int(rng.integers(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE + 1))
    x0, y0 = rng.integers(MARGIN, IMAGE_SIZE - MARGIN - size + 1, size=2)
    return Placement(kind, int(x0), int(y0), size)


def _is_unambiguous(relation: str, a: Placement, b: Placement) -> bool:
    """The relation holds and its axis dominates, so the image does not also read as another relation."""
    dx = abs(a.centre[0] - b.centre[0])
    dy = abs(a.centre[1] - b.centre[1])
    dominant = dx > dy if relation in ("left of", "right of") else dy > dx
    return dominant and relation_holds(relation, a.centre, b.centre)


def layout_scene(scene: Scene, rng: np.random.Generator) -> list[Placement]:
    """Random non-overlapping placements for the scene's objects, in the order of scene.objects."""
    for _ in range(_TRIES_PER_LAYOUT):
        placements: list[Placement] = []
        for kind in scene.objects:
            for _ in range(_TRIES_PER_OBJECT):
                candidate = _random_placement(kind, rng)
                if all(candidate.is_clear_of(other) for other in placements):
                    placements.append(candidate)
                    break
            else:
                break
        else:
            if scene.relation is None or _is_unambiguous(scene.relation, *placements):
                return placements
    raise RuntimeError(f"could not lay out {scene.caption!r}")


def draw(placements: list[Placement]) -> np.ndarray:
    """A (64, 64, 3) uint8 image of the placements."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for p in placements:
        box = image[p.y0 : p.y0 + p.size, p.x0 : p.x0 + p.size]
        box[shape_mask(p.kind.shape, p.size, p.size)] = COLOURS[p.kind.colour]
    return image


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(draw(layout_scene(scene, rng)))


def sample_example(
    rng: np.random.Generator,
    category: str | None = None,
    allow_heldout: bool = False,
    category_weights: dict[str, float] | None = None,
) -> tuple[Image.Image, str]:
    """A random (image, caption) pair; see world.sample_scene for the arguments."""
    scene = sample_scene(rng, category, allow_heldout, category_weights)
    return render_scene(scene, rng), scene.caption
