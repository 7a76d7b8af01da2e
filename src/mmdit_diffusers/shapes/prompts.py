"""The fixed Shapes evaluation prompt set (a GenEval analogue)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .world import CATEGORIES, enumerate_scenes

PROMPTS_PER_CATEGORY = 120  # a multiple of the 15 single, 30 counting and 40 held-out scenes


class EvalPrompt(NamedTuple):
    caption: str
    category: str


def evaluation_prompts(seed: int = 0) -> list[EvalPrompt]:
    """PROMPTS_PER_CATEGORY prompts for each of single, counting, relation and heldout, grouped by category.

    Categories with fewer scenes than that (single, counting, heldout) list every scene equally
    often; relation prompts are distinct scenes drawn with the seed from the non-held-out ones.
    """
    rng = np.random.default_rng(seed)
    prompts = []
    for category in CATEGORIES:
        scenes = enumerate_scenes(category)
        if len(scenes) > PROMPTS_PER_CATEGORY:
            chosen = [scenes[i] for i in rng.choice(len(scenes), PROMPTS_PER_CATEGORY, replace=False)]
        else:
            chosen = [scenes[i % len(scenes)] for i in range(PROMPTS_PER_CATEGORY)]
        prompts += [EvalPrompt(scene.caption, category) for scene in chosen]
    return prompts
