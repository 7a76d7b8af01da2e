"""Specification of the "Shapes" world: generator, caption grammar, held-out split, prompt set, scorer."""

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmdit_diffusers.shapes import (
    CATEGORIES,
    COLOURS,
    HELD_OUT_RELATION_PAIRS,
    IMAGE_SIZE,
    OBJECT_KINDS,
    RELATIONS,
    SHAPES,
    ObjectKind,
    Scene,
    detect_objects,
    draw,
    enumerate_scenes,
    evaluate,
    evaluation_prompts,
    format_table,
    is_heldout_pair,
    judge,
    layout_scene,
    parse_caption,
    sample_example,
    sample_scene,
    score,
    write_dataset,
)
from mmdit_diffusers.shapes.render import MARGIN, MIN_GAP

WHITE = (255, 255, 255)


def test_world_constants_match_the_spec():
    assert IMAGE_SIZE == 64
    assert COLOURS == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (230, 200, 30),
        "purple": (140, 60, 180),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert RELATIONS == ("left of", "right of", "above", "below")
    assert CATEGORIES == ("single", "counting", "relation", "heldout")


# --- caption grammar ---------------------------------------------------------------------------


def test_parse_caption_reads_each_caption_form():
    assert parse_caption("a red circle") == Scene((ObjectKind("red", "circle"),))
    three = parse_caption("three purple triangles")
    assert three.objects == (ObjectKind("purple", "triangle"),) * 3 and three.category == "counting"
    relation = parse_caption("a green square above a yellow triangle")
    assert relation.objects == (ObjectKind("green", "square"), ObjectKind("yellow", "triangle"))
    assert relation.relation == "above" and relation.category == "relation"


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_scene_caption_parses_back_to_its_scene(category):
    for scene in enumerate_scenes(category):
        assert parse_caption(scene.caption) == scene
        assert scene.caption == scene.caption.lower()


def test_scene_counts_per_category():
    assert len(enumerate_scenes("single")) == 15
    assert len(enumerate_scenes("counting")) == 30
    held_out_scenes = 2 * 4 * len(HELD_OUT_RELATION_PAIRS)  # both orders, every relation word
    assert len(enumerate_scenes("heldout")) == held_out_scenes
    assert len(enumerate_scenes("relation")) == 15 * 14 * 4 - held_out_scenes


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a red hexagon",
        "A red circle",
        "a red circle ",
        "a orange square",
        "four red circles",
        "two red circle",
        "a red circles",
        "a red circle near a blue square",
        "a red circle left of a red circle",  # the two objects must differ
    ],
)
def test_parse_caption_rejects_bad_captions_naming_them(caption):
    with pytest.raises(ValueError, match=re.escape(repr(caption))):
        parse_caption(caption)


# --- generator -----------------------------------------------------------------------------------


def _pixel_box(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _pixel_centre(box):
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2, (y0 + y1) / 2


@pytest.mark.parametrize("category", CATEGORIES)
def test_generated_images_follow_the_spec(category):
    rng = np.random.default_rng(1)
    for _ in range(40):
        scene = sample_scene(rng, category)
        placements = layout_scene(scene, rng)
        image = draw(placements)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert [p.kind for p in placements] == list(scene.objects)  # right objects, right count

        allowed = {WHITE} | {COLOURS[kind.colour] for kind in scene.objects}
        assert {tuple(rgb) for rgb in image.reshape(-1, 3)} == allowed  # flat fill, white background

        boxes, ink = [], 0
        for p in placements:
            assert 14 <= p.size <= 22
            assert 0 <= p.x0 and p.x0 + p.size <= 64 and 0 <= p.y0 and p.y0 + p.size <= 64  # inside (the spec)
            assert MARGIN <= min(p.x0, p.y0) and max(p.x0, p.y0) + p.size <= 64 - MARGIN  # and off the edge
            crop = image[p.y0 : p.y0 + p.size, p.x0 : p.x0 + p.size]
            painted = np.all(crop == COLOURS[p.kind.colour], axis=-1)
            assert _pixel_box(painted) == (0, 0, p.size, p.size)  # the bounding box is exactly size x size
            boxes.append((p.x0, p.y0, p.x0 + p.size, p.y0 + p.size))
            ink += painted.sum()
        assert ink == np.any(image != 255, axis=-1).sum()  # nothing drawn outside the boxes
        for (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) in itertools.combinations(boxes, 2):
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0  # no overlap (the spec)
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= MIN_GAP > 0  # and white space between

        if scene.relation is not None:
            (ax, ay), (bx, by) = _pixel_centre(boxes[0]), _pixel_centre(boxes[1])
            offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}
            assert offset[scene.relation] >= 8


def test_shapes_fill_their_box_as_expected():
    rng = np.random.default_rng(2)
    fills = {shape: [] for shape in SHAPES}
    for _ in range(60):
        for p in layout_scene(sample_scene(rng, "single"), rng):
            crop = draw([p])[p.y0 : p.y0 + p.size, p.x0 : p.x0 + p.size]
            painted = np.any(crop != 255, axis=-1)
            fills[p.kind.shape].append(painted.mean())
            if p.kind.shape == "triangle":  # upright: the base is the full bottom row
                assert painted[-1].all() and painted[0].sum() <= 2
    assert all(f == 1.0 for f in fills["square"])
    assert all(0.75 < f < 0.82 for f in fills["circle"])
    assert all(0.5 < f < 0.6 for f in fills["triangle"])


def test_sample_example_returns_a_64px_rgb_image_and_a_valid_caption():
    rng = np.random.default_rng(3)
    for _ in range(20):
        image, caption = sample_example(rng)
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
        assert parse_caption(caption).category in ("single", "counting", "relation")


# --- held-out compositions -----------------------------------------------------------------------


def test_heldout_pairs_are_a_small_fixed_set_of_distinct_object_pairs():
    assert 4 <= len(HELD_OUT_RELATION_PAIRS) <= 6
    assert len({frozenset(pair) for pair in HELD_OUT_RELATION_PAIRS}) == len(HELD_OUT_RELATION_PAIRS)
    for a, b in HELD_OUT_RELATION_PAIRS:
        assert a in OBJECT_KINDS and b in OBJECT_KINDS and a != b
        assert is_heldout_pair(a, b) and is_heldout_pair(b, a)


def test_training_sampling_never_produces_a_heldout_relation():
    rng = np.random.default_rng(4)
    for category in (None, "relation"):
        scenes = [sample_scene(rng, category) for _ in range(3000)]
        assert not any(scene.category == "heldout" for scene in scenes)
    relations = {scene for scene in scenes if scene.relation}
    assert len(relations) > 700  # training relations are spread over (nearly) all allowed scenes


def test_heldout_relations_come_only_on_request():
    rng = np.random.default_rng(5)
    assert all(sample_scene(rng, "heldout").category == "heldout" for _ in range(50))
    mixed = [sample_scene(rng, "relation", allow_heldout=True).category for _ in range(2000)]
    assert "heldout" in mixed and "relation" in mixed


def test_category_weights_set_the_training_mix():
    rng = np.random.default_rng(6)
    weights = {"single": 1, "counting": 0, "relation": 3}
    categories = [sample_scene(rng, category_weights=weights).category for _ in range(4000)]
    assert "counting" not in categories and "heldout" not in categories
    assert 0.70 < categories.count("relation") / len(categories) < 0.80


@pytest.mark.parametrize("weights", [
    {"single": 1, "counting": 1},
    {"single": 1, "counting": 1, "relation": 1, "heldout": 1},
    {"single": -1, "counting": 1, "relation": 1},
    {"single": 0, "counting": 0, "relation": 0},
    {"single": float("nan"), "counting": 1, "relation": 1},
])
def test_bad_category_weights_are_refused(weights, tmp_path):
    with pytest.raises(ValueError, match="category_weights"):
        sample_scene(np.random.default_rng(0), category_weights=weights)
    with pytest.raises(ValueError, match="category_weights"):
        write_dataset(tmp_path / "shapes", 2, seed=0, category_weights=weights)
    assert not list(tmp_path.iterdir())


# --- dataset files -------------------------------------------------------------------------------


def test_write_dataset_writes_an_imagefolder_with_training_captions(tmp_path):
    out = write_dataset(tmp_path / "shapes", num_images=12, seed=7)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"{i:05d}.png" for i in range(12)]
    for line in lines:
        assert set(line) == {"file_name", "text"}
        assert parse_caption(line["text"]).category in ("single", "counting", "relation")
        with Image.open(out / line["file_name"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            assert score(image, line["text"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no staging directory left


def test_write_dataset_is_deterministic_and_does_not_clobber(tmp_path):
    first = write_dataset(tmp_path / "a", 6, seed=11)
    second = write_dataset(tmp_path / "b", 6, seed=11)
    other = write_dataset(tmp_path / "c", 6, seed=12)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files)
    assert (first / "metadata.jsonl").read_text() != (other / "metadata.jsonl").read_text()

    with pytest.raises(FileExistsError):
        write_dataset(first, 3, seed=0)
    write_dataset(first, 3, seed=0, overwrite=True)
    assert len((first / "metadata.jsonl").read_text().splitlines()) == 3
    assert len(list(first.glob("*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


# --- evaluation prompts --------------------------------------------------------------------------


def test_evaluation_prompts_are_a_fixed_set_covering_every_category():
    prompts = evaluation_prompts()
    assert len(prompts) >= 300
    assert prompts == evaluation_prompts(seed=0)
    assert prompts != evaluation_prompts(seed=1)
    for caption, category in prompts:
        assert parse_caption(caption).category == category
    by_category = {c: [p.caption for p in prompts if p.category == c] for c in CATEGORIES}
    assert all(len(captions) >= 60 for captions in by_category.values())
    assert set(by_category["heldout"]) == {s.caption for s in enumerate_scenes("heldout")}
    assert len(set(by_category["relation"])) == len(by_category["relation"])


# --- scorer --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ground_truth():
    """80 (image, caption) pairs per category, drawn by the generator."""
    rng = np.random.default_rng(8)
    return [sample_example(rng, category) for category in CATEGORIES for _ in range(80)]


def _accuracy(pairs):
    return evaluate([image for image, _ in pairs], [caption for _, caption in pairs])


def test_scorer_accepts_ground_truth_images(ground_truth):
    results = _accuracy(ground_truth)
    assert set(results) == {*CATEGORIES, "overall"}
    assert all(accuracy >= 0.99 for accuracy in results.values()), results


def test_detect_objects_recovers_the_drawn_objects():
    rng = np.random.default_rng(9)
    for _ in range(50):
        placements = layout_scene(sample_scene(rng, "counting"), rng)
        found = sorted(detect_objects(draw(placements)), key=lambda o: o.centre)
        assert [(o.colour, o.shape) for o in found] == [(p.kind.colour, p.kind.shape) for p in placements]
        for o, p in zip(found, sorted(placements, key=lambda p: p.centre)):
            assert np.allclose(o.centre, p.centre, atol=1.0)  # a triangle's apex pixel may be dropped


def test_scorer_rejects_mismatched_captions(ground_truth):
    captions = [caption for _, caption in ground_truth]
    shuffled = [(image, captions[(i + 97) % len(captions)]) for i, (image, _) in enumerate(ground_truth)]
    assert _accuracy(shuffled)["overall"] < 0.05


def _near_miss(scene: Scene) -> Scene:
    """The scene with exactly one thing wrong: a colour, a count, or the relation reversed."""
    if scene.relation is not None:
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return Scene(scene.objects, opposite[scene.relation])
    kind = scene.objects[0]
    if len(scene.objects) == 1:
        colours = list(COLOURS)
        other = ObjectKind(colours[(colours.index(kind.colour) + 1) % len(colours)], kind.shape)
        return Scene((other,))
    return Scene((kind,) * (5 - len(scene.objects)))  # two <-> three


def test_scorer_rejects_near_miss_captions(ground_truth):
    near_misses = [(image, _near_miss(parse_caption(caption)).caption) for image, caption in ground_truth]
    assert _accuracy(near_misses)["overall"] == 0.0


def test_scorer_rejects_the_wrong_shape_and_extra_objects():
    rng = np.random.default_rng(10)
    for _ in range(30):
        scene = sample_scene(rng, "single")
        image = draw(layout_scene(scene, rng))
        kind = scene.objects[0]
        for shape in SHAPES:
            assert score(image, f"a {kind.colour} {shape}") == (shape == kind.shape)
    pair = draw(layout_scene(Scene((ObjectKind("red", "circle"),) * 2), rng))
    assert not score(pair, "a red circle")
    assert not score(pair, "three red circles")


def test_scorer_tolerates_mild_blur_and_noise(ground_truth):
    rng = np.random.default_rng(11)

    def degrade(image):
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        noisy = blurred + rng.normal(0.0, 12.0, blurred.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)

    results = _accuracy([(degrade(image), caption) for image, caption in ground_truth])
    assert all(accuracy >= 0.95 for accuracy in results.values()), results


def test_scorer_accepts_arrays_and_other_image_sizes(ground_truth):
    for image, caption in ground_truth[::20]:
        assert score(np.asarray(image), caption)
        assert score(image.resize((128, 128), Image.Resampling.NEAREST), caption)
        assert score(image.resize((256, 256), Image.Resampling.BILINEAR), caption)


def test_judge_explains_a_failure():
    blank = Image.new("RGB", (64, 64), WHITE)
    verdict = judge(blank, "a red circle")
    assert not verdict.passed and verdict.objects == ()
    assert "found 0" in verdict.reason


def test_speckle_noise_is_not_an_object():
    rng = np.random.default_rng(12)
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    ys, xs = rng.integers(0, 64, size=(2, 60))
    image[ys, xs] = COLOURS["blue"]
    assert detect_objects(image) == []


def test_format_table_lists_every_result():
    results = {"single": 1.0, "counting": 0.5, "relation": 0.25, "heldout": 0.0, "overall": 0.4375}
    table = format_table(results)
    assert table.splitlines()[0] == "| category | accuracy |"
    assert "| counting | 50.0% |" in table and "| overall | 43.8% |" in table
    assert len(table.splitlines()) == 7
