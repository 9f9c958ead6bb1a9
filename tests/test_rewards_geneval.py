"""GenEval without mmcv: the official decision rules on synthetic detections (cases written from
GenEval's evaluate_images.py and Flow-GRPO's reward server), the transformers Mask2Former detector with a
tiny random checkpoint (save_pretrained -> from_pretrained), the CLIP colour classifier with a tiny CLIP, and
the reward through the registry. No network."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.errors import UserError
from diffalign.rewards import get_reward, tiny
from diffalign.rewards.geneval import (
    CLASSNAMES,
    COLORS,
    Detections,
    Rules,
    evaluate_detections,
    judge,
    relative_position,
    select_detections,
    summarize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def dets(*boxes, scores=None, colors=None) -> Detections:
    n = len(boxes)
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                      torch.tensor(scores if scores is not None else [0.95] * n), colors=colors)


def row(tag, include, exclude=None, prompt="p"):
    r = {"tag": tag, "include": include, "prompt": prompt}
    if exclude is not None:
        r["exclude"] = exclude
    return r


BOX = (10, 10, 20, 20)


# -- selection ------------------------------------------------------------------------------------

def test_threshold_is_strict_and_counting_uses_its_own():
    d = {"cat": dets(BOX, BOX, BOX, scores=[0.3, 0.31, 0.95])}
    kept = select_detections(d, "single_object")
    assert kept["cat"].scores.tolist() == pytest.approx([0.95, 0.31])  # 0.3 is not > 0.3; sorted
    assert select_detections(d, "counting")["cat"].scores.tolist() == pytest.approx([0.95])  # > 0.9
    assert select_detections({"cat": dets(BOX, scores=[0.9])}, "counting") == {}  # empty classes dropped


def test_max_objects_keeps_the_most_confident_and_overlap_off_by_default():
    scores = [0.4 + 0.01 * i for i in range(20)]
    kept = select_detections({"cup": dets(*[BOX] * 20, scores=scores)}, "two_object")["cup"]
    assert len(kept) == 16 and kept.scores[0] == pytest.approx(0.59) and kept.scores[-1] == pytest.approx(0.44)
    # identical boxes all survive (max_overlap 1.0); with max_overlap they are suppressed greedily
    nms = select_detections({"cup": dets(BOX, BOX, (50, 50, 60, 60), scores=[0.9, 0.8, 0.7])}, "x",
                            Rules(max_overlap=0.5))["cup"]
    assert nms.scores.tolist() == pytest.approx([0.9, 0.7])


# -- counting / single / two objects ----------------------------------------------------------------

COUNT3 = row("counting", [{"class": "dog", "count": 3}], [{"class": "dog", "count": 4}])


@pytest.mark.parametrize("n,correct,strict,partial", [
    (3, True, True, 1.0),            # exact
    (2, False, False, 2 / 3),        # too few
    (4, False, False, 2 / 3),        # too many: the exclude clause (and the exact count) fails
    (0, False, False, 0.0),
    (7, False, False, 0.0),          # count term 1 - 4/3 < 0 clipped at 0
])
def test_counting(n, correct, strict, partial):
    j = evaluate_detections({"dog": dets(*[BOX] * n, scores=[0.95] * n)}, COUNT3)
    assert (j.correct, j.strict) == (correct, strict)
    assert j.partial == pytest.approx(partial)
    assert j.tag == "counting"


def test_counting_threshold_drops_unsure_objects():
    j = evaluate_detections({"dog": dets(BOX, BOX, BOX, scores=[0.95, 0.95, 0.85])}, COUNT3)
    assert not j.correct and "expected dog>=3, found 2" in j.reason


def test_single_object_extra_copies_pass_geneval_but_not_strict():
    meta = row("single_object", [{"class": "cat", "count": 1}])
    j = evaluate_detections({"cat": dets(BOX, BOX)}, meta)
    assert j.correct and not j.strict and j.partial == pytest.approx(0.0)  # 1 - |2-1|/1
    j = evaluate_detections({"cat": dets(BOX)}, meta)
    assert j.correct and j.strict and j.partial == 1.0
    j = evaluate_detections({"dog": dets(BOX)}, meta)
    assert not j.correct and j.reason == "expected cat>=1, found 0"


def test_two_objects():
    meta = row("two_object", [{"class": "cat", "count": 1}, {"class": "computer keyboard", "count": 1}])
    assert evaluate_detections({"cat": dets(BOX), "computer keyboard": dets(BOX)}, meta).correct
    j = evaluate_detections({"cat": dets(BOX)}, meta)
    assert not j.correct and not j.strict and j.partial == pytest.approx(0.5)


def test_exclude_is_or_over_clauses():
    meta = row("counting", [{"class": "cat", "count": 1}], [{"class": "cat", "count": 2}, {"class": "dog", "count": 1}])
    assert evaluate_detections({"cat": dets(BOX)}, meta).correct
    j = evaluate_detections({"cat": dets(BOX), "dog": dets(BOX)}, meta)
    assert not j.correct and j.strict and "expected dog<1, found 1" in j.reason  # strict ignores excludes


# -- positions --------------------------------------------------------------------------------------

def test_relative_position_hand_computed():
    b = (100, 100, 120, 120)  # centre (110, 110), size 20
    assert relative_position((40, 100, 60, 120), b) == {"left of"}      # dx -60 -> shrunk -56
    assert relative_position((160, 100, 180, 120), b) == {"right of"}
    assert relative_position((100, 40, 120, 60), b) == {"above"}        # image y grows downwards
    assert relative_position((100, 160, 120, 180), b) == {"below"}
    assert relative_position((40, 40, 60, 60), b) == {"left of", "above"}  # diagonal: both at 0.66 > 0.5
    # margin 0.1 * (20 + 20) = 4: a centre offset of 3 is inside it (no relation); past it the shrunk
    # offset must still exceed half the offset: 7 -> 3/7 (none), 9 -> 5/9 (left of)
    assert relative_position((97, 100, 117, 120), b) == set()
    assert relative_position((93, 100, 113, 120), b) == set()
    assert relative_position((91, 100, 111, 120), b) == {"left of"}
    # a mostly vertical offset is not "left of" even when x differs (shrunk dx / |offset| <= 0.5)
    assert relative_position((80, 40, 100, 60), b) == {"above"}
    # the margin grows with the boxes: large boxes with the same centres are in no relation
    assert relative_position((0, 0, 200, 200), (20, 0, 220, 200)) == set()


@pytest.mark.parametrize("a_box,rel,ok", [
    ((0, 40, 20, 60), "left of", True), ((100, 40, 120, 60), "right of", True),
    ((50, 0, 70, 20), "above", True), ((50, 90, 70, 110), "below", True),
    ((0, 40, 20, 60), "right of", False), ((52, 40, 72, 60), "left of", False),  # inside the margin: wrong
])
def test_position_clause(a_box, rel, ok):
    meta = row("position", [{"class": "bench", "count": 1}, {"class": "cat", "count": 1, "position": [rel, 0]}])
    j = evaluate_detections({"bench": dets((50, 40, 70, 60)), "cat": dets(a_box)}, meta)
    assert (j.correct, j.strict) == (ok, ok)
    assert j.partial == pytest.approx(1.0 if ok else 2 / 3)
    if not ok:
        assert f"expected cat {rel} target" in j.reason


def test_position_without_target_group_fails():
    meta = row("position", [{"class": "bench", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    j = evaluate_detections({"cat": dets(BOX)}, meta)
    assert not j.correct and "no target for cat to be left of" in j.reason
    assert j.partial == pytest.approx(1 / 3)  # bench 0, cat count 1, position 0


def test_flow_grpo_partial_quirks():
    meta = row("position", [{"class": "bench", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    wrong = {"bench": dets((50, 40, 70, 60)), "cat": dets((100, 40, 120, 60))}
    assert judge(select_detections(wrong), meta, flow_grpo_partial=True).partial == pytest.approx(3 / 4)  # 1,1,0,1
    many = {"cat": dets(*[BOX] * 4)}
    single = row("single_object", [{"class": "cat", "count": 1}])
    assert judge(select_detections(many), single, flow_grpo_partial=True).partial == pytest.approx(-2.0)
    assert judge(select_detections(many), single).partial == 0.0


# -- colours ----------------------------------------------------------------------------------------

def test_colour_clauses_use_the_most_confident_objects():
    meta = row("color_attr", [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}])
    calls = []

    def color_fn(cls, group):
        calls.append((cls, len(group)))
        return {"car": ["red"], "bench": ["green"] * len(group)}[cls]

    objs = {"car": dets(BOX, BOX, scores=[0.8, 0.9]), "bench": dets(BOX)}
    j = evaluate_detections(objs, meta, color_fn)
    assert calls == [("car", 1), ("bench", 1)]  # only the top `count` objects are classified
    assert not j.correct and "expected blue bench>=1, found 0 blue; and 1 green" in j.reason
    # car: 2 found (strict and partial count 0), colour not counted; bench: count 1, colour 0
    assert not j.strict and j.partial == pytest.approx((0 + 0 + 1 + 0) / 4)
    colours = {"car": dets(BOX, colors=["red"]), "bench": dets(BOX, colors=["blue"])}
    j = evaluate_detections(colours, meta)  # colours already classified: no color_fn needed
    assert j.correct and j.strict and j.partial == 1.0


def test_colors_task_counts_the_colour_among_the_group():
    meta = row("colors", [{"class": "apple", "count": 1, "color": "green"}])
    ok = evaluate_detections({"apple": dets(BOX, BOX, scores=[0.9, 0.5], colors=["green", "red"])}, meta)
    assert ok.correct  # the most confident apple is green
    bad = evaluate_detections({"apple": dets(BOX, BOX, scores=[0.5, 0.9], colors=["green", "red"])}, meta)
    assert not bad.correct


def test_bad_metadata_is_rejected():
    with pytest.raises(ValueError, match="non-empty 'include'"):
        judge({}, {"tag": "x"})
    with pytest.raises(ValueError, match="unknown colour"):
        judge({}, row("colors", [{"class": "cat", "count": 1, "color": "teal"}]))
    with pytest.raises(ValueError, match="earlier include clause"):
        judge({}, row("position", [{"class": "cat", "count": 1, "position": ["left of", 0]}]))


def test_summary_is_the_mean_of_task_accuracies():
    results = [{"tag": "single_object", "correct": True}, {"tag": "single_object", "correct": True},
               {"tag": "counting", "correct": False}, {"tag": "counting", "correct": True},
               {"tag": "counting", "correct": True}, {"tag": "colors", "correct": False}]
    s = summarize(results)
    assert s["tasks"] == pytest.approx({"single_object": 1.0, "counting": 2 / 3, "colors": 0.0})
    assert s["overall"] == pytest.approx((1 + 2 / 3 + 0) / 3)   # not the image mean (4/6)
    assert s["correct_images"] == pytest.approx(4 / 6)
    assert s["missing_tasks"] == ["two_object", "position", "color_attr"]
    assert len(CLASSNAMES) == 80 and CLASSNAMES[64] == "computer mouse" and len(COLORS) == 10


# -- the transformers detector, tiny random checkpoint -------------------------------------------------

@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny.build_mask2former(tmp_path_factory.mktemp("geneval") / "m2f")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny.build_clip(tmp_path_factory.mktemp("geneval") / "clip")


def rand_images(n, seed=0, h=48, w=40):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].scores, b[k].scores, atol=1e-5, rtol=0)
        assert torch.equal(a[k].boxes, b[k].boxes) and torch.equal(a[k].masks, b[k].masks)


@pytest.mark.parametrize("pipeline", ["mmdet", "transformers"])
def test_tiny_mask2former_detector(m2f_dir, pipeline):
    from diffalign.rewards.geneval import Mask2FormerDetector

    det = Mask2FormerDetector(str(m2f_dir), device="cpu", pipeline=pipeline, batch_size=4, min_score=0.0)
    assert det.model.dtype == torch.float32 and det.model.device.type == "cpu"
    assert det.classnames == list(CLASSNAMES)
    imgs = rand_images(3)
    out = det(imgs)
    assert len(out) == 3 and all(out)
    for found in out:
        for cls, d in found.items():
            assert cls in CLASSNAMES and d.masks.dtype == torch.bool and d.masks.shape[1:] == (48, 40)
            assert d.boxes.shape == (len(d), 4) and d.scores.dtype == torch.float32
            assert bool((d.scores[:-1] >= d.scores[1:]).all())  # sorted
            assert bool((d.boxes[:, 2] <= 40).all() and (d.boxes[:, 3] <= 48).all())
    assert "person" in out[0] and float(out[0]["person"].scores[0]) > 0.3  # the builder's confident label
    one_by_one = [det(imgs[i:i + 1])[0] for i in range(3)]
    for a, b in zip(out, one_by_one):
        same(a, b)


def test_masks_to_boxes_is_mmdets_mask2bbox():
    from diffalign.rewards.geneval import masks_to_boxes

    m = torch.zeros(2, 6, 8, dtype=torch.bool)
    m[0, 1:3, 2:5] = True
    assert masks_to_boxes(m).tolist() == [[2, 1, 5, 3], [0, 0, 0, 0]]


def test_masked_crop_on_gray_and_tiny_clip_colours(clip_dir):
    from PIL import Image

    from diffalign.rewards.geneval import CLIPColorClassifier, masked_crops

    img = Image.new("RGB", (8, 6), (255, 0, 0))
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    mask[0, 2:4, 2:4] = True
    d = Detections(torch.tensor([[1.4, 1.6, 5, 5]]), torch.tensor([0.9]), mask)
    (crop,) = masked_crops(img, d)
    assert crop.size == (4, 3)  # PIL rounds the box: (1, 2, 5, 5)
    assert crop.getpixel((0, 0)) == (0x99, 0x99, 0x99) and crop.getpixel((1, 0)) == (255, 0, 0)
    clf = CLIPColorClassifier(str(clip_dir), device="cpu")
    w = clf.classifier("car")
    assert w.shape[1] == 10 and torch.allclose(w.norm(dim=0), torch.ones(10), atol=1e-5)
    colours = clf(img, Detections(torch.tensor([[0, 0, 8, 6], [1, 1, 5, 5]]), torch.tensor([0.9, 0.8])), "car")
    assert len(colours) == 2 and all(c in COLORS for c in colours)


# -- the reward ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def metadata_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("geneval") / "evaluation_metadata.jsonl"
    rows = [row("single_object", [{"class": "person", "count": 1}], prompt="a photo of a person"),
            row("color_attr", [{"class": "person", "count": 1, "color": "red"}, {"class": "cat", "count": 1, "color": "blue"}],
                prompt="a photo of a red person and a blue cat")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_through_registry(m2f_dir, clip_dir, metadata_file):
    reward = get_reward(f"geneval={m2f_dir}", metadata=str(metadata_file), color_model=str(clip_dir),
                        device="cpu", batch_size=2)
    assert not reward.loaded and reward.name == "geneval"
    imgs = rand_images(2, seed=1)
    prompts = ["a photo of a person", "a photo of a red person and a blue cat"]
    out = reward(imgs, prompts)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (2,)
    assert set(out.details) == {"geneval", "geneval_correct", "geneval_strict", "geneval_partial"}
    # the tiny detector finds persons above 0.3 but no cat: the first prompt is met, the second is not
    assert out.scores.tolist() == [1.0, 0.0]
    assert out.details["geneval_partial"][1] < 1
    judgements = reward.judge(imgs, prompts)
    assert "expected cat>=1, found 0" in judgements[1].reason
    # per-image metadata rows win over the lookup (the GRPO trainers pass .jsonl rows this way)
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "x"}, {}]
    assert reward(imgs, prompts, rows).scores.tolist() == [0.0, 0.0]
    partial = get_reward(f"geneval={m2f_dir}", metadata=str(metadata_file), color_model=str(clip_dir),
                         device="cpu", score="partial")
    torch.testing.assert_close(partial(imgs, prompts).scores, out.details["geneval_partial"])
    summary = reward.evaluate(imgs, prompts)
    assert summary["tasks"] == {"single_object": 1.0, "color_attr": 0.0} and summary["overall"] == 0.5


def test_unknown_prompt_and_missing_metadata_are_clear_errors(m2f_dir, clip_dir, metadata_file):
    from diffalign.rewards.geneval import GenEvalMetadataError

    imgs = rand_images(1)
    reward = get_reward(f"geneval={m2f_dir}", metadata=str(metadata_file), color_model=str(clip_dir), device="cpu")
    with pytest.raises(GenEvalMetadataError, match=r"prompt 'a photo of a dog' is not in .*evaluation_metadata.jsonl \(2 prompts\)"):
        reward(imgs, ["a photo of a dog"])
    bare = get_reward(f"geneval={m2f_dir}", color_model=str(clip_dir), device="cpu")
    with pytest.raises(ValueError, match="no GenEval metadata for prompt 'a photo of a dog'.*metadata=PATH"):
        bare(imgs, ["a photo of a dog"])
    with pytest.raises(UserError, match="does not exist"):
        get_reward("geneval", metadata="/no/such/file.jsonl")
    with pytest.raises(UserError, match="score must be one of correct, strict, partial"):
        get_reward("geneval", score="best")
