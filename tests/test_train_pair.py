"""End-to-end offline training through the real diffusers loading path on tiny models.

The toy set is learnable by construction (warm smooth chosen images, cool noisy rejected ones),
so after a short run the trained model must denoise chosen images better *relative to the
base model* than rejected ones: measured on fixed (timestep, noise) draws, independently of
the training loss.
"""

import json
from pathlib import Path

import pytest
import torch

from diffalign.config import DataOptions, load_config
from diffalign.data.pickapic import pair_dataloader
from diffalign.models import load_adapter
from diffalign.trainers import train
from diffalign.trainers.pair import pair_margins

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    import pyarrow.parquet as pq

    from diffalign.data.toy import make_toy_pickapic_rows, pickapic_table

    out = tmp_path_factory.mktemp("pairs8")
    pq.write_table(pickapic_table(make_toy_pickapic_rows(8, size=32, seed=0, tie_fraction=0.0)), out / "p.parquet")
    return str(out)


def _margin_shift(tuned, data, repeats=8):
    """Per pair: (L_w - L_l) with the LoRA minus without it, on shared draws; negative = learned."""
    batch = next(iter(pair_dataloader(data, DataOptions(resolution=32, random_flip=False), 8, seed=123)))
    m = pair_margins(tuned, batch, seed=0, repeats=repeats)
    return m["model_margin"] - m["ref_margin"]


def _run(method, model, data, out, steps, *extra):
    cfg = load_config(ROOT / f"diffalign/configs/tiny/{method}.yaml",
                      [f"model={model}", f"data={data}", f"output_dir={out}", f"max_steps={steps}", "batch_size=8", *extra])
    torch.manual_seed(0)
    return cfg, train(cfg)


LEARNING_CASES = [(kind, method, ()) for kind in ("sd15", "sd3") for method in ("dpo", "mapo")] + [
    ("qwenimage", "dpo", ()), ("flux", "dpo", ()), ("flux2", "dpo", ()), ("flux2-klein", "dpo", ())]


@pytest.mark.parametrize("kind,method,extra", LEARNING_CASES)
def test_preference_training_learns_the_preference(tiny_model, small_pairs, tmp_path, kind, method, extra):
    model = tiny_model(kind)
    cfg, result = _run(method, model, small_pairs, tmp_path / "run", 15, *extra)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 16))
    for key in ("loss", "lr", "implicit_acc", "reward_margin", "mse_w", "mse_l"):
        assert key in rows[-1]
    tuned = load_adapter(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when saved keys miss targets
        tuned.pipe.load_lora_weights(str(tmp_path / "run"))  # the saved LoRA, through diffusers
    shift = _margin_shift(tuned, small_pairs)
    assert (shift < 0).float().mean() >= 0.75, shift
    assert shift.mean() < 0
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first  # the training loss falls too


@pytest.mark.parametrize("kind,method", [("sd15", "sft"), ("flux", "dpo"), ("flux-schnell", "sft"), ("flux2", "dpo"),
                                         ("flux2-klein", "dpo")])
def test_saved_lora_loads_into_pipeline_and_changes_output(tiny_model, small_pairs, tmp_path, kind, method):
    from diffusers import DiffusionPipeline

    model = tiny_model(kind)
    _run(method, model, small_pairs, tmp_path / "run", 3, "optim.learning_rate=1e-2")
    out = tmp_path / "run"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "base_model:" in card and method in card
    assert f"method: {method}" in (out / "config.yaml").read_text()

    def sample(pipe):
        return pipe(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = DiffusionPipeline.from_pretrained(model)
    before = sample(pipe)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when saved keys miss targets
        pipe.load_lora_weights(str(out))
    after = sample(pipe)
    assert (after - before).abs().max() > 1e-3


def test_full_finetune_saves_a_loadable_diffusers_dir(tiny_model, small_pairs, tmp_path):
    from diffusers import DiffusionPipeline

    model = tiny_model("sd15")
    _run("dpo", model, small_pairs, tmp_path / "full", 2, "lora.rank=0", "optim.learning_rate=1e-4")
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "full"))
    base = DiffusionPipeline.from_pretrained(model)
    changed = [n for (n, p), (_, q) in zip(pipe.unet.named_parameters(), base.unet.named_parameters()) if not torch.equal(p, q)]
    assert changed  # the UNet was trained and saved
    assert all(torch.equal(p, q) for p, q in zip(pipe.vae.parameters(), base.vae.parameters()))


def test_sdxl_trains_and_saves_lora(tiny_model, small_pairs, tmp_path):
    from diffusers import DiffusionPipeline

    model = tiny_model("sdxl")
    _run("dpo", model, small_pairs, tmp_path / "xl", 2)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(tmp_path / "xl"))
    rows = (tmp_path / "xl" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(json.loads(r)["loss"] > 0 for r in rows)


def test_nan_loss_steps_are_skipped_then_abort(tiny_model, small_pairs, tmp_path):
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        _run("dpo", tiny_model("sd15"), small_pairs, tmp_path / "nan", 10,
             "optim.learning_rate=1e30", "optim.max_grad_norm=1e30", "loss.max_nonfinite_steps=2")


def test_channels_last_and_compile_options_train_identically(tiny_model, small_pairs, tmp_path):
    losses = {}
    for name, extra in {"plain": (), "fast": ("model_opts.channels_last=true", "model_opts.compile=true",
                                               "model_opts.compile_backend=eager")}.items():
        _run("dpo", tiny_model("sd15"), small_pairs, tmp_path / name, 2, *extra)
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows]
    assert losses["plain"] == pytest.approx(losses["fast"], rel=1e-4)
