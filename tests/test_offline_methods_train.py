"""Each tiny config of the offline method breadth trains 2 steps end to end through
``diffalign.trainers.train`` on shared tiny SD1.5 and Qwen-Image models and toy data, and writes a loadable LoRA."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from diffalign.config import load_config
from diffalign.trainers import train
from diffalign.trainers.pair import pair_forward, pair_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    from diffalign.data.variants import write_toy_captions

    root = tmp_path_factory.mktemp("captions")
    write_toy_captions(root / "plain", 8, size=32)
    write_toy_captions(root / "labeled", 8, size=32, labels=True)
    return {"plain": str(root / "plain"), "labeled": str(root / "labeled")}


CASES = [  # (config, data, extra overrides, metric that must be logged)
    ("kto", "pairs", [], "kl"),
    ("kto", "labeled", [], "frac_desirable"),
    ("dcpo", "pairs", [], "reward_margin"),
    ("tpo", "plain", [], "reward_margin"),
    ("tpo", "pairs", ["loss.base=kto"], "kl"),
    ("ipo", "pairs", [], "target_margin"),
    ("copg", "pairs", [], "reward_gap"),
    ("inpo", "pairs", [], "reward_margin"),
    ("sft", "pairs", [], "loss"),
]


@pytest.mark.parametrize("kind", ["sd15", "qwenimage"])
@pytest.mark.parametrize("method,data,extra,metric", CASES, ids=[f"{c[0]}-{c[1]}{'-' + c[2][0] if c[2] else ''}" for c in CASES])
def test_tiny_config_trains(tiny_model, toy_pairs, captions, tmp_path, method, data, extra, metric, kind):
    source = toy_pairs if data == "pairs" else captions[data]
    cfg = load_config(ROOT / f"diffalign/configs/tiny/{method}.yaml", [
        f"model={tiny_model(kind)}", f"data={source}", f"output_dir={tmp_path}", "max_steps=2", "batch_size=2", *extra])
    torch.manual_seed(0)
    result = train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and metric in rows[-1]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert result["final"]["nonfinite_skipped"] == 0


def test_dcpo_forward_conditions_sides_on_their_captions(tiny_model, toy_pairs):
    """The rejected side sees its own caption: same images and captions -> DPO's MSEs exactly;
    a different rejected caption changes only the rejected MSEs."""
    from diffalign.config import DataOptions
    from diffalign.data.pickapic import pair_dataloader
    from diffalign.models import load_adapter

    cfg = load_config(ROOT / "diffalign/configs/tiny/dcpo.yaml", [f"model={tiny_model('sd15')}", f"data={toy_pairs}"])
    adapter = load_adapter(cfg.model)
    batch = next(iter(pair_dataloader(toy_pairs, DataOptions(resolution=32, random_flip=False), 3, seed=0)))

    def run(b):
        torch.manual_seed(0)  # VAE latent sampling
        return pair_forward(adapter, adapter.denoiser, adapter.denoiser, b, torch.Generator().manual_seed(1), "dcpo", cfg)

    same = run(dataclasses.replace(batch, captions_l=list(batch.captions)))
    plain = run(batch)
    for a, b in zip(same, plain):
        torch.testing.assert_close(a, b)
    other = run(dataclasses.replace(batch, captions_l=["a completely different prompt"] * 3))
    torch.testing.assert_close(other[0], plain[0])
    assert not torch.allclose(other[1], plain[1])
    loss, metrics = pair_loss(cfg, *other, adapter.num_train_timesteps)
    assert torch.isfinite(loss) and "implicit_acc" in metrics
