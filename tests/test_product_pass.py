"""The new-user pass (issue #29): what a user meets first says what it is and writes what it should."""

from __future__ import annotations

import stat

import pytest


def test_version_flag_prints_the_installed_version(capsys):
    from importlib.metadata import version

    from diffalign.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffalign {version('diffalign')}"


def _modes(root):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*.safetensors")}


def test_tiny_model_weights_are_world_readable(tmp_path):
    """safetensors writes through a private 0600 temporary file; our weights get the mode of every
    other file we write (issue #29, item 8)."""
    from diffalign.cli import main

    assert main(["-q", "tiny-model", "pickscore", str(tmp_path / "ps")]) == 0
    modes = _modes(tmp_path / "ps")
    assert modes and all(m & 0o044 == 0o044 for m in modes.values()), modes


def test_train_reward_weights_are_world_readable(tmp_path):
    from diffalign.rewards.tiny import build_pickscore, write_toy_pairs
    from diffalign.rewards.train import RewardTrainConfig, train_reward

    model = build_pickscore(tmp_path / "init")
    write_toy_pairs(tmp_path / "train.parquet", 16, seed=0)
    write_toy_pairs(tmp_path / "val.parquet", 8, seed=1)
    cfg = RewardTrainConfig(model=str(model), data=str(tmp_path / "train.parquet"), val_data=str(tmp_path / "val.parquet"),
                            output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4, warmup_steps=0, eval_every=1,
                            device="cpu")
    train_reward(cfg, log=lambda *_: None)
    modes = _modes(tmp_path / "rm")
    assert modes and all(m & 0o044 == 0o044 for m in modes.values()), modes


def test_a_lora_of_another_base_is_an_error_not_a_no_op(tiny_model, toy_pairs, tmp_path):
    """An SD1.5 LoRA evaluated on an SD3 model: one clear error naming the base it was trained on,
    instead of images identical to the base's (issue #29, item 1); on its own base it loads."""
    from pathlib import Path

    from diffalign.config import load_config
    from diffalign.errors import UserError
    from diffalign.eval.generate import load_pipeline
    from diffalign.trainers import train

    root = Path(__file__).resolve().parents[1]
    sd15, sd3 = tiny_model("sd15"), tiny_model("sd3")
    out = tmp_path / "run"
    train(load_config(root / "diffalign/configs/tiny/sft.yaml",
                      [f"model={sd15}", f"data={toy_pairs}", f"output_dir={out}", "max_steps=1"]))
    load_pipeline(str(sd15), lora=str(out))
    with pytest.raises(UserError, match=rf"no place in {sd3}.*trained on {sd15}"):
        load_pipeline(str(sd3), lora=str(out))


def _one_line_error(capsys, argv) -> str:
    from diffalign.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("override, key", [
    ("report_to=tensorbored", "report_to"),
    ("optim.lr_scheduler=bogus", "optim.lr_scheduler"),
])
def test_bad_enum_values_are_one_line_before_any_work(override, key, tmp_path, capsys):
    """Values validation missed used to surface as 19-35 line tracebacks (issue #29, item 2)."""
    err = _one_line_error(capsys, ["-q", "train", "tiny/dpo", "model=M", "data=D", f"output_dir={tmp_path / 'o'}", override])
    assert f"'{key}'" in err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_a_tracker_that_is_not_installed_is_an_error(tmp_path, capsys, monkeypatch):
    """report_to=tensorboard without tensorboard: accelerate only warns and the run logs nothing (item 3)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    err = _one_line_error(capsys, ["-q", "train", "tiny/dpo", "model=M", "data=D", f"output_dir={tmp_path / 'o'}",
                                   "report_to=tensorboard"])
    assert "tensorboard is not installed" in err and "diffalign[tracking]" in err


def test_lora_targets_that_match_no_layer_are_one_line(tiny_model, toy_pairs, tmp_path, capsys):
    err = _one_line_error(capsys, ["-q", "train", "tiny/dpo", f"model={tiny_model('sd15')}", f"data={toy_pairs}",
                                   f"output_dir={tmp_path / 'o'}", "max_steps=1",
                                   "lora.target_modules=[to_q, nonexistent_layer]"])
    assert "'lora.target_modules': nonexistent_layer match no layer" in err and "to_k" in err


def test_a_reward_server_that_is_down_is_one_line(tmp_path, capsys):
    import socket

    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "p.txt").write_text("a red circle\n")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _one_line_error(capsys, ["-q", "score", "--reward", f"remote=http://127.0.0.1:{port}", "--images",
                                   str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s.csv")])
    assert f"reward server http://127.0.0.1:{port}" in err and "no answer" in err
