"""The Shapes world: palette, shapes, caption grammar and caption sampling.

Captions are lower case and take exactly three forms:

    single    "a {colour} {shape}"
    counting  "{two|three} {colour} {shape}s"
    relation  "a {colour} {shape} {left of|right of|above|below} a {colour} {shape}"

A relation caption whose two objects form one of ``HELD_OUT_RELATION_PAIRS`` (in either order,
with any relation word) belongs to the category "heldout": training sampling never produces it,
so evaluating on it measures compositional generalisation rather than memorisation.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
MIN_OBJECT_SIZE = 14  # bounding-box side, pixels
MAX_OBJECT_SIZE = 22
COUNT_WORDS = {"two": 2, "three": 3}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MIN_RELATION_OFFSET = 8  # pixels between the two centres along the relation's axis
TRAINING_CATEGORIES = ("single", "counting", "relation")
CATEGORIES = (*TRAINING_CATEGORIES, "heldout")


@dataclass(frozen=True)
class ObjectKind:
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


OBJECT_KINDS = tuple(ObjectKind(colour, shape) for colour in COLOURS for shape in SHAPES)

# Unordered pairs: every colour appears twice and every pair differs in both colour and shape,
# so each held-out object is still seen in many training relations, only never with its partner.
HELD_OUT_RELATION_PAIRS = (
    (ObjectKind("red", "circle"), ObjectKind("blue", "square")),
    (ObjectKind("green", "triangle"), ObjectKind("yellow", "circle")),
    (ObjectKind("purple", "square"), ObjectKind("red", "triangle")),
    (ObjectKind("blue", "triangle"), ObjectKind("purple", "circle")),
    (ObjectKind("yellow", "square"), ObjectKind("green", "circle")),
)
_HELD_OUT = frozenset(frozenset(pair) for pair in HELD_OUT_RELATION_PAIRS)


def is_heldout_pair(a: ObjectKind, b: ObjectKind) -> bool:
    return frozenset((a, b)) in _HELD_OUT


def relation_holds(relation: str, centre_a: tuple[float, float], centre_b: tuple[float, float]) -> bool:
    """Whether "A {relation} B" holds for centres (x, y), y pointing down."""
    dx = centre_b[0] - centre_a[0]
    dy = centre_b[1] - centre_a[1]
    offset = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    return offset >= MIN_RELATION_OFFSET


@dataclass(frozen=True)
class Scene:
    """What an image must show: one object, two or three identical objects, or (A, B) with a relation."""

    objects: tuple[ObjectKind, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; expected one of {list(RELATIONS)}")
            if len(self.objects) != 2 or self.objects[0] == self.objects[1]:
                raise ValueError("a relation needs two objects that differ in colour or shape")
        elif len(self.objects) not in (1, *COUNT_WORDS.values()) or len(set(self.objects)) != 1:
            raise ValueError("a scene without a relation shows one object or 2-3 identical objects")

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "heldout" if is_heldout_pair(*self.objects) else "relation"
        return "single" if len(self.objects) == 1 else "counting"

    @property
    def caption(self) -> str:
        if self.relation is not None:
            a, b = self.objects
            return f"a {a} {self.relation} a {b}"
        if len(self.objects) == 1:
            return f"a {self.objects[0]}"
        word = next(w for w, n in COUNT_WORDS.items() if n == len(self.objects))
        return f"{word} {self.objects[0]}s"


_OBJECT = rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_SINGLE = re.compile(rf"a {_OBJECT}")
_COUNTING = re.compile(rf"({'|'.join(COUNT_WORDS)}) {_OBJECT}s")
_RELATION = re.compile(rf"a {_OBJECT} ({'|'.join(RELATIONS)}) a {_OBJECT}")
_GRAMMAR = (
    "'a <colour> <shape>', '<two|three> <colour> <shape>s' or "
    "'a <colour> <shape> <left of|right of|above|below> a <colour> <shape>'"
)


def parse_caption(caption: str) -> Scene:
    """Parse a caption into the scene it describes; ValueError (naming the caption) if off-grammar."""
    try:
        if match := _SINGLE.fullmatch(caption):
            return Scene((ObjectKind(*match.groups()),))
        if match := _COUNTING.fullmatch(caption):
            word, colour, shape = match.groups()
            return Scene((ObjectKind(colour, shape),) * COUNT_WORDS[word])
        if match := _RELATION.fullmatch(caption):
            colour_a, shape_a, relation, colour_b, shape_b = match.groups()
            return Scene((ObjectKind(colour_a, shape_a), ObjectKind(colour_b, shape_b)), relation)
    except ValueError as error:
        raise ValueError(f"caption {caption!r} is not a valid Shapes caption: {error}") from None
    raise ValueError(f"caption {caption!r} does not follow the Shapes grammar; expected {_GRAMMAR}")


@functools.cache
def enumerate_scenes(category: str) -> tuple[Scene, ...]:
    """Every scene of a category, in a fixed order."""
    if category == "single":
        return tuple(Scene((kind,)) for kind in OBJECT_KINDS)
    if category == "counting":
        return tuple(Scene((kind,) * n) for n in COUNT_WORDS.values() for kind in OBJECT_KINDS)
    if category in ("relation", "heldout"):
        scenes = (
            Scene((a, b), relation)
            for a, b in itertools.permutations(OBJECT_KINDS, 2)
            for relation in RELATIONS
        )
        return tuple(scene for scene in scenes if scene.category == category)
    raise ValueError(f"unknown category {category!r}; expected one of {list(CATEGORIES)}")


def sample_scene(
    rng: np.random.Generator,
    category: str | None = None,
    allow_heldout: bool = False,
    category_weights: dict[str, float] | None = None,
) -> Scene:
    """Draw a scene uniformly within a category.

    category None draws a training category first: uniformly, or in proportion to `category_weights`
    (a weight for each of "single", "counting", "relation"). Held-out relations come only from
    category "heldout", or from "relation" when allow_heldout.
    """
    if category is None:
        if category_weights is None:
            category = TRAINING_CATEGORIES[rng.integers(len(TRAINING_CATEGORIES))]
        else:
            category = TRAINING_CATEGORIES[rng.choice(len(TRAINING_CATEGORIES), p=_probabilities(category_weights))]
    pool = enumerate_scenes(category)
    if category == "relation" and allow_heldout:
        pool += enumerate_scenes("heldout")
    return pool[rng.integers(len(pool))]


def _probabilities(category_weights: dict[str, float]) -> np.ndarray:
    if set(category_weights) != set(TRAINING_CATEGORIES):
        raise ValueError(f"category_weights must have exactly the keys {list(TRAINING_CATEGORIES)}, "
                         f"got {sorted(category_weights)}")
    weights = np.array([float(category_weights[c]) for c in TRAINING_CATEGORIES])
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"category_weights must be non-negative with a positive sum, got {category_weights}")
    return weights / weights.sum()
