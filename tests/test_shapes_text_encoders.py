"""The Shapes text encoders: hard negatives, the contrastive loss, training into standard folders, bad input."""

import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from mmdit_diffusers import MMDiTPipeline
from mmdit_diffusers.cli import main as dispatch
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.shapes import COLOURS, SHAPES, enumerate_scenes, parse_caption, write_dataset
from mmdit_diffusers.shapes.base_pipeline import build_base_pipeline
from mmdit_diffusers.shapes.world import OPPOSITE
from mmdit_diffusers.shapes.text_encoders import (
    build_text_encoders,
    build_tokenizers,
    caption_vocabulary,
    contrastive_loss,
    hard_negatives,
    train_text_encoders,
    training_negatives,
)


def test_hard_negatives_describe_other_scenes_in_the_same_words():
    for scene in enumerate_scenes("relation") + enumerate_scenes("counting"):
        caption = scene.caption
        negatives = hard_negatives(caption)
        a, b = scene.objects[0], scene.objects[-1]
        if scene.relation is None:
            assert list(negatives) == ["other count"]
        else:
            expected = {"opposite relation", "swapped objects"}
            expected |= {"swapped colours"} if a.colour != b.colour and a.shape != b.shape else set()
            assert set(negatives) == expected
        for negative in negatives.values():
            if scene.relation is not None:  # the same colours and shapes
                assert _object_words(negative) == _object_words(caption)
            assert not _same_scene(parse_caption(negative), scene), (caption, negative)
    assert hard_negatives("a red circle") == {}


def test_held_out_compositions_are_never_training_negatives():
    caption = "a red square left of a blue circle"  # its colours swapped: red circle + blue square, a held-out pair
    assert parse_caption(hard_negatives(caption)["swapped colours"]).category == "heldout"
    assert hard_negatives(caption)["swapped colours"] not in training_negatives(caption)
    for scene in enumerate_scenes("relation"):
        negatives = training_negatives(scene.caption)
        assert all(parse_caption(n).category == "relation" for n in negatives)
        assert set(negatives) <= set(hard_negatives(scene.caption).values()) and len(negatives) >= 2


def _same_scene(x, y):
    """Equal scenes, or one relation read the other way round ("A left of B" is "B right of A")."""
    return x == y or (x.relation is not None and x.objects[::-1] == y.objects and OPPOSITE[x.relation] == y.relation)


def _object_words(caption):
    return sorted(w for w in caption.split() if w in COLOURS or w in SHAPES)


def test_with_one_positive_per_row_the_loss_is_clips_cross_entropy():
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    log_temperature = torch.tensor(2.0)
    logits = log_temperature.exp() * images @ texts.T
    expected = F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    torch.testing.assert_close(contrastive_loss(images, texts, torch.eye(5, dtype=torch.bool), log_temperature), expected)


def test_copies_of_a_caption_are_all_positives_and_hard_negatives_only_compete_for_images():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    texts = torch.cat([image, image[:1], -image[:1]])  # batch captions, a copy of the first, a hard negative
    positives = torch.tensor([[True, False, True, False], [False, True, False, False]])
    log_temperature = torch.tensor(0.0)
    logits = image @ texts.T
    image_side = -torch.stack([logits[0].log_softmax(-1)[[0, 2]].logsumexp(-1), logits[1].log_softmax(-1)[1]]).mean()
    text_side = F.cross_entropy(logits[:, :2].T, torch.arange(2))
    torch.testing.assert_close(contrastive_loss(image, texts, positives, log_temperature), image_side + text_side)


def test_every_caption_word_is_one_token():
    clip, t5 = build_tokenizers()
    for word in caption_vocabulary():
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word


def _architecture(model):
    return {k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "dtype", "_name_or_path")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes") / "data", 48, seed=0)


def test_training_lowers_the_loss_and_writes_standard_frozen_folders(data_dir, tmp_path, capsys):
    out = train_text_encoders(data_dir, tmp_path / "text", max_train_steps=40, train_batch_size=16,
                              lr_warmup_steps=8, t5_distillation_steps=40, log_every=10)
    log = capsys.readouterr().out
    for encoder in ("CLIP", "T5"):
        losses = [float(x) for x in re.findall(rf"{encoder} step \d+/40  loss ([0-9.]+)", log)]
        assert len(losses) == 4 and losses[-1] < losses[0], (encoder, losses)
    assert sorted(p.name for p in out.iterdir()) == [
        "hard_negatives.json", "text_encoder", "text_encoder_3", "tokenizer", "tokenizer_3"]
    assert not list(tmp_path.glob(".*partial*"))
    clip = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder")
    t5 = T5EncoderModel.from_pretrained(out / "text_encoder_3")
    clip_tok, t5_tok = CLIPTokenizer.from_pretrained(out / "tokenizer"), T5TokenizerFast.from_pretrained(out / "tokenizer_3")
    fresh_clip, fresh_t5 = build_text_encoders(clip_tok, t5_tok, seed=0)
    for trained, fresh in ((clip, fresh_clip), (t5, fresh_t5)):
        assert _architecture(trained) == _architecture(fresh)
        trained_state, fresh_state = trained.state_dict(), fresh.state_dict()
        assert trained_state.keys() == fresh_state.keys()
        assert any(not torch.equal(trained_state[k], fresh_state[k]) for k in trained_state)

    vae = AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    pipe = MMDiTPipeline.from_pretrained(build_base_pipeline(out, tmp_path / "vae", tmp_path / "base"))
    ids = clip_tok(["a red circle"], return_tensors="pt").input_ids
    torch.testing.assert_close(pipe.text_encoder(ids).text_embeds, clip(ids).text_embeds)
    assert pipe.transformer.config.img_tokens == 64 and pipe.transformer.config.txt_dim == 64


def test_a_folder_without_a_dataset_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(InputError, match="--train_data_dir"):
        train_text_encoders(tmp_path, tmp_path / "out", max_train_steps=1)
    with pytest.raises(ValueError, match="max_train_steps"):
        train_text_encoders(tmp_path, tmp_path / "out", max_train_steps=0)
    with pytest.raises(ValueError, match="t5_distillation_steps"):
        train_text_encoders(tmp_path, tmp_path / "out", t5_distillation_steps=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expected", [
    (["--max_train_steps", "0"], "--max_train_steps"),
    (["--train_batch_size", "1"], "--train_batch_size"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--t5_distillation_steps", "0"], "--t5_distillation_steps"),
    ([], "--train_data_dir"),
])
def test_the_command_refuses_bad_arguments(data_dir, tmp_path, capsys, args, expected):
    dataset = data_dir if args else tmp_path  # no arguments: an empty folder as the dataset
    code = dispatch(["text-encoders", "--train_data_dir", str(dataset), "--output_dir", str(tmp_path / "out"), *args])
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_base_pipeline_command_names_missing_text_encoders(tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    code = dispatch(["base", "--text_encoders", str(tmp_path / "nothing"), "--vae", str(vae), "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and "--text_encoders" in error and "text_encoder_3" in error
    assert not (tmp_path / "out").exists()
