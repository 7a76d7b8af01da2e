"""`mmdit-diffusers push PATH REPO_ID` against the local Hub server (tests/hub_server.py)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download, list_repo_files, model_info
from hub_fixtures import HUB_TOKEN, HUB_USER, hub_repo_id, hub_server, no_retry_waits  # noqa: F401

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.cli import main as dispatch
from mmdit_diffusers.cli.push import main
from tiny_pipeline import tiny_mmdit_pipeline, tiny_mmdit_transformer

BAD_TOKEN = "hf_cli_wrong_token_never_printed_987"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-transformer")
    tiny_mmdit_transformer(seed=0).save_pretrained(path)
    return path


def test_push_transformer_folder_with_options(hub_repo_id, model_dir, tmp_path, capsys):
    image = tmp_path / "sample.png"
    PIL.Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    argv = [str(model_dir), hub_repo_id, "--private", "--revision", "v2", "--commit-message", "from the CLI",
            "--token", HUB_TOKEN, "--license", "mit", "--base-model", "test-user/base", "--dataset", "test-user/shapes",
            "--tag", "cli", "--sample", str(image), "a black square"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    commit_sha = HfApi().list_repo_commits(hub_repo_id, revision="v2")[0].commit_id
    assert f"pushed {model_dir} to {hub_repo_id}@v2: " in out and commit_sha in out
    assert HUB_TOKEN not in out + err

    assert model_info(hub_repo_id).private is True
    assert HfApi().list_repo_commits(hub_repo_id, revision="v2")[0].title == "from the CLI"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "images/sample_0.png"} <= set(
        list_repo_files(hub_repo_id, revision="v2")
    )
    card = ModelCard.load(hf_hub_download(hub_repo_id, "README.md", revision="v2", cache_dir=tmp_path / "c"))
    assert card.data.license == "mit" and card.data.base_model == "test-user/base"
    assert card.data.datasets == ["test-user/shapes"] and {"cli", "mmdit"} <= set(card.data.tags)
    assert card.data.widget == [{"text": "a black square", "output": {"url": "images/sample_0.png"}}]
    loaded = MMDiTTransformer2DModel.from_pretrained(hub_repo_id, revision="v2", cache_dir=tmp_path / "c")
    assert loaded.config.depth == 2


def test_push_pipeline_folder_through_the_dispatcher(hub_repo_id, tmp_path, capsys):
    folder = tmp_path / "pipeline"
    tiny_mmdit_pipeline(seed=0, layout="clip").save_pretrained(folder)
    assert dispatch(["push", str(folder), hub_repo_id, "--create-pr"]) == 0
    out = capsys.readouterr().out
    assert "opened pull request" in out
    files = list_repo_files(hub_repo_id, revision="refs/pr/1")
    assert "model_index.json" in files and "transformer/config.json" in files and "tokenizer/tokenizer.json" in files
    assert list_repo_files(hub_repo_id) == [".gitattributes"]  # main untouched
    assert dispatch(["push", str(folder), hub_repo_id]) == 0
    card = ModelCard.load(hub_repo_id)
    assert f'MMDiTPipeline.from_pretrained("{hub_repo_id}")' in card.text and card.data.pipeline_tag == "text-to-image"


def test_errors_print_a_message_and_exit_2(hub_repo_id, model_dir, tmp_path, capfd):
    assert main([str(model_dir), hub_repo_id, "--token", BAD_TOKEN]) == 2
    out, err = capfd.readouterr()
    assert err.startswith("error: authentication failed (401): check your token") and "hf auth login" in err
    assert "Traceback" not in err and BAD_TOKEN not in out + err

    assert main([str(tmp_path / "missing"), hub_repo_id]) == 2
    assert "is not a folder" in capfd.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), hub_repo_id]) == 2
    assert "not a saved model, pipeline or LoRA folder" in capfd.readouterr().err
    assert main([str(model_dir), "other-user/theirs"]) == 2
    assert capfd.readouterr().err.startswith("error: permission denied (403)")
    # A card whose metadata cannot be read is not overwritten: the owner is told to fix it.
    broken = b"---\nlicense: [mit\n---\n# Theirs\n"
    HfApi().create_repo(hub_repo_id)
    HfApi().upload_file(path_or_fileobj=broken, path_in_repo="README.md", repo_id=hub_repo_id)
    assert main([str(model_dir), hub_repo_id]) == 2
    assert "has invalid YAML metadata" in capfd.readouterr().err
    with open(hf_hub_download(hub_repo_id, "README.md", cache_dir=tmp_path / "c"), "rb") as f:
        assert f.read() == broken
    assert "config.json" not in list_repo_files(hub_repo_id)
    assert main([]) == 2  # usage error from argparse
    assert main(["--help"]) == 0


def test_hub_down(hub_server, hub_repo_id, model_dir, no_retry_waits, capfd):
    hub_server.stop()
    try:
        code = main([str(model_dir), hub_repo_id, "--token", HUB_TOKEN])
    finally:
        hub_server.start()
    out, err = capfd.readouterr()
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: cannot reach the Hub at {hub_server.url} (for {hub_repo_id}): check your network or HF_ENDPOINT"
    )
    assert "Traceback" not in err and HUB_TOKEN not in out + err
    assert HUB_USER in hub_repo_id and not HfApi().repo_exists(hub_repo_id)
