"""`mmdit-diffusers generate` and `evaluate` on a tiny pipeline folder."""

import json

import pytest
from PIL import Image
from tiny_pipeline import tiny_mmdit_pipeline

from mmdit_diffusers.cli import common, evaluate, generate


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    tiny_mmdit_pipeline(seed=0, layout="clip_t5").save_pretrained(folder)
    return str(folder)


def run_generate(capsys, *argv):
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_a_png_and_prints_its_path(pipeline_dir, tmp_path, capsys):
    target = tmp_path / "out" / "image.png"
    code, out, _ = run_generate(capsys, "a red circle", "--model", pipeline_dir, "--steps", "2", "--output", str(target))
    assert code == 0 and out.strip() == str(target)
    assert Image.open(target).size == (16, 16)
    assert not [p for p in target.parent.iterdir() if p.name != "image.png"]  # no temporary files left


def test_generate_several_images_writes_a_grid(pipeline_dir, tmp_path, capsys):
    target = tmp_path / "grid.png"
    code, _, _ = run_generate(capsys, "two blue squares", "--model", pipeline_dir, "--steps", "2",
                              "--num_images", "4", "--output", str(target))
    assert code == 0 and Image.open(target).size == (32, 32)


def test_generate_is_seeded(pipeline_dir, tmp_path, capsys):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (1, 1, 2)):
        run_generate(capsys, "a red circle", "--model", pipeline_dir, "--steps", "2", "--seed", str(seed), "--output", str(path))
    a, b, c = (Image.open(p).tobytes() for p in paths)
    assert a == b and a != c


def test_generate_default_output_name_comes_from_the_prompt():
    assert generate.default_output("A red circle, left of!") == "outputs/a-red-circle-left-of.png"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a cat", "--model", "/no/such/folder"], "--model /no/such/folder"),
        (["a cat", "--model", "{empty}"], "no model_index.json"),
        (["a cat", "--model", "{pipeline}", "--output", "{tmp}/x.jpg"], "expected a .png"),
    ],
)
def test_generate_bad_input_is_a_clear_error(pipeline_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", pipeline=pipeline_dir, tmp=tmp_path) for a in argv]
    code, out, err = run_generate(capsys, *argv)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


def test_generate_rejects_non_positive_steps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["a cat", "--steps", "0"])
    assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_missing_shipped_pipeline_names_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "DEFAULT_PIPELINE", tmp_path / "missing")
    with pytest.raises(common.CommandError, match="pass --model"):
        common.resolve_model(None)


def test_evaluate_prints_the_table_and_writes_json_and_grid(pipeline_dir, tmp_path, capsys):
    scores, grid = tmp_path / "scores.json", tmp_path / "grid.png"
    code = evaluate.main(["--model", pipeline_dir, "--limit", "6", "--steps", "2", "--batch_size", "3",
                          "--json", str(scores), "--grid", str(grid)])
    out = capsys.readouterr().out
    assert code == 0 and "| category | accuracy |" in out and "| overall |" in out
    data = json.loads(scores.read_text())
    assert data["prompts"] == 6 and 0.0 <= data["scores"]["overall"] <= 1.0
    assert Image.open(grid).size[0] > 0


def test_sampler_settings_use_the_shipped_defaults_only_for_the_shipped_pipeline():
    assert common.sampler_settings(None, None, None) == common.DEFAULT_PIPELINE_CALL
    assert common.sampler_settings(None, 7, None)["num_inference_steps"] == 7
    assert common.sampler_settings("some/folder", None, None) == {}
    assert common.sampler_settings("some/folder", None, 2.5) == {"guidance_scale": 2.5}
