"""The "Shapes" synthetic world: a CPU-sized GenEval analogue for training and evaluating a tiny
text-to-image model (dataset generator, caption grammar, evaluation prompts and scorer).

Names are resolved on first use, so the command line lists the recipe's commands without importing numpy or PIL.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "CATEGORIES": ".world",
    "COLOURS": ".world",
    "HELD_OUT_RELATION_PAIRS": ".world",
    "IMAGE_SIZE": ".world",
    "MAX_OBJECT_SIZE": ".world",
    "MIN_OBJECT_SIZE": ".world",
    "MIN_RELATION_OFFSET": ".world",
    "OBJECT_KINDS": ".world",
    "RELATIONS": ".world",
    "SHAPES": ".world",
    "TRAINING_CATEGORIES": ".world",
    "DetectedObject": ".scorer",
    "EvalPrompt": ".prompts",
    "Judgement": ".scorer",
    "ObjectKind": ".world",
    "Placement": ".render",
    "Scene": ".world",
    "detect_objects": ".scorer",
    "draw": ".render",
    "enumerate_scenes": ".world",
    "evaluate": ".scorer",
    "evaluation_prompts": ".prompts",
    "format_table": ".scorer",
    "is_heldout_pair": ".world",
    "judge": ".scorer",
    "layout_scene": ".render",
    "parse_caption": ".world",
    "relation_holds": ".world",
    "render_scene": ".render",
    "sample_example": ".render",
    "sample_scene": ".world",
    "score": ".scorer",
    "shape_mask": ".render",
    "write_dataset": ".dataset",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
