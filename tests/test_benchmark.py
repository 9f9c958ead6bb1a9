"""``diffalign benchmark``: GenEval on a tiny pipeline with a tiny random Mask2Former and tiny CLIP (official
results.jsonl keys, per-task summary, resume after a kill gives the same results), the one-line error for a
missing prompt file, OCR with a tiny TrOCR, the prompt-file readers, and ``diffalign compare`` on two
benchmark dirs (per-task paired deltas). Offline."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.rewards import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

# GenEval's evaluation_metadata.jsonl schema (one row per task, and a second single_object)
GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "person", "count": 1}], "prompt": "a photo of a person"},
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "two_object", "include": [{"class": "person", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a person and a dog"},
    {"tag": "counting", "include": [{"class": "person", "count": 2}], "exclude": [{"class": "person", "count": 3}],
     "prompt": "a photo of two persons"},
    {"tag": "colors", "include": [{"class": "person", "count": 1, "color": "red"}], "prompt": "a photo of a red person"},
    {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "person", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a person left of a cat"},
]
OFFICIAL_KEYS = ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]


@pytest.fixture(scope="module")
def geneval_files(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("geneval_bench")
    meta = root / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_ROWS))
    return {"meta": str(meta), "m2f": str(tiny.build_mask2former(root / "m2f")), "clip": str(tiny.build_clip(root / "clip"))}


def _geneval(model, files, out, *extra):
    return main(["-q", "benchmark", "geneval", "--model", model, "--prompts", files["meta"], "--out", str(out),
                 "--reward-path", files["m2f"], "--reward-opt", f"color_model={files['clip']}", "--steps", "2",
                 "--batch-size", "3", *extra])


def _results(d):
    return [json.loads(line) for line in (Path(d) / "results.jsonl").read_text().splitlines()]


def _csv(d):
    with open(Path(d) / "per_image.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def geneval_run(tiny_model, geneval_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "full"
    assert _geneval(tiny_model("sd15"), geneval_files, out) == 0
    return out


def test_geneval_official_results_and_summary(geneval_run):
    results = _results(geneval_run)
    assert len(results) == 6 * 4  # four images per prompt (diffusers_generate.py --n_samples 4)
    assert all(list(r) == OFFICIAL_KEYS for r in results)
    assert results[0]["filename"] == str(geneval_run / "images/00000/samples/00000.png")
    assert all(isinstance(r["correct"], bool) for r in results)
    assert all((r["reason"] == "") == r["correct"] for r in results)  # GenEval's failures only, none when correct
    assert not any("(strict)" in r["reason"] for r in results)
    assert json.loads(results[0]["metadata"]) == GENEVAL_ROWS[0]
    details = json.loads(results[0]["details"])
    assert all(len(box) == 5 for boxes in details.values() for box in boxes)  # mmdet's [x0, y0, x1, y1, score]
    # GenEval's layout: NNNNN/metadata.jsonl (the row) and NNNNN/samples/KKKKK.png
    assert json.loads((geneval_run / "images/00003/metadata.jsonl").read_text()) == GENEVAL_ROWS[3]
    assert sorted(p.name for p in (geneval_run / "images/00003/samples").iterdir()) == [f"{k:05d}.png" for k in range(4)]

    s = json.loads((geneval_run / "summary.json").read_text())
    tasks = s["scores"]["tasks"]
    assert set(tasks) == {"single_object", "two_object", "counting", "colors", "position"}
    for t, acc in tasks.items():  # summary_scores.py: per task, the mean of the images' correct flags
        flags = [r["correct"] for r in results if r["tag"] == t]
        assert acc == pytest.approx(sum(flags) / len(flags))
    assert s["scores"]["overall"] == pytest.approx(sum(tasks.values()) / len(tasks))
    assert s["headline"]["overall"] == pytest.approx(s["scores"]["overall"])
    # the task-weighted column's mean is the overall score; each task column's mean its accuracy
    assert s["rewards"]["geneval.overall"]["mean"] == pytest.approx(s["scores"]["overall"])
    for t, acc in tasks.items():
        assert s["rewards"][f"geneval.{t}"]["mean"] == pytest.approx(acc)
        assert s["rewards"][f"geneval.{t}"]["n"] == sum(r["tag"] == t for r in results)
    rows = _csv(geneval_run)
    assert [r["seed"] for r in rows[:4]] == ["42", "43", "44", "45"] == [r["seed"] for r in rows[4:8]]
    assert (geneval_run / "summary.md").read_text().count("geneval.") >= 6
    assert (geneval_run / "grid.png").is_file()


def test_geneval_resume_after_a_kill_gives_the_same_results(tiny_model, geneval_files, geneval_run, tmp_path):
    model = tiny_model("sd15")
    out = tmp_path / "resumed"
    assert _geneval(model, geneval_files, out, "--limit", "2") == 0  # a partial run ...
    assert len(_results(out)) == 8
    for p in [out / "images/00001/samples/00002.png", out / "images/00000/samples/00000.png"]:
        p.unlink()  # ... killed before these were written
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert _geneval(model, geneval_files, out) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert all(after[p] == t for p, t in before.items())  # images on disk were not regenerated
    assert len(after) == 24
    for p in (geneval_run / "images").rglob("*.png"):
        assert (out / p.relative_to(geneval_run)).read_bytes() == p.read_bytes()

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "filename"} for r in rows]

    assert strip(_results(out)) == strip(_results(geneval_run))
    a, b = json.loads((out / "summary.json").read_text()), json.loads((geneval_run / "summary.json").read_text())
    assert a["scores"] == b["scores"] and a["rewards"] == b["rewards"]
    assert a["generated"] == 24 - 8 + 2
    # resuming with other generation settings is refused in one line
    assert _geneval(model, geneval_files, out, "--seed", "0") == 2


def test_missing_prompt_file_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["benchmark", "geneval", "--model", "nowhere", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "evaluation_metadata.jsonl" in err and "github.com/djghosh13/geneval" in err and "--prompts" in err
    rc = main(["benchmark", "ocr", "--model", "nowhere", "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "no.txt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no.txt: no such file" in err and "flow_grpo" in err
    assert not (tmp_path / "o").exists()


def test_ocr_benchmark_with_a_tiny_trocr(tiny_model, tmp_path):
    pytest.importorskip("rapidfuzz")
    prompts = tmp_path / "test.txt"
    prompts.write_text('a sign that says "open"\na mug with "hello world" printed on it\n')
    ocr = tiny.build_ocr(tmp_path / "trocr")
    out = tmp_path / "ocr"
    rc = main(["-q", "benchmark", "ocr", "--model", tiny_model("sd15"), "--prompts", str(prompts), "--out", str(out),
               "--reward-path", str(ocr), "--steps", "2", "--resolution", "32"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    rows = _csv(out)
    assert len(rows) == 2 and s["reward_columns"] == ["ocr"]
    vals = [float(r["ocr"]) for r in rows]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert s["headline"]["mean"] == pytest.approx(sum(vals) / 2) == s["scores"]["ocr"]["mean"]
    assert s["config"]["steps"] == 2 and s["config"]["guidance"] == 4.5  # Flow-GRPO's eval guidance


def test_prompt_files_in_their_official_formats(tmp_path):
    from diffalign.eval.benchmarks import PROTOCOLS, build_items, load_prompts, select

    hps = tmp_path / "hps"
    hps.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hps / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(3)]))
    prompts = load_prompts(PROTOCOLS["hpsv2"], str(hps))
    assert len(prompts) == 12 and prompts[3] == ("concept-art 0", "concept-art", None)
    items = select(PROTOCOLS["hpsv2"], build_items(PROTOCOLS["hpsv2"], prompts, 1, 42), 2)
    assert [it.image for it in items[:3]] == ["images/anime/00000.png", "images/anime/00001.png", "images/concept-art/00000.png"]
    assert len(items) == 8  # --limit: the first 2 of each style
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nbird\tAnimals\tBasic\t\na red car\tVehicles\tColors\t\n")
    assert load_prompts(PROTOCOLS["partiprompts"], str(parti)) == [("bird", "Animals", None), ("a red car", "Vehicles", None)]
    draw = tmp_path / "drawbench.csv"
    draw.write_text('Prompts,Category\n"A red colored car.",Colors\n')
    assert load_prompts(PROTOCOLS["drawbench"], str(draw)) == [("A red colored car.", "Colors", None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    from diffalign.errors import UserError

    with pytest.raises(UserError, match="needs 'tag', 'include' and 'prompt'"):
        load_prompts(PROTOCOLS["geneval"], str(bad))


def test_group_columns_weight_to_the_group_mean():
    from diffalign.eval.benchmarks import Item, add_group_columns

    items = [Item(0, "a", "x", 0, "i0"), Item(1, "b", "x", 0, "i1"), Item(2, "c", "x", 0, "i2"), Item(3, "d", "y", 0, "i3")]
    rows = [{"r": 1.0}, {"r": 0.0}, {"r": 0.0}, {"r": 1.0}]
    cols, info = add_group_columns(items, rows, "r", "average")
    assert cols == ["r.average", "r.x", "r.y"]
    assert info["groups"] == {"x": pytest.approx(1 / 3), "y": 1.0}
    assert sum(r["r.average"] for r in rows) / 4 == pytest.approx(info["average"]) == pytest.approx(2 / 3)
    assert "r.y" not in rows[0] and rows[3]["r.y"] == 1.0


def test_compare_two_benchmark_dirs_gives_per_task_paired_deltas(tiny_model, geneval_files, geneval_run, tmp_path):
    from diffalign.eval.compare import compare

    other = tmp_path / "steps3"
    assert _geneval(tiny_model("sd15"), geneval_files, other, "--steps", "3") == 0
    res = compare([str(geneval_run), str(other)], str(tmp_path / "report"), base=str(geneval_run))
    row = next(r for r in res["rows"] if r["method"] == "steps3")
    a = json.loads((geneval_run / "summary.json").read_text())["scores"]
    b = json.loads((other / "summary.json").read_text())["scores"]
    assert row["geneval.overall_n_paired"] == 24
    assert row["geneval.overall_delta_mean"] == pytest.approx(b["overall"] - a["overall"])
    for t in a["tasks"]:
        assert row[f"geneval.{t}_n_paired"] == sum(r["tag"] == t for r in _results(geneval_run))
        assert row[f"geneval.{t}_delta_mean"] == pytest.approx(b["tasks"][t] - a["tasks"][t])
        lo, hi = row[f"geneval.{t}_delta_ci_low"], row[f"geneval.{t}_delta_ci_high"]
        assert math.isnan(lo) or lo <= row[f"geneval.{t}_delta_mean"] <= hi
    assert "geneval.single_object minus base" in res["table_md"]


def test_hpsv2_benchmark_scores_each_style_and_their_average(tiny_model, tmp_path):
    hps = tmp_path / "benchmark"
    hps.mkdir()
    for style, n in (("anime", 1), ("concept-art", 2), ("paintings", 1), ("photo", 1)):
        (hps / f"{style}.json").write_text(json.dumps([f"a {style} picture of a cat {i}" for i in range(n)]))
    out = tmp_path / "hps"
    rc = main(["-q", "benchmark", "hpsv2", "--model", tiny_model("sd15"), "--prompts", str(hps), "--out", str(out),
               "--reward-path", str(tiny.build_hpsv2(tmp_path / "hpsv2")), "--steps", "2"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    styles = s["scores"]["hpsv2"]["groups"]
    assert list(styles) == ["anime", "concept-art", "paintings", "photo"]
    assert s["headline"]["average"] == pytest.approx(sum(styles.values()) / 4)
    assert s["rewards"]["hpsv2.average"]["mean"] == pytest.approx(s["headline"]["average"])
    assert (out / "images/concept-art/00001.png").is_file() and len(_csv(out)) == 5


def test_bad_values_and_a_failed_load_leave_nothing_to_refuse_the_fix(tmp_path, capsys):
    prompts = tmp_path / "test.txt"
    prompts.write_text('a sign that says "open"\n')
    out = tmp_path / "o"
    base = ["benchmark", "ocr", "--prompts", str(prompts), "--out", str(out)]
    for flag, value in (("--batch-size", "0"), ("--steps", "0"), ("--resolution", "30")):
        assert main([*base, "--model", "nowhere", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and flag in err
        assert not out.exists()  # refused before anything is written
    # a model that does not load: the dir this run made is removed, so the corrected run is not refused
    assert main([*base, "--model", str(tmp_path / "no_model")]) == 2
    assert "no_model" in capsys.readouterr().err and not out.exists()
