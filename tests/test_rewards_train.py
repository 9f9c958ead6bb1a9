"""Reward-model training (PickScore objective) on a learnable toy preference set: humans
always prefer the redder image of a pair; the tiny CLIP starts at chance-or-worse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.rewards import get_reward, tiny
from diffalign.rewards.pairs import score_pairs, pairwise_accuracy

CONFIG = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "reward" / "tiny_pickscore.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_pickscore_loss_matches_definition():
    from diffalign.trainers.reward_model import pickscore_loss

    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    i0 = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    i1 = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    l0 = torch.tensor([1.0, 0.0, 0.5])
    loss = pickscore_loss(torch.tensor(100.0), t, i0, i1, l0, 1 - l0)
    s0, s1 = 100 * (t * i0).sum(-1), 100 * (t * i1).sum(-1)
    # softmax over two scores = logistic of their difference
    logsig = torch.nn.functional.logsigmoid
    want = -(l0 * logsig(s0 - s1) + (1 - l0) * logsig(s1 - s0)).mean()
    torch.testing.assert_close(loss, want)


def test_train_reward_raises_pairwise_accuracy(tmp_path, capsys):
    from diffalign.cli import main

    model = tiny.build_pickscore(tmp_path / "init")
    train = tiny.write_toy_pairs(tmp_path / "train.parquet", n=128, seed=0, tie_fraction=0.1, bad_rows=1)
    val = tiny.write_toy_pairs(tmp_path / "val.parquet", n=48, seed=1)
    out = tmp_path / "trained"
    rc = main(["train-reward", str(CONFIG), f"model={model}", f"data={train}", f"val_data={val}", f"output_dir={out}",
               "max_steps=40", "eval_every=40"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_rows"] == 1
    assert metrics["val_accuracy"] >= 0.85
    assert metrics["val_accuracy"] >= metrics["val_accuracy_initial"] + 0.3
    printed = capsys.readouterr().out
    assert "validation accuracy" in printed

    # the output directory loads as the pickscore reward and reproduces the reported accuracy
    before = get_reward(f"pickscore={model}", device="cpu")
    after = get_reward(f"pickscore={out}", device="cpu")
    ps = score_pairs({"before": before, "after": after}, val)
    acc = {k: pairwise_accuracy(*ps.scores[k], ps.label_0, ps.label_1)["accuracy"] for k in ps.scores}
    assert acc["after"] == pytest.approx(metrics["val_accuracy"])
    assert acc["before"] == pytest.approx(metrics["val_accuracy_initial"])
    # redder images now score higher for an unseen prompt
    red, blue = tiny.toy_pair_images(np.random.default_rng(7))
    s = after([red, blue], ["a prompt never seen in training"] * 2).scores
    assert s[0] > s[1]


def test_train_reward_config_is_strict(tmp_path, capsys):
    from diffalign.cli import main

    rc = main(["train-reward", str(CONFIG), "learning_rat=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown config key 'learning_rat'" in err and "learning_rate" in err
    rc = main(["train-reward", str(CONFIG), "data=null"])
    assert rc == 2 and "'data'" in capsys.readouterr().err
