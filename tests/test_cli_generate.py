"""The command line: every command's --help without torch, one exit status for bad input, and `generate` and
`evaluate` on a tiny pipeline folder."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from tiny_pipeline import tiny_mmdit_pipeline

from mmdit_diffusers.cli import commands, generate
from mmdit_diffusers.cli import main as dispatch
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.shapes import shipped

HEAVY = ("torch", "diffusers", "transformers")


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


def test_generate_cache_interval_runs_the_transformer_on_fewer_steps(pipeline_dir, tmp_path, capsys, monkeypatch):
    calls, load = [0], shipped.load_pipeline

    def counting_load(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.transformer.proj_out.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return pipe

    monkeypatch.setattr(shipped, "load_pipeline", counting_load)
    images, counts = [], []
    for extra in ([], ["--cache_interval", "1"], ["--cache_interval", "2"]):
        calls[0] = 0
        path = tmp_path / f"{len(images)}.png"
        code, _, _ = run_generate(capsys, "a red circle", "--model", pipeline_dir, "--steps", "10", "--output",
                                  str(path), *extra)
        assert code == 0
        images.append(Image.open(path).tobytes())
        counts.append(calls[0])
    assert counts == [10, 10, 8]  # every 2nd step after 6 full ones: 7 and 9 predicted
    assert images[1] == images[0]


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
    assert generate.main(["a cat", "--steps", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert generate.main(["a cat", "--cache_interval", "0"]) == 2
    err = capsys.readouterr().err
    assert "--cache_interval" in err and "positive integer" in err


def test_missing_shipped_pipeline_names_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setattr(shipped, "SHIPPED_PIPELINE", tmp_path / "missing")
    with pytest.raises(InputError, match="pass --model"):
        shipped.resolve_model(None)


def test_evaluate_prints_the_table_and_writes_json_and_grid(pipeline_dir, tmp_path, capsys):
    scores, grid = tmp_path / "scores.json", tmp_path / "grid.png"
    code = dispatch(["evaluate", "--model", pipeline_dir, "--limit", "6", "--steps", "2", "--batch_size", "3",
                          "--json", str(scores), "--grid", str(grid)])
    out = capsys.readouterr().out
    assert code == 0 and "| category | accuracy |" in out and "| overall |" in out
    data = json.loads(scores.read_text())
    assert data["prompts"] == 6 and 0.0 <= data["scores"]["overall"] <= 1.0
    assert Image.open(grid).size[0] > 0


def test_evaluate_cache_interval_reaches_the_transformer(pipeline_dir, tmp_path, capsys, monkeypatch):
    from mmdit_diffusers.shapes import evaluation

    loaded = []
    monkeypatch.setattr(evaluation, "load_pipeline", lambda *a, **k: loaded.append(shipped.load_pipeline(*a, **k))
                        or loaded[-1])
    code = dispatch(["evaluate", "--model", pipeline_dir, "--limit", "2", "--steps", "2", "--cache_interval", "3",
                     "--grid", str(tmp_path / "grid.png")])
    assert code == 0 and loaded[0].transformer._cache_config.cache_interval == 3


def test_evaluate_refuses_a_grid_that_is_not_a_png(tmp_path, capsys):
    assert dispatch(["evaluate", "--grid", str(tmp_path / "grid.jpg")]) == 2
    assert "expected a .png" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_commands_pass_only_the_sampler_settings_given_on_the_command_line():
    """The rest come from the pipeline folder (its `sampler_defaults`), for the shipped pipeline as for any other."""
    assert shipped.call_arguments(None, None) == {}
    assert shipped.call_arguments(7, None) == {"num_inference_steps": 7}
    assert shipped.call_arguments(None, 2.5) == {"guidance_scale": 2.5}


# ----------------------------------------------------------------------------------------------------------
# The dispatcher
# ----------------------------------------------------------------------------------------------------------
def test_every_entry_point_is_a_command():
    assert list(commands()) == ["generate", "train", "convert", "push", "evaluate", "dataset", "vae",
                                "text-encoders", "base", "export", "probe"]


def test_unknown_command_is_a_usage_error(capsys):
    assert dispatch(["paint"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'paint'" in err and "generate" in err and "text-encoders" in err


@pytest.mark.parametrize("command", [None, *commands()])
def test_help_answers_without_importing_torch_diffusers_or_transformers(command):
    """Parsers come from light modules: `--help` (and usage errors) answer at once, in a fresh interpreter."""
    argv = ["--help"] if command is None else [command, "--help"]
    code = ("import sys; from mmdit_diffusers.cli import main; code = main(sys.argv[1:]); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "usage: mmdit-diffusers" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
