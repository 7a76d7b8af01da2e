"""The "Shapes" synthetic world: a CPU-sized GenEval analogue for training and evaluating a tiny
text-to-image model (dataset generator, caption grammar, evaluation prompts and scorer)."""

from .dataset import write_dataset
from .prompts import EvalPrompt, evaluation_prompts
from .render import Placement, draw, layout_scene, render_scene, sample_example, shape_mask
from .scorer import DetectedObject, Judgement, detect_objects, evaluate, format_table, judge, score
from .world import (
    CATEGORIES,
    COLOURS,
    HELD_OUT_RELATION_PAIRS,
    IMAGE_SIZE,
    MAX_OBJECT_SIZE,
    MIN_OBJECT_SIZE,
    MIN_RELATION_OFFSET,
    OBJECT_KINDS,
    RELATIONS,
    SHAPES,
    TRAINING_CATEGORIES,
    ObjectKind,
    Scene,
    enumerate_scenes,
    is_heldout_pair,
    parse_caption,
    relation_holds,
    sample_scene,
)

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "HELD_OUT_RELATION_PAIRS",
    "IMAGE_SIZE",
    "MAX_OBJECT_SIZE",
    "MIN_OBJECT_SIZE",
    "MIN_RELATION_OFFSET",
    "OBJECT_KINDS",
    "RELATIONS",
    "SHAPES",
    "TRAINING_CATEGORIES",
    "DetectedObject",
    "EvalPrompt",
    "Judgement",
    "ObjectKind",
    "Placement",
    "Scene",
    "detect_objects",
    "draw",
    "enumerate_scenes",
    "evaluate",
    "evaluation_prompts",
    "format_table",
    "is_heldout_pair",
    "judge",
    "layout_scene",
    "parse_caption",
    "relation_holds",
    "render_scene",
    "sample_example",
    "sample_scene",
    "score",
    "shape_mask",
    "write_dataset",
]
