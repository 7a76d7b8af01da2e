"""Push to and pull from the Hub (the local server of tests/hub_server.py, through the real client over HTTP):
round trips of the transformer, the pipeline and a LoRA, revisions and branches, the model card, and the errors."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import tempfile
import traceback
import uuid

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import PushToHubMixin
from huggingface_hub import HfApi, ModelCard, hf_hub_download, list_repo_files, model_info, upload_file
from hub_fixtures import HUB_TOKEN, HUB_USER, OTHER_TOKEN, hub_repo_id, hub_server, no_retry_waits  # noqa: F401
from peft import LoraConfig, get_peft_model_state_dict

from mmdit_diffusers import MMDiTTransformer2DModel, hub
from mmdit_diffusers.hub import HubError, push_folder, translate_hub_error
from mmdit_diffusers.hub.model_card import GENERATED_END, GENERATED_START
from mmdit_diffusers.pipelines import MMDiTPipeline
from tiny_pipeline import tiny_mmdit_transformer

PROMPT = "a red circle left of a blue square"
STEPS = 2
BAD_TOKEN = "hf_wrong_token_do_not_print_123456"
MODEL_FILES = (".safetensors", ".json", ".txt", ".model")


def test_importing_the_hub_changes_nothing_in_diffusers():
    code = ("from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES as L; import copy; "
            "before = copy.deepcopy(L); import mmdit_diffusers.hub; assert L == before, 'changed'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout's package, as in this process
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.fixture(scope="module")
def pushed_pipeline(hub_server, pipe):
    """The tiny pipeline pushed to the branch `v1` of a fresh repo: (repo_id, commit)."""
    repo_id = f"{HUB_USER}/pipeline-{uuid.uuid4().hex[:8]}"
    return repo_id, hub.push_to_hub(pipe, repo_id, revision="v1")


@pytest.fixture
def all_logs(caplog):
    """caplog at DEBUG, also for the libraries whose loggers do not propagate to the root logger."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "diffusers", "transformers", "mmdit_diffusers",
                                                     "httpx", "httpx2", "httpcore")]
    saved = [(lg, lg.level) for lg in loggers]
    caplog.set_level(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(caplog.handler)
    yield caplog
    for lg, level in saved:
        lg.removeHandler(caplog.handler)
        lg.setLevel(level)


def generate(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=3.0, output_type="np", generator=generator).images


def forward(model):
    torch.manual_seed(1)
    cfg = model.config
    kwargs = dict(
        hidden_states=torch.randn(1, cfg.in_channels, 8, 8),
        encoder_hidden_states=torch.randn(1, 12, cfg.txt_dim),
        pooled_projections=torch.randn(1, cfg.cond_dim),
        timestep=torch.tensor([500.0]),
    )
    with torch.no_grad():
        return model(**kwargs).sample


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def model_files_under(root) -> list[str]:
    """Files a failed pull must not leave for the caller (the client's own `.incomplete` files excepted)."""
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if f.endswith(MODEL_FILES)]
    return found


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------
def test_transformer_round_trip_revisions_and_pr(hub_repo_id, tmp_path):
    model = tiny_mmdit_transformer(seed=0)
    first = hub.push_to_hub(model, hub_repo_id, private=True, commit_message="first weights")
    assert first.oid and str(first).endswith(first.oid)  # a str: the commit URL; .oid: the sha
    info = model_info(hub_repo_id, files_metadata=True)
    assert info.private is True and info.sha == first.oid
    files = {s.rfilename for s in info.siblings}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)  # safetensors only
    assert HfApi().list_repo_commits(hub_repo_id)[0].title == "first weights"

    loaded = MMDiTTransformer2DModel.from_pretrained(hub_repo_id, cache_dir=tmp_path / "cache")
    assert_same_weights(model, loaded)
    # Bit-identical weights; the forward may differ in the last float bit (the same after a local save/load).
    torch.testing.assert_close(forward(loaded), forward(model), rtol=0, atol=1e-6)

    # A second push moves main; the first commit stays loadable by its sha.
    changed = tiny_mmdit_transformer(seed=1)
    second = hub.push_to_hub(changed, hub_repo_id)
    assert second.oid != first.oid
    assert_same_weights(changed, MMDiTTransformer2DModel.from_pretrained(hub_repo_id, cache_dir=tmp_path / "cache"))
    old = MMDiTTransformer2DModel.from_pretrained(hub_repo_id, revision=first.oid, cache_dir=tmp_path / "cache")
    assert_same_weights(model, old)
    offline = MMDiTTransformer2DModel.from_pretrained(
        hub_repo_id, revision=first.oid, cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert_same_weights(model, offline)

    # Pushing unchanged weights makes no new commit; a pull request leaves main alone.
    assert hub.push_to_hub(changed, hub_repo_id).oid == second.oid
    pr = hub.push_to_hub(model, hub_repo_id, create_pr=True, commit_message="propose the old weights")
    assert pr.pr_revision == "refs/pr/1" and pr.pr_url
    assert model_info(hub_repo_id).sha == second.oid
    assert_same_weights(model, MMDiTTransformer2DModel.from_pretrained(hub_repo_id, revision="refs/pr/1",
                                                                       cache_dir=tmp_path / "cache"))


def test_pipeline_round_trip_on_a_branch(pushed_pipeline, pipe, tmp_path):
    repo_id, commit = pushed_pipeline
    api = HfApi()
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "v1"}
    assert list_repo_files(repo_id) == [".gitattributes"]  # the branch was created from main, main untouched
    files = set(list_repo_files(repo_id, revision="v1"))
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert any(f.startswith(f"{component}/") and f.endswith(".safetensors") for f in files), component
    for tokenizer in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert any(f.startswith(f"{tokenizer}/") for f in files), tokenizer
    assert "model_index.json" in files and "README.md" in files

    pulled = MMDiTPipeline.from_pretrained(repo_id, revision="v1", cache_dir=tmp_path / "cache")
    pulled.set_progress_bar_config(disable=True)
    assert type(pulled.transformer) is MMDiTTransformer2DModel
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"):
        assert_same_weights(getattr(pipe, name), getattr(pulled, name))
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert type(getattr(pulled, name)) is type(getattr(pipe, name))
        assert getattr(pulled, name)(PROMPT).input_ids == getattr(pipe, name)(PROMPT).input_ids
    np.testing.assert_allclose(generate(pulled), generate(pipe), rtol=0, atol=1e-6)

    # One component by `subfolder`, pinned to the commit.
    transformer = MMDiTTransformer2DModel.from_pretrained(
        repo_id, subfolder="transformer", revision=commit.oid, cache_dir=tmp_path / "cache"
    )
    assert_same_weights(pipe.transformer, transformer)


def test_lora_push_and_load_by_repo_id(hub_repo_id, pipe, tmp_path):
    donor = copy.deepcopy(pipe.transformer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    donor.add_adapter(config)
    local = tmp_path / "lora"
    MMDiTPipeline.save_lora_weights(local, transformer_lora_layers=get_peft_model_state_dict(donor),
                                    transformer_lora_adapter_metadata=config.to_dict())
    commit = push_folder(local, hub_repo_id, card_data={"base_model": "test-user/tiny-base"})
    assert "pytorch_lora_weights.safetensors" in list_repo_files(hub_repo_id)

    base = generate(pipe)
    images = {}
    for name, source in (("local", local), ("hub", hub_repo_id)):
        pipe.load_lora_weights(source, adapter_name=name)
        try:
            images[name] = generate(pipe)
        finally:
            pipe.unload_lora_weights()
    np.testing.assert_array_equal(images["hub"], images["local"])
    assert np.abs(images["hub"] - base).max() > 1e-3
    np.testing.assert_array_equal(generate(pipe), base)

    card = ModelCard.load(hub_repo_id)
    assert "lora" in card.data.tags and card.data.base_model == "test-user/tiny-base"
    assert f'pipe.load_lora_weights("{hub_repo_id}")' in card.text
    assert "| rank / alpha | 4 / 8 |" in card.text
    assert commit.oid == model_info(hub_repo_id).sha


def test_diffusers_own_push_to_hub_and_from_pretrained_work_on_our_classes(hub_repo_id, pipe, tmp_path):
    """The classes keep diffusers' methods (no mixin of ours): they upload loadable weights and load them back."""
    for cls in (MMDiTTransformer2DModel, MMDiTPipeline):
        assert cls.push_to_hub is PushToHubMixin.push_to_hub
    model = tiny_mmdit_transformer(seed=0)
    model.push_to_hub(hub_repo_id)
    assert_same_weights(model, MMDiTTransformer2DModel.from_pretrained(hub_repo_id, cache_dir=tmp_path / "cache"))

    pipeline_repo = f"{hub_repo_id}-pipeline"
    pipe.push_to_hub(pipeline_repo)
    assert "model_index.json" in list_repo_files(pipeline_repo)
    pulled = MMDiTPipeline.from_pretrained(pipeline_repo, cache_dir=tmp_path / "cache")
    assert type(pulled.transformer) is MMDiTTransformer2DModel
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"):
        assert_same_weights(getattr(pipe, name), getattr(pulled, name))


def test_save_pretrained_push_to_hub_uploads_the_weights(hub_repo_id, tmp_path):
    """`save_pretrained(push_to_hub=True)` is diffusers' own path: the weights arrive and load."""
    model = tiny_mmdit_transformer(seed=0)
    model.save_pretrained(str(tmp_path / "saved"), push_to_hub=True, repo_id=hub_repo_id)
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= set(list_repo_files(hub_repo_id))
    assert_same_weights(model, MMDiTTransformer2DModel.from_pretrained(hub_repo_id, cache_dir=tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------
def test_model_card_metadata_body_and_user_edits_survive(hub_repo_id, tmp_path):
    model = tiny_mmdit_transformer(seed=0)
    sample = PIL.Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    hub.push_to_hub(
        model,
        hub_repo_id,
        card_data={"license": "mit", "datasets": ["test-user/shapes"], "training": {"optimizer steps": 10},
                   "scores": {"shapes accuracy": 0.25}},
        sample_images=[(PROMPT, sample)],
    )
    card = ModelCard.load(hub_repo_id)
    data = card.data
    assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
    assert {"mmdit", "mmdit-diffusers", "text-to-image", "diffusers"} <= set(data.tags)
    assert data.license == "mit" and data.datasets == ["test-user/shapes"]
    assert data.widget == [{"text": PROMPT, "output": {"url": "images/sample_0.png"}}]
    with PIL.Image.open(hf_hub_download(hub_repo_id, "images/sample_0.png", cache_dir=tmp_path)) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(sample))
    n_params = sum(p.numel() for p in model.parameters())
    text = card.text
    assert f'MMDiTTransformer2DModel.from_pretrained("{hub_repo_id}")' in text
    assert "| depth (double-stream blocks) | 2 |" in text and "| hidden size | 32 |" in text
    assert "| attention heads | 2 (head size 16) |" in text
    assert f"({n_params:,})" in text
    assert "| optimizer steps | 10 |" in text and "| shapes accuracy | 0.25 |" in text
    assert "## Limitations" in text

    # The user edits the card on the Hub: more metadata, another license and tag, their own text.
    user_meta = {**data.to_dict(), "license": "cc-by-4.0", "language": ["en"], "my_key": {"nested": 1},
                 "tags": [*data.tags, "user-tag"]}
    from huggingface_hub import ModelCardData

    user_text = text.replace("## Limitations", "## My notes\n\nUser text that must survive.\n\n## Limitations")
    user_text = "Intro line written by the user.\n\n" + user_text
    edited = f"---\n{ModelCardData(**user_meta).to_yaml()}\n---\n{user_text}"
    upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id=hub_repo_id)

    hub.push_to_hub(model, hub_repo_id, card_data={"scores": {"shapes accuracy": 0.75}, "datasets": ["test-user/more"]})
    card = ModelCard.load(hub_repo_id, ignore_metadata_errors=True)
    assert card.data.license == "cc-by-4.0"  # kept: this push gave no license
    assert card.data.language == ["en"] and card.data.my_key == {"nested": 1}
    assert "user-tag" in card.data.tags and "mmdit" in card.data.tags
    assert card.data.datasets == ["test-user/shapes", "test-user/more"]
    assert card.data.widget == data.widget  # no new samples: the widget stays
    assert "Intro line written by the user." in card.text and "User text that must survive." in card.text
    assert "| shapes accuracy | 0.75 |" in card.text and "0.25" not in card.text  # the generated part is updated
    assert card.text.count(GENERATED_START) == 1 and card.text.count(GENERATED_END) == 1

    # A hand-written card without our section keeps all of its text; the section is appended.
    upload_file(path_or_fileobj=b"---\nlicense: other\n---\n# Mine\n\nHand written.\n", path_in_repo="README.md",
                repo_id=hub_repo_id)
    hub.push_to_hub(model, hub_repo_id)
    card = ModelCard.load(hub_repo_id)
    assert card.text.lstrip().startswith("# Mine\n\nHand written.\n") and GENERATED_START in card.text
    assert card.data.license == "other" and "mmdit" in card.data.tags


def test_card_written_into_a_folder_is_the_one_push_uploads(hub_repo_id, tmp_path):
    """`write_model_card` (a training run's card) and the push share one writer: the pushed card keeps the text
    written beside the weights, and updates the generated part for the repo."""
    folder = tmp_path / "run"
    tiny_mmdit_transformer(seed=0).save_pretrained(folder)
    (folder / "validation").mkdir()
    inside = folder / "validation" / "final.png"
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(inside)
    outside = PIL.Image.fromarray(np.full((8, 8, 3), 9, dtype=np.uint8))
    path = hub.write_model_card(
        folder,
        card_data={"description": "Trained with rectified flow.", "training": {"method": "LoRA rank 4"},
                   "tags": ["diffusers-training"]},
        sample_images=[("a grid", inside), ("a gray square", outside)],
    )
    card = ModelCard.load(path)
    assert path == folder / "README.md" and card.text.lstrip().startswith("# run\n")
    assert "Trained with rectified flow." in card.text and "| method | LoRA rank 4 |" in card.text
    assert "![a grid](validation/final.png)" in card.text and "![a gray square](images/sample_1.png)" in card.text
    assert np.array_equal(np.asarray(PIL.Image.open(folder / "images" / "sample_1.png")), np.asarray(outside))
    assert {"diffusers-training", "mmdit"} <= set(card.data.tags) and card.data.library_name == "diffusers"
    assert 'MMDiTTransformer2DModel.from_pretrained("' + str(folder) + '")' in card.text

    push_folder(folder, hub_repo_id)
    pushed = ModelCard.load(hub_repo_id)
    assert "Trained with rectified flow." in pushed.text and "| method | LoRA rank 4 |" not in pushed.text
    assert f'MMDiTTransformer2DModel.from_pretrained("{hub_repo_id}")' in pushed.text
    assert "![a grid](validation/final.png)" in pushed.text  # no new samples: the card's samples stay
    assert {"validation/final.png", "images/sample_1.png"} <= set(list_repo_files(hub_repo_id))


def test_card_without_a_prompt_has_no_generation_line(tmp_path):
    tiny_mmdit_transformer(seed=0).save_pretrained(tmp_path)
    text = hub.write_model_card(tmp_path, card_data={"base_model": "test-user/base"}).read_text()
    assert 'MMDiTPipeline.from_pretrained("test-user/base", transformer=transformer)' in text
    assert "image = pipe(" not in text
    text = hub.write_model_card(tmp_path, card_data={"prompt": "a cat"}).read_text()
    assert 'image = pipe("a cat").images[0]' in text


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_wrong_token_is_a_clear_401_and_never_shown(hub_repo_id, pushed_pipeline, tmp_path, all_logs, capfd):
    model = tiny_mmdit_transformer(seed=0)
    hub.push_to_hub(model, hub_repo_id, token=HUB_TOKEN)  # a good explicit token: not shown either
    with pytest.raises(HubError) as push_error:
        hub.push_to_hub(model, hub_repo_id, token=BAD_TOKEN)
    with pytest.raises(HubError) as pull_error:
        hub.from_pretrained(MMDiTPipeline, pushed_pipeline[0], revision="v1", token=BAD_TOKEN, cache_dir=tmp_path / "c")
    for error in (push_error.value, pull_error.value):
        assert error.status == 401 and isinstance(error, (RuntimeError, OSError))
        assert str(error).startswith("authentication failed (401): check your token")
        assert "hf auth login" in str(error)
    assert "HTTP Request" in all_logs.text or "Pushing" in all_logs.text  # the logs were captured
    shown = all_logs.text + "".join(capfd.readouterr())
    for error in (push_error, pull_error):
        shown += "".join(traceback.format_exception(error.value)) + repr(error.value)
    assert BAD_TOKEN not in shown and HUB_TOKEN not in shown
    assert model_files_under(tmp_path / "c") == []


def test_other_users_namespace_is_forbidden(hub_repo_id):
    with pytest.raises(HubError, match=r"permission denied \(403\) on other-user/") as error:
        hub.push_to_hub(tiny_mmdit_transformer(seed=0), hub_repo_id.replace(HUB_USER, "other-user"))
    assert error.value.status == 403


def test_missing_repo_revision_and_cache(pushed_pipeline, tmp_path):
    repo_id, _ = pushed_pipeline
    missing = f"{HUB_USER}/does-not-exist-{uuid.uuid4().hex[:6]}"
    for cls in (MMDiTPipeline, MMDiTTransformer2DModel):
        with pytest.raises(HubError, match=rf"repository {missing} not found \(404\): check the name or create it"):
            hub.from_pretrained(cls, missing, cache_dir=tmp_path / "c")
    with pytest.raises(HubError, match=r"revision 'no-such-branch' not found in repository"):
        hub.from_pretrained(MMDiTPipeline, repo_id, revision="no-such-branch", cache_dir=tmp_path / "c")
    with pytest.raises(HubError, match=r"not in the local cache and local_files_only=True"):
        hub.from_pretrained(MMDiTPipeline, repo_id, revision="v1", local_files_only=True, cache_dir=tmp_path / "c")
    # The private repo of another user looks missing to us.
    HfApi(token=OTHER_TOKEN).create_repo("other-user/secret", private=True, exist_ok=True)
    with pytest.raises(HubError, match="repository other-user/secret not found"):
        hub.from_pretrained(MMDiTTransformer2DModel, "other-user/secret", cache_dir=tmp_path / "c")
    assert model_files_under(tmp_path / "c") == []


def test_hub_down_push_and_pull(hub_server, pushed_pipeline, hub_repo_id, tmp_path, monkeypatch, no_retry_waits):
    repo_id, _ = pushed_pipeline
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # where push stages the saved model
    model = tiny_mmdit_transformer(seed=0)
    hub_server.stop()
    try:
        with pytest.raises(HubError) as push_error:
            hub.push_to_hub(model, hub_repo_id)
        with pytest.raises(HubError) as pull_error:
            hub.from_pretrained(MMDiTPipeline, repo_id, revision="v1", cache_dir=tmp_path / "c")
    finally:
        hub_server.start()
    for error in (push_error.value, pull_error.value):
        assert str(error).startswith(f"cannot reach the Hub at {hub_server.url}")
        assert "check your network or HF_ENDPOINT" in str(error)
        assert error.reason == "network"
    assert os.listdir(work) == []  # the staging folder is gone
    assert model_files_under(tmp_path / "c") == []
    assert not HfApi().repo_exists(hub_repo_id)


def test_translated_conflict_and_server_errors():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def http_error(status, message):
        request = httpx2.Request("POST", "http://hub.invalid/api/repos/create")
        response = httpx2.Response(status, request=request, headers={"X-Error-Message": message})
        return HfHubHTTPError(f"{status} error", response=response, server_message=message)

    conflict = translate_hub_error(http_error(409, "A branch with this name already exists"), "me/repo")
    assert conflict.status == 409 and str(conflict).startswith("conflict (409) on me/repo")
    assert "A branch with this name already exists" in str(conflict)
    server = translate_hub_error(http_error(503, "busy"), "me/repo", endpoint="http://hub.invalid")
    assert str(server) == "the Hub at http://hub.invalid answered 503: it is having trouble, retry later"
    assert translate_hub_error(ValueError("not a Hub error"), "me/repo") is None


def test_folder_without_safetensors_or_model_is_refused(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text('{"_class_name": "MMDiTTransformer2DModel"}')
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="no .safetensors weights"):
        push_folder(tmp_path / "pickled", f"{HUB_USER}/never")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a saved model, pipeline or LoRA folder"):
        push_folder(tmp_path / "other", f"{HUB_USER}/never")
    with pytest.raises(ValueError, match="is a commit sha"):
        push_folder(tmp_path / "pickled", f"{HUB_USER}/never", revision="0" * 40)
