"""MMDiTPipeline refuses bad inputs with a ValueError that names the argument (checked before any model runs)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from mmdit_diffusers.pipelines import MMDiTPipeline
from tiny_pipeline import T5_TOKENS

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def embeds(pipe):
    return pipe.encode_prompt(PROMPT, negative_prompt="a cat")


def call(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 1)
    kwargs.setdefault("output_type", "latent")
    return pipe(**kwargs)


@pytest.mark.parametrize("size", [dict(height=18), dict(width=22), dict(height=15, width=16)])
def test_size_not_divisible(pipe, size):
    name = next(iter(size))
    with pytest.raises(ValueError, match=rf"`{name}`=.* multiple of vae_scale_factor \* patch_size = 4"):
        call(pipe, prompt=PROMPT, **size)


def test_prompt_and_prompt_embeds(pipe, embeds):
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        call(pipe, prompt=PROMPT, prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2])


def test_neither_prompt_nor_prompt_embeds(pipe):
    with pytest.raises(ValueError, match="Pass `prompt` or `prompt_embeds`"):
        call(pipe)


def test_prompt_embeds_without_pooled(pipe, embeds):
    with pytest.raises(ValueError, match="`prompt_embeds` needs `pooled_prompt_embeds`"):
        call(pipe, prompt_embeds=embeds[0])
    with pytest.raises(ValueError, match="`negative_prompt_embeds` needs `negative_pooled_prompt_embeds`"):
        call(pipe, prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2], negative_prompt_embeds=embeds[1])


def test_negative_embeds_of_another_shape(pipe, embeds):
    with pytest.raises(ValueError, match="`negative_prompt_embeds` has shape .* but `prompt_embeds`"):
        call(
            pipe,
            prompt_embeds=embeds[0],
            pooled_prompt_embeds=embeds[2],
            negative_prompt_embeds=embeds[1][:, :-1],
            negative_pooled_prompt_embeds=embeds[3],
        )


def test_mask_of_another_shape(pipe, embeds):
    with pytest.raises(ValueError, match="`prompt_attention_mask` has shape"):
        call(pipe, prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2],
             prompt_attention_mask=torch.ones(1, 5, dtype=torch.long))


def test_generator_list_of_wrong_length(pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match=r"`generator` is a list of 3 .* effective batch size is 4"):
        call(pipe, prompt=[PROMPT, "a blue square"], num_images_per_prompt=2, generator=generators)


def test_unknown_output_type(pipe):
    with pytest.raises(ValueError, match="Unknown `output_type` 'jpeg'"):
        call(pipe, prompt=PROMPT, output_type="jpeg")


@pytest.mark.parametrize("steps", [0, -1])
def test_num_inference_steps_below_one(pipe, steps):
    with pytest.raises(ValueError, match="`num_inference_steps` must be an integer >= 1"):
        call(pipe, prompt=PROMPT, num_inference_steps=steps)


def test_unknown_callback_tensor_names(pipe):
    with pytest.raises(ValueError, match=r"`callback_on_step_end_tensor_inputs` has unknown names \['noise'\]"):
        call(pipe, prompt=PROMPT, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents", "noise"])


def test_latents_of_wrong_shape(pipe):
    with pytest.raises(ValueError, match="`latents` has shape"):
        call(pipe, prompt=PROMPT, latents=torch.zeros(1, 4, 4, 4))


def test_max_sequence_length_beyond_the_transformer(pipe):
    with pytest.raises(ValueError, match=rf"`max_sequence_length`={T5_TOKENS + 1} is too long.*at most {T5_TOKENS}"):
        call(pipe, prompt=PROMPT, max_sequence_length=T5_TOKENS + 1)


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = " ".join(["red circle"] * 50)  # 100 words: 102 CLIP tokens with BOS/EOS, 101 T5 tokens with EOS
    with caplog.at_level(logging.WARNING, logger="mmdit_diffusers"):
        embeds, _, _, _ = pipe.encode_prompt(long_prompt, do_classifier_free_guidance=False, max_sequence_length=16)
    assert embeds.shape[1] == 77 + 16
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("`tokenizer`" in m and "25 tokens at the end were dropped" in m for m in messages), messages
    assert any("`tokenizer_2`" in m and "25 tokens at the end were dropped" in m for m in messages), messages
    assert any("`tokenizer_3`" in m and "85 tokens at the end were dropped" in m for m in messages), messages


def test_encoder_without_its_tokenizer(pipe):
    with pytest.raises(ValueError, match="`text_encoder_3` and `tokenizer_3` together"):
        MMDiTPipeline(**{**pipe.components, "tokenizer_3": None})


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    pipe.save_pretrained(path)
    return path


def test_folder_missing_a_component(saved, tmp_path):
    broken = tmp_path / "no-vae"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match="component `vae` .* folder `vae/` is missing"):
        MMDiTPipeline.from_pretrained(broken)

    unlisted = tmp_path / "unlisted"
    shutil.copytree(saved, unlisted)
    index = json.loads((unlisted / "model_index.json").read_text())
    del index["transformer"]
    (unlisted / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no `transformer` component"):
        MMDiTPipeline.from_pretrained(unlisted)


def test_pickled_lora_is_refused(pipe, tmp_path):
    torch.save({"transformer.x.lora_A.weight": torch.zeros(1)}, tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        pipe.load_lora_weights(tmp_path)  # only a .bin in the folder
    with pytest.raises(ValueError, match="Refusing to load a pickled LoRA"):
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="Refusing to load a pickled LoRA"):
        pipe.load_lora_weights(os.fspath(tmp_path / "pytorch_lora_weights.bin"))


def test_a_callback_that_returns_no_dict_is_named(pipe):
    def callback(pipeline, step, timestep, tensors):
        return tensors["latents"]  # a tensor, not {"latents": ...}

    with pytest.raises(ValueError, match="callback_on_step_end` must return a dict .* returned a Tensor"):
        pipe("a red circle", num_inference_steps=1, output_type="latent", callback_on_step_end=callback)
    replaced = pipe("a red circle", num_inference_steps=1, output_type="latent",
                    callback_on_step_end=lambda *args: None).images  # None: nothing replaced
    assert replaced.shape[0] == 1
