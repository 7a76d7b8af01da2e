"""The loss probe: corrupted captions change exactly one part, and the shipped model reads the count word."""

import pytest
import torch

from mmdit_diffusers import MMDiTPipeline
from mmdit_diffusers.shapes import parse_caption
from mmdit_diffusers.shapes.probe import _loss, corrupt, text_sensitivity
from mmdit_diffusers.shapes.shipped import SHIPPED_PIPELINE as FOLDER


def test_corrupt_changes_one_part_of_the_caption():
    assert corrupt("a red circle left of a blue square", "binding") == "a blue circle left of a red square"
    assert corrupt("a red circle above a blue square", "relation") == "a red circle below a blue square"
    assert corrupt("two green triangles", "count") == "three green triangles"
    assert corrupt("three green triangles", "count") == "two green triangles"
    assert corrupt("a red circle left of a red square", "binding") is None  # swapping equal colours changes nothing
    for caption, probe in [("a red circle below a blue square", "binding"), ("a red circle below a blue square", "relation")]:
        assert parse_caption(corrupt(caption, probe)) != parse_caption(caption)
    with pytest.raises(ValueError, match="probe"):
        corrupt("a red circle left of a blue square", "colour")


@pytest.fixture(scope="module")
def shipped():
    pipe = MMDiTPipeline.from_pretrained(FOLDER, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_same_captions_get_the_same_noise_and_loss(shipped):
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle", "two blue squares", "a green triangle above a red square"]
    first, second = _loss(shipped, latents, captions, seed=5), _loss(shipped, latents, captions, seed=5)
    assert torch.equal(first, second) and (first > 0).all()


def test_the_shipped_model_reads_count_binding_and_relation(shipped):
    # at 160 images the shipped model prefers the true caption for 89% (count) and 100% (binding, relation) of the
    # images, with loss gaps of +8%, +42% and +77% (model card); chance is 50% and a gap of 0
    results = text_sensitivity(shipped, num_images=24, seed=0)
    assert set(results) == {"binding", "relation", "count"}
    assert all(0.0 <= r["true_wins"] <= 1.0 for r in results.values())
    assert results["count"]["gap"] > 0.02 and results["count"]["true_wins"] >= 0.7
    for probe in ("binding", "relation"):
        assert results[probe]["gap"] > 0.1 and results[probe]["true_wins"] >= 0.9, (probe, results[probe])


def test_num_images_must_be_positive(shipped):
    with pytest.raises(ValueError, match="num_images"):
        text_sensitivity(shipped, num_images=0)


def test_the_command_refuses_a_bad_num_images(capsys):
    from mmdit_diffusers.cli import main

    assert main(["probe", "--num_images", "0"]) == 2 and "--num_images" in capsys.readouterr().err
