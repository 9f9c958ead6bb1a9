"""The task rewards of issue #26 inside a tiny GRPO run. OCR, with a stand-in engine that reads by
brightness, varies within a prompt group, so the advantages are non-zero and the LoRA trains (the
gradient path). The VLM judge (a stand-in OpenAI-compatible server scoring by caption) and GenEval
(a tiny random detector: one verdict per prompt) show their scores reach the trainer exactly, one
request per image, GenEval's metadata coming from the ``.jsonl`` prompt rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffalign.config import load_config

TINY = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny" / "grpo.yaml"
SMALL = ("max_steps=2", "sampler.num_steps=3", "prompts_per_step=2", "batch_size=4", "group_size=2",
         "train_batch_size=4", "eval.every=-1", "optim.learning_rate=3e-2")


def read_by_brightness(images):
    """A stand-in OCR engine: reads 1 to 4 letters of "open", by the image's mean grey level (mod 4),
    so two samples of one prompt almost surely read differently."""
    out = []
    for im in images:
        mean = int(sum(im.convert("L").getdata()) / (im.width * im.height))
        out.append("open"[: 1 + mean % 4])
    return out


def run(model: str, out: Path, *overrides: str) -> list[dict]:
    from diffalign.trainers.online import train_online

    train_online(load_config(TINY, [f"model={model}", f"output_dir={out}", *SMALL, *overrides]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lora_b_trained(out: Path) -> bool:
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    return any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())


def test_ocr_reward_trains_a_tiny_grpo_run(tiny_model, tmp_path):
    prompts = tmp_path / "ocr.txt"
    prompts.write_text('a shop sign that says "OPEN"\na poster with the word "open"\n')
    rows = run(tiny_model("sd3"), tmp_path / "run", f"data={prompts}",
               "rewards=[{name: ocr, args: {recognizer: 'test_task_rewards_train:read_by_brightness'}}]")
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    assert any(r["advantage_abs_mean"] > 0 for r in rows)  # the group's images read differently
    assert lora_b_trained(tmp_path / "run")


@pytest.fixture
def fake_judge():
    from test_rewards_vlm_judge import FakeJudge

    judge = FakeJudge()
    yield judge
    judge.close()


def test_vlm_judge_reward_reaches_a_tiny_grpo_run(tiny_model, tmp_path, fake_judge):
    # the stand-in scores each request by the first character of its caption: two prompts, two scores
    prompts = tmp_path / "judge.txt"
    prompts.write_text("2 dogs on a beach\n4 cats on a sofa\n")
    rows = run(tiny_model("sd3"), tmp_path / "run", f"data={prompts}", "prompt_sampling=distinct",
               f"rewards=[{{name: 'vlm_judge={fake_judge.url}', args: {{model: judge-1}}}}]")
    assert fake_judge.hits == 2 * 2 * 2  # steps x prompts x group: one request per image, no retries
    # each step scores both prompts' groups (prompt_sampling distinct): (2/5 + 4/5) / 2
    assert [r["reward_mean"] for r in rows] == pytest.approx([0.6, 0.6])


def test_geneval_reward_reaches_the_trainer_from_jsonl_rows(tiny_model, tmp_path):
    from diffalign.rewards import tiny

    m2f, clip = tiny.build_mask2former(tmp_path / "m2f"), tiny.build_clip(tmp_path / "clip")
    prompts = tmp_path / "geneval.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "person", "count": 1}], "prompt": "a photo of a person"},
            {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(tiny_model("sd3"), tmp_path / "run", f"data={prompts}", "prompt_sampling=distinct",
                  f"rewards=[{{name: 'geneval={m2f}', args: {{color_model: '{clip}'}}}}]")
    # the tiny detector finds a person above 0.3 in any image and never a cat: 1 and 0, mean 0.5
    assert [r["reward_mean"] for r in metrics] == [0.5, 0.5]
