"""Score images against Shapes captions: a GenEval-style object detector for the Shapes world.

Detection, tolerant of the blur and noise of a diffusion model's samples:

1. each pixel takes the palette colour c whose white-to-c segment lies nearest, so a pixel
   blended with the white background keeps its colour (plain nearest-colour would not: half red,
   half white is nearer to purple than to red);
2. foreground = pixels at least FOREGROUND_FRACTION of the way from white to their colour, i.e.
   whose distance from white is large relative to that colour's; 0.5 keeps a blurred edge where
   the sharp edge was, so shapes keep their outline and nearby objects stay apart;
3. a 3x3 majority vote on these labels removes single-pixel speckle and spurs and fills pinholes;
4. 4-connected regions of one colour with at least MIN_OBJECT_AREA pixels are objects;
5. an object's shape is the template (circle / square / triangle drawn in its bounding box) with
   the highest intersection-over-union, or "unknown" below MIN_SHAPE_IOU.

An image satisfies a caption when it shows exactly the named objects (no extra ones), with the
right colours, shapes and count, and for relations the centres (of the bounding boxes) are
placed as world.relation_holds requires.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .render import shape_mask
from .world import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    ObjectKind,
    Scene,
    parse_caption,
    relation_holds,
)

FOREGROUND_FRACTION = 0.5
MIN_OBJECT_AREA = 40  # pixels at 64x64; the smallest drawn object has about 110
MIN_SHAPE_IOU = 0.6

ImageLike = Image.Image | np.ndarray

_WHITE = np.array(BACKGROUND, dtype=np.float32)
_COLOUR_NAMES = tuple(COLOURS)
_INKS = _WHITE - np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float32)  # (colours, 3)
_INK_NORMS2 = (_INKS**2).sum(axis=1)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str  # one of SHAPES or "unknown"
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), in 64x64 coordinates
    area: int
    shape_iou: float

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def matches(self, kind: ObjectKind) -> bool:
        return self.colour == kind.colour and self.shape == kind.shape

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Judgement:
    passed: bool
    reason: str
    objects: tuple[DetectedObject, ...]


def _as_pixels(image: ImageLike) -> np.ndarray:
    """float32 (64, 64, 3) pixels; other sizes are resized."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _colour_labels(pixels: np.ndarray) -> np.ndarray:
    """Index into _COLOUR_NAMES per pixel, -1 for background (see module docstring, steps 1-2)."""
    ink = _WHITE - pixels  # (H, W, 3)
    dots = ink @ _INKS.T  # (H, W, colours)
    alpha = np.clip(dots / _INK_NORMS2, 0.0, 1.0)  # position along each white-to-colour segment
    residual2 = (ink**2).sum(axis=-1, keepdims=True) - 2 * alpha * dots + alpha**2 * _INK_NORMS2
    labels = residual2.argmin(axis=-1)
    fraction = np.take_along_axis(alpha, labels[..., None], axis=-1)[..., 0]
    labels[fraction < FOREGROUND_FRACTION] = -1
    return labels


def _majority_vote(labels: np.ndarray) -> np.ndarray:
    """Each pixel takes the label held by at least 5 of its 3x3 neighbourhood, else background."""
    h, w = labels.shape
    one_hot = np.pad(labels == np.arange(len(_COLOUR_NAMES))[:, None, None], ((0, 0), (1, 1), (1, 1)))
    votes = sum(one_hot[:, dy : dy + h, dx : dx + w].astype(np.int8) for dy in range(3) for dx in range(3))
    return np.where(votes.max(axis=0) >= 5, votes.argmax(axis=0), -1)


def _region_ids(labels: np.ndarray) -> np.ndarray:
    """Per pixel, the flat index of one pixel of its 4-connected same-label region.

    Min-label propagation plus pointer jumping (each id is replaced by its own id's id), iterated
    to a fixed point; background pixels keep their own index.
    """
    h, w = labels.shape
    ids = np.arange(h * w).reshape(h, w)
    foreground = labels >= 0
    same_down = foreground[:-1] & (labels[:-1] == labels[1:])
    same_right = foreground[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    while True:
        new = ids.copy()
        new[:-1] = np.where(same_down, np.minimum(new[:-1], ids[1:]), new[:-1])
        new[1:] = np.where(same_down, np.minimum(new[1:], ids[:-1]), new[1:])
        new[:, :-1] = np.where(same_right, np.minimum(new[:, :-1], ids[:, 1:]), new[:, :-1])
        new[:, 1:] = np.where(same_right, np.minimum(new[:, 1:], ids[:, :-1]), new[:, 1:])
        new = new.ravel()[new]
        if np.array_equal(new, ids):
            return ids
        ids = new


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape template for a region cropped to its bounding box, with its IoU."""
    h, w = mask.shape
    ious = {}
    for shape in SHAPES:
        template = shape_mask(shape, w, h)
        ious[shape] = (mask & template).sum() / (mask | template).sum()
    shape = max(ious, key=ious.get)
    return (shape if ious[shape] >= MIN_SHAPE_IOU else "unknown"), float(ious[shape])


def detect_objects(image: ImageLike) -> list[DetectedObject]:
    """Objects in an image (PIL image or HxWx3 uint8 array), in raster order of their first pixel."""
    labels = _majority_vote(_colour_labels(_as_pixels(image)))
    ids = _region_ids(labels)
    region_ids, areas = np.unique(ids[labels >= 0], return_counts=True)
    objects = []
    for region_id, area in zip(region_ids, areas):
        if area < MIN_OBJECT_AREA:
            continue
        ys, xs = np.nonzero(ids == region_id)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        shape, iou = _classify_shape(ids[y0:y1, x0:x1] == region_id)
        colour = _COLOUR_NAMES[labels.flat[region_id]]
        objects.append(DetectedObject(colour, shape, (x0, y0, x1, y1), int(area), iou))
    return objects


def _check(scene: Scene, objects: Sequence[DetectedObject]) -> tuple[bool, str]:
    if len(objects) != len(scene.objects):
        found = ", ".join(map(str, objects)) or "nothing"
        return False, f"expected {len(scene.objects)} object(s), found {len(objects)}: {found}"
    if scene.relation is None:
        kind = scene.objects[0]
        wrong = [o for o in objects if not o.matches(kind)]
        return (False, f"found a {wrong[0]} where a {kind} was expected") if wrong else (True, "ok")
    kind_a, kind_b = scene.objects
    first, second = objects
    if first.matches(kind_a) and second.matches(kind_b):
        a, b = first, second
    elif second.matches(kind_a) and first.matches(kind_b):
        a, b = second, first
    else:
        return False, f"found a {first} and a {second}, expected a {kind_a} and a {kind_b}"
    if not relation_holds(scene.relation, a.centre, b.centre):
        return False, f"the {kind_a} at {a.centre} is not {scene.relation} the {kind_b} at {b.centre}"
    return True, "ok"


def judge(image: ImageLike, caption: str) -> Judgement:
    """Whether the image satisfies the caption, why not, and what was detected."""
    objects = tuple(detect_objects(image))
    passed, reason = _check(parse_caption(caption), objects)
    return Judgement(passed, reason, objects)


def score(image: ImageLike, caption: str) -> bool:
    return judge(image, caption).passed


def evaluate(images: Sequence[ImageLike], captions: Sequence[str]) -> dict[str, float]:
    """Accuracy per category present (single, counting, relation, heldout) and "overall" (all prompts)."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images for {len(captions)} captions")
    if not captions:
        raise ValueError("nothing to evaluate")
    totals: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    for image, caption in zip(images, captions):
        category = parse_caption(caption).category
        totals[category] += 1
        passed[category] += score(image, caption)
    results = {category: passed[category] / totals[category] for category in CATEGORIES if totals[category]}
    results["overall"] = sum(passed.values()) / sum(totals.values())
    return results


def format_table(results: dict[str, float]) -> str:
    """A Markdown table of evaluate()'s results."""
    rows = ["| category | accuracy |", "|---|---:|"]
    rows += [f"| {category} | {accuracy:.1%} |" for category, accuracy in results.items()]
    return "\n".join(rows)
