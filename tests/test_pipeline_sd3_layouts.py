"""MMDiTPipeline accepts the component layouts StableDiffusion3Pipeline accepts, with the same images.

diffusers' own SD3 test components have two 32-wide CLIPs and a 32-wide T5: SD3 cuts the 64 CLIP channels to the
T5 width (all of the second CLIP's hidden states go; its pooled output stays). We do the same, and say so once.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.pipelines import MMDiTPipeline, text_encoding
from tiny_pipeline import tiny_mmdit_pipeline, tiny_sd3_components

NARROW_T5 = 32  # = one CLIP's width: the two CLIPs together are wider


def _pair(with_t5: bool):
    """(SD3's pipeline, ours) on the same components, T5 narrower than the two CLIPs together."""
    components = tiny_sd3_components(seed=3, with_t5=with_t5, t5_dim=NARROW_T5)
    sd3 = StableDiffusion3Pipeline(**components, image_encoder=None, feature_extractor=None)
    ours = MMDiTPipeline(**{**components, "transformer": MMDiTTransformer2DModel.from_sd3(components["transformer"])})
    for pipe in (sd3, ours):
        pipe.set_progress_bar_config(disable=True)
    return sd3, ours


def _images(pipe, **kwargs):
    return pipe(
        ["a red circle", "two blue squares"], num_inference_steps=2, guidance_scale=4.0, output_type="np",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
def test_clip_states_wider_than_t5_are_cut_as_sd3_does(with_t5, caplog, monkeypatch):
    monkeypatch.setattr(text_encoding, "_WARNED_CLIP_CUTS", set())
    sd3, ours = _pair(with_t5)
    with caplog.at_level(logging.WARNING, logger="mmdit_diffusers"):
        got = _images(ours)
        _images(ours)  # the warning is given once
    expected = _images(sd3)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the prompts matter

    warnings = [r.getMessage() for r in caplog.records if "CLIP hidden states" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "64 channels wide" in warnings[0] and "all 32 channels of `text_encoder_2`" in warnings[0]
    assert f"text sequence's {NARROW_T5}" in warnings[0]


def test_encode_prompt_matches_sd3_on_the_cut_layout():
    sd3, ours = _pair(with_t5=True)
    expected = sd3.encode_prompt("a red circle", None, None, do_classifier_free_guidance=True, max_sequence_length=16)
    got = ours.encode_prompt("a red circle", do_classifier_free_guidance=True, max_sequence_length=16)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_optional_components_are_what_the_pipeline_runs_without():
    _, sd3_layout = _pair(with_t5=True)
    one_clip = tiny_mmdit_pipeline(layout="clip_t5")
    # what a saved folder may lack (diffusers' loaders read the class)
    assert MMDiTPipeline._optional_components == ["text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    # what each pipeline runs without: an SD3-layout transformer needs both CLIPs' pooled outputs
    assert sd3_layout._optional_components == ["text_encoder_3", "tokenizer_3"]
    assert one_clip._optional_components == ["text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]


def test_sd3_layout_without_its_second_clip_names_it():
    _, ours = _pair(with_t5=True)
    ours.text_encoder_2, ours.tokenizer_2 = None, None
    with pytest.raises(ValueError, match=r"pooled text of width 64 \(an SD3-layout transformer needs `text_encoder_2`"):
        ours("a red circle", num_inference_steps=1)
