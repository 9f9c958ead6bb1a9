"""Testbed world: scenes, captions, parser, rendering, prompt sets, training data."""

import json

import numpy as np
import pytest

from diffalign.testbed import (
    COLOURS,
    HELDOUT_PAIRS,
    ObjectGroup,
    PromptParseError,
    Scene,
    TestbedReward,
    caption,
    enumerate_scenes,
    heldout_prompts,
    is_heldout,
    is_target_style,
    load_training_set,
    make_training_set,
    parse_caption,
    read_prompts,
    render,
    sample_scene,
    train_prompts,
    write_prompts,
    write_training_set,
)


def test_caption_templates():
    s = Scene((ObjectGroup("red", "circle", 2, "small"),), prefix="a photo of")
    assert caption(s) == "a photo of two small red circles"
    s = Scene((ObjectGroup("blue", "square"),), position="left", prefix="")
    assert caption(s) == "a blue square on the left"
    s = Scene((ObjectGroup("green", "triangle", 1, "large"), ObjectGroup("white", "circle", 2)), prefix="an image of")
    assert caption(s) == "an image of a large green triangle and two white circles"
    s = Scene((ObjectGroup("yellow", "square"),), position="top", prefix="")
    assert caption(s) == "a yellow square at the top"


def test_scene_validation():
    with pytest.raises(ValueError, match="colour"):
        ObjectGroup("pink", "circle")
    with pytest.raises(ValueError, match="at most 3"):
        Scene((ObjectGroup("red", "circle", 3), ObjectGroup("blue", "square", 1)))
    with pytest.raises(ValueError, match="exactly one object"):
        Scene((ObjectGroup("red", "circle", 2),), position="left")


def test_parser_round_trips_every_generable_caption():
    scenes = list(enumerate_scenes())
    assert len(scenes) > 20_000
    captions = [caption(s) for s in scenes]
    assert len(set(captions)) == len(captions)  # the grammar is unambiguous
    for s, c in zip(scenes, captions):
        assert parse_caption(c) == s, c
    # sample_scene only produces enumerated scenes
    space = set(scenes)
    rng = np.random.default_rng(0)
    for _ in range(500):
        assert sample_scene(rng) in space


def test_parser_tolerance_and_errors():
    assert parse_caption("  A Red Circle. ") == Scene((ObjectGroup("red", "circle"),), prefix="")
    assert parse_caption("one blue square on the top").position == "top"
    assert parse_caption("a photo of three green triangles").groups[0].count == 3
    for bad in ("a photo of a cat", "two red", "a pink circle", "four red circles", "", "two red circles on the left"):
        with pytest.raises(PromptParseError) as e:
            parse_caption(bad)
        assert isinstance(e.value, ValueError)
        assert repr(bad) in str(e.value)


@pytest.mark.parametrize("res", [32, 64])
def test_render_deterministic(res):
    s = sample_scene(3)
    a, b = render(s, res, seed=5), render(s, res, seed=5)
    assert a.shape == (res, res, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(s, res, seed=6))


def test_styles():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(40)]
    plain = np.stack([render(s, 32, None, i) for i, s in enumerate(scenes)])
    warm = np.stack([render(s, 32, "warm", i) for i, s in enumerate(scenes)])
    outl = np.stack([render(s, 32, "outline", i) for i, s in enumerate(scenes)])
    assert not is_target_style(plain).any()
    assert is_target_style(warm).all()
    assert not np.array_equal(plain, outl)
    with pytest.raises(ValueError, match="style"):
        render(scenes[0], 32, "neon")


def test_prompt_splits(tmp_path):
    tr, ho = train_prompts(300), heldout_prompts(100)
    assert tr == train_prompts(300) and ho == heldout_prompts(100)  # deterministic
    assert len(set(tr)) == 300 and len(set(ho)) == 100 and not set(tr) & set(ho)
    assert not any(is_heldout(parse_caption(p)) for p in tr)
    assert all(is_heldout(parse_caption(p)) for p in ho)
    seen = {(g.colour, g.shape) for p in tr for g in parse_caption(p).groups}
    assert not seen & HELDOUT_PAIRS and len(seen) == 12
    assert {c for c, _ in HELDOUT_PAIRS} == set(COLOURS)  # only combinations are novel
    write_prompts(tr[:5], tmp_path / "p.txt")
    write_prompts(tr[:5], tmp_path / "p.jsonl")
    assert read_prompts(tmp_path / "p.txt") == tr[:5] == read_prompts(tmp_path / "p.jsonl")
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0]) == {"prompt": tr[0]}


@pytest.mark.parametrize("fmt", ["parquet", "imagefolder"])
def test_training_set(tmp_path, fmt):
    data = make_training_set(24, resolution=32, seed=1)
    assert data == data and len(data) == 24
    caps = [c for c, _ in data]
    imgs = np.stack([im for _, im in data])
    assert imgs.shape == (24, 32, 32, 3) and imgs.dtype == np.uint8
    assert [c for c, _ in make_training_set(24, resolution=32, seed=1)] == caps
    assert not is_target_style(imgs).any()  # default style only
    assert TestbedReward().evaluate(imgs, caps)["score"].mean() >= 0.99
    write_training_set(data, tmp_path / "ds", format=fmt)
    back = load_training_set(tmp_path / "ds")
    assert [c for c, _ in back] == caps
    assert np.abs(np.stack([im for _, im in back]).astype(int) - imgs).mean() < 3  # JPEG q95
    if fmt == "parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(next((tmp_path / "ds").glob("*.parquet")))
        assert t.column_names == ["caption", "image"]
        assert str(t.schema.field("image").type) == "binary"


def test_tinted_style_spreads_the_hidden_taste():
    """The base models' training style: backgrounds vary along the warm axis (so pairs carry a
    taste signal) but never reach the full target style, and plain draws are unchanged."""
    from diffalign.testbed.pairs import background_warmth

    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, p_two_groups=0.0) for _ in range(200)]
    tinted = np.stack([render(s, 32, "tinted", i) for i, s in enumerate(scenes)])
    warmth = background_warmth(tinted)
    assert warmth.std() > 0.2 and (warmth == 0).mean() > 0.3 and warmth.max() > 0.6
    assert is_target_style(tinted).mean() < 0.35
    warm = np.stack([render(s, 32, "warm", i) for i, s in enumerate(scenes)])
    assert background_warmth(warm).mean() > warmth.max() - 0.1
    from diffalign.testbed import testbed_reward

    # the verifiable reward reads tinted images as well as plain ones
    caps = [caption(s) for s in scenes]
    assert float(testbed_reward(tinted, caps).scores.mean()) > 0.97


def test_job_prompt_splits_are_disjoint_by_scene():
    from diffalign.testbed.prompts import HELDOUT_PAIRS, job_prompt_splits, scene_key

    s = job_prompt_splits(150, 48, 24, seed=0, p_two_groups=0.0)
    assert (len(s["train"]), len(s["indist"]), len(s["compositional"])) == (150, 48, 24)
    assert s == job_prompt_splits(150, 48, 24, seed=0, p_two_groups=0.0)  # deterministic
    train_keys = {scene_key(t) for t in s["train"]}
    indist_keys = {scene_key(t) for t in s["indist"]}
    assert len(indist_keys) == 48 and not (train_keys & indist_keys)
    assert s["indist"] == job_prompt_splits(100, 48, 24, seed=0, p_two_groups=0.0)["indist"]  # stable in n_train
    for t in s["train"] + s["indist"]:
        assert not is_heldout(parse_caption(t))
    assert all(any((g.colour, g.shape) in HELDOUT_PAIRS for g in parse_caption(t).groups) for t in s["compositional"])
    assert scene_key("a photo of a red circle") == scene_key("a red circle") != scene_key("a red circle on the left")


def test_background_tone_captions_renders_and_noisy_training_captions():
    """A named background tone round-trips through the caption, is drawn on its side of grey, and
    ``background_accuracy`` sets the share of training captions that name the drawn tone; with
    ``p_background=0`` scenes (and so every earlier prompt set) are unchanged."""
    from diffalign.testbed.reward import background_tint
    from diffalign.testbed.world import perturb_scene

    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [sample_scene(rng_a) for _ in range(50)] == [sample_scene(rng_b, p_background=0.0) for _ in range(50)]
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, p_background=0.5) for _ in range(400)]
    named = [s for s in scenes if s.background]
    assert 150 < len(named) < 250 and {s.background for s in named} == {"warm", "cool"}
    for s in named[:40]:
        assert parse_caption(caption(s)) == s
        tint = background_tint(render(s, 32, "plain", seed=7)[None])[0]
        assert (tint > 0) == (s.background == "warm"), (caption(s), tint)
        flipped = perturb_scene(s, rng, ("background",))
        assert flipped.background != s.background and flipped.groups == s.groups
    samples = make_training_set(1500, 32, 0, style="tinted", background_accuracy=0.7, p_background=1.0)
    caps = [c for c, _ in samples]
    tints = background_tint(np.stack([im for _, im in samples]))
    clear = np.abs(tints) > 0.1  # the measured tint of a near-grey render can have either sign
    right = np.mean([("warm background" in c) == (t > 0) for c, t, k in zip(caps, tints, clear) if k])
    assert 0.65 < right < 0.75
    exact = make_training_set(300, 32, 0, style="tinted", p_background=1.0)
    tints = background_tint(np.stack([im for _, im in exact]))
    # (large objects on the border ring can pull the median off: a few, not many)
    assert np.mean([("warm background" in c) == (t > 0) for (c, _), t in zip(exact, tints) if abs(t) > 0.1]) > 0.98


def test_washed_out_objects_fade_toward_the_background_and_the_reward_misreads_them():
    """``render(fade=f)`` mixes the share ``f`` of the background into every object's colour
    (``fade=0`` draws exactly what it drew before); the verifiable reward scores faded ground-truth
    renders lower the stronger the fade, down to nothing once the objects are closer to the
    background than to any palette colour; ``make_training_set(washed_out=w)`` fades about that
    share of the images, and ``washed_out=0`` draws the same set as before the option existed."""
    from diffalign.testbed.reward import TestbedReward, background_colour
    from diffalign.testbed.world import FADE_RANGE

    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, p_two_groups=0.0) for _ in range(120)]
    caps = [caption(s) for s in scenes]
    plain = np.stack([render(s, 32, "tinted", seed=i) for i, s in enumerate(scenes)])
    assert np.array_equal(plain, np.stack([render(s, 32, "tinted", seed=i, fade=0.0) for i, s in enumerate(scenes)]))
    half = np.stack([render(s, 32, "tinted", seed=i, fade=0.5) for i, s in enumerate(scenes)]).astype(float)
    bg = background_colour(plain)[:, None, None, :]
    # pixels move halfway to the background (up to uint8 rounding; saturated channels, clipped at
    # 255 in the unfaded render, and a border median pulled off by an object are the exceptions)
    assert np.percentile(np.abs(half - (bg + 0.5 * (plain - bg))), 97) < 2.0
    reward = TestbedReward()
    scores = [reward.evaluate(np.stack([render(s, 32, "tinted", seed=i, fade=f) for i, s in enumerate(scenes)]), caps)["score"].mean()
              for f in (0.0, 0.3, 0.45, 0.6)]
    assert scores[0] == 1.0 and scores[0] > scores[1] > scores[2] > scores[3] and scores[3] < 0.05, scores
    with pytest.raises(ValueError, match="fade"):
        render(scenes[0], 32, fade=1.0)

    before = make_training_set(200, 32, 4, style="tinted", p_two_groups=0.0)
    assert all(c0 == c1 and np.array_equal(a, b) for (c0, a), (c1, b) in
               zip(before, make_training_set(200, 32, 4, style="tinted", washed_out=0.0, p_two_groups=0.0)))
    def contrast(washed_out: float) -> np.ndarray:  # per image: its pixel farthest from the background
        ims = np.stack([im for _, im in make_training_set(400, 32, 4, style="tinted", washed_out=washed_out, p_two_groups=0.0)])
        return np.linalg.norm(ims.astype(float) - background_colour(ims)[:, None, None, :], axis=-1).reshape(len(ims), -1).max(1)

    # the same scenes and draws, all faded: (1 - fade) for the images the 0.3 set left unfaded
    ratio = contrast(1.0) / np.maximum(contrast(0.3), 1e-6)
    faded = ratio > 0.98  # an image faded in both sets keeps its contrast
    assert 0.2 < faded.mean() < 0.4
    lo, hi = FADE_RANGE
    assert np.all((ratio[~faded] > 1 - hi - 0.05) & (ratio[~faded] < 1 - lo + 0.05))
