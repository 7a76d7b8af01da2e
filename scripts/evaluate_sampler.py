"""Scores of a Shapes pipeline folder under other sampler settings: the experiments of the model card's section
"Counting and guidance: what moves them".

    .venv/bin/python scripts/evaluate_sampler.py pipelines/mmdit-shapes --guidance_scale 4 [--guidance_rescale 0.7]
        [--use_cfg_zero_star | --no-use_cfg_zero_star] [--ode] [--shift 1] [--categories counting] [--seeds 0 1 2]
        [--strength 0.7]

Generation and scoring are `mmdit-diffusers evaluate`'s (the same prompts, batches and generator); what this adds
is the scheduler's settings (`--ode`: `stochastic_sampling=False`; `--shift`), the pipeline's guidance options
(`guidance_rescale`, `use_cfg_zero_star`) and a choice of categories. Settings not given are the folder's stored ones.

`--strength S` starts each prompt from a correct drawing of it (rendered by the Shapes world with the seed) instead
of pure noise: image-to-image at strength S, i.e. the last S of the sampler's steps from that drawing noised to the
step's noise level. A correct drawing that comes back wrong shows that the model loses or adds objects from that
noise level on.
"""

import argparse
import json

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmdit_diffusers import MMDiTImg2ImgPipeline
from mmdit_diffusers.shapes.evaluation import sample_batches
from mmdit_diffusers.shapes.prompts import evaluation_prompts
from mmdit_diffusers.shapes.render import render_scene
from mmdit_diffusers.shapes.scorer import judge
from mmdit_diffusers.shapes.shipped import call_arguments, load_pipeline
from mmdit_diffusers.shapes.world import CATEGORIES, parse_caption

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model")
parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
parser.add_argument("--seeds", nargs="+", type=int, default=[0])
parser.add_argument("--guidance_scale", type=float, default=None)
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--guidance_rescale", type=float, default=None, help="guidance rescale phi in [0, 1]")
parser.add_argument("--use_cfg_zero_star", action=argparse.BooleanOptionalAction, default=None, help="CFG-Zero*")
parser.add_argument("--ode", action="store_true", help="deterministic Euler steps instead of stochastic sampling")
parser.add_argument("--shift", type=float, default=None)
parser.add_argument("--strength", type=float, default=None,
                    help="start from correct drawings noised to this img2img strength in (0, 1]")
args = parser.parse_args()

pipe = load_pipeline(args.model)
pipe.set_progress_bar_config(disable=True)
changes = {"stochastic_sampling": False} if args.ode else {}
if args.shift is not None:
    changes["shift"] = args.shift
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **changes)
call = call_arguments(args.steps, args.guidance_scale)
for name in ("guidance_rescale", "use_cfg_zero_star"):
    if getattr(args, name) is not None:
        call[name] = getattr(args, name)
if args.strength is not None:
    pipe = MMDiTImg2ImgPipeline(**pipe.components, sampler_defaults=pipe.config.get("sampler_defaults"))
    pipe.set_progress_bar_config(disable=True)


def from_drawings(prompts, seed):
    """img2img from a correct drawing of each prompt, one generator across batches as `sample_batches`."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    drawings = [render_scene(parse_caption(p.caption), rng) for p in prompts]
    for i in range(0, len(prompts), 16):
        yield pipe([p.caption for p in prompts[i : i + 16]], image=drawings[i : i + 16], strength=args.strength,
                   generator=generator, **call).images


scores = {}
for seed in args.seeds:
    prompts = [p for p in evaluation_prompts(seed) if p.category in args.categories]
    batches = sample_batches(pipe, prompts, seed, 16, **call) if args.strength is None else from_drawings(prompts, seed)
    images = [image for batch in batches for image in batch]
    for category in args.categories:
        verdicts = [judge(image, p.caption) for p, image in zip(prompts, images) if p.category == category]
        scores[f"{category}@{seed}"] = round(100 * sum(v.passed for v in verdicts) / len(verdicts), 1)
        failures = [v.reason for v in verdicts if not v.passed][:3]
        print(f"seed {seed} {category}: {scores[f'{category}@{seed}']}%", *failures, sep="\n  ", flush=True)
print(json.dumps(dict(model=args.model, call=call, strength=args.strength,
                      sampler_defaults=pipe.config.get("sampler_defaults"), scheduler=dict(pipe.scheduler.config),
                      scores=scores), default=str))
