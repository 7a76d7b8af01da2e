"""Does a pipeline's transformer read the words that matter? A loss probe, readable long before `evaluate` is.

For fresh ground-truth images of one kind, compare the flow-matching loss under the true caption with the loss
under a corrupted caption, with the same latents, the same noise and the same sigmas:

    binding   "a red circle left of a blue square" -> "a blue circle left of a red square"  (colours swapped)
    relation  "a red circle left of a blue square" -> "a red circle right of a blue square" (opposite relation)
    count     "two red circles" <-> "three red circles"

`gap` is the mean relative loss increase under the corrupted caption and `true_wins` the share of images whose
true caption has the lower loss: 0.5 means the model ignores that part of the text.

    mmdit-diffusers probe [--model PIPELINE] [--num_images 160] [--seed 123]
"""

from __future__ import annotations

import numpy as np
import torch

from ..pipelines.latents import normalize_latents
from .render import sample_example
from .world import OPPOSITE, parse_caption

PROBE_SIGMAS = (0.3, 0.5, 0.7, 0.85, 0.95)
CASES = {"binding": "relation", "relation": "relation", "count": "counting"}  # probe -> category of its images


def corrupt(caption: str, probe: str) -> str | None:
    """The caption with one part changed (see the module docstring); None if the change would not alter it."""
    scene = parse_caption(caption)
    if probe == "count":
        word = "two" if len(scene.objects) == 3 else "three"
        return f"{word} {scene.objects[0]}s"
    a, b = scene.objects
    if probe == "relation":
        return f"a {a} {OPPOSITE[scene.relation]} a {b}"
    if probe == "binding":
        return None if a.colour == b.colour else f"a {b.colour} {a.shape} {scene.relation} a {a.colour} {b.shape}"
    raise ValueError(f"unknown probe {probe!r}; expected one of {list(CASES)}")


@torch.no_grad()
def text_sensitivity(pipe, num_images: int = 160, seed: int = 123) -> dict[str, dict[str, float]]:
    """{probe: {"gap": ..., "true_wins": ...}} for each probe of CASES, on num_images images each."""
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    rng = np.random.default_rng(seed)
    return {probe: _probe(pipe, probe, category, num_images, rng, seed) for probe, category in CASES.items()}


def _probe(pipe, probe, category, n, rng, seed) -> dict[str, float]:
    images, true, corrupted = [], [], []
    while len(images) < n:
        image, caption = sample_example(rng, category)
        if (other := corrupt(caption, probe)) is not None:
            images.append(np.asarray(image))
            true.append(caption)
            corrupted.append(other)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    pixels = torch.tensor(np.stack(images), device=device).permute(0, 3, 1, 2).to(pipe.vae.dtype) / 127.5 - 1
    latents = pipe.vae.encode(pixels).latent_dist.mode()
    latents = normalize_latents(latents, pipe.vae).to(dtype)
    losses = [_loss(pipe, latents, captions, seed) for captions in (true, corrupted)]
    return {"gap": ((losses[1] - losses[0]) / losses[0]).mean().item(),
            "true_wins": (losses[0] < losses[1]).float().mean().item()}


def _loss(pipe, latents, captions, seed) -> torch.Tensor:
    """Per-image flow-matching loss, averaged over PROBE_SIGMAS, with noise drawn from `seed` (same for every call)."""
    embeds, _, pooled, _, mask, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                                      return_attention_mask=True)
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(captions), device=latents.device)
    for sigma in PROBE_SIGMAS:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        noisy = (1 - sigma) * latents + sigma * noise
        velocity = pipe.transformer(hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                                    timestep=torch.full((len(captions),), sigma * 1000.0, device=latents.device),
                                    encoder_attention_mask=mask, return_dict=False)[0]
        total += ((velocity.float() - (noise - latents).float()) ** 2).mean(dim=(1, 2, 3))
    return total / len(PROBE_SIGMAS)
