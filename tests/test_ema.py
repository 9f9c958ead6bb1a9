"""EMA of the trained parameters: flow_grpo's update rule, evaluation and saved weights use it, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.trainers.ema import ParameterEMA

CONFIGS = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny"
SMALL = ("sampler.num_steps=3", "prompts_per_step=2", "batch_size=4", "group_size=2", "train_batch_size=4",
         "eval.num_prompts=2", "sampler.eval_num_steps=3", "optim.learning_rate=1e-2")


def test_ema_update_rule_matches_flow_grpo():
    """flow_grpo's EMAModuleWrapper(decay=0.9, update_step_interval=8): after optimizer step n (0-based), when
    (n + 1) % 8 == 0, ema += (1 - min((1 + n) / (10 + n), 0.9)) * (theta - ema); written out independently."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    ema = ParameterEMA({"w": p}, decay=0.9, update_every=8)
    expected = p.detach().clone()
    for n in range(100):
        with torch.no_grad():
            p.add_(torch.randn(5, 3, generator=g) * 0.1)  # an "optimizer step"
        ema.step()
        if (n + 1) % 8 == 0:
            d = min((1 + n) / (10 + n), 0.9)
            expected = d * expected + (1 - d) * p.detach()
    torch.testing.assert_close(ema.shadow["w"], expected, rtol=1e-6, atol=1e-6)
    assert ema.updates == 100
    # without warmup every update uses the decay itself
    q = torch.nn.Parameter(torch.zeros(2))
    flat = ParameterEMA({"q": q}, decay=0.5, update_every=1, warmup=False)
    with torch.no_grad():
        q.fill_(1.0)
    flat.step()
    flat.step()
    torch.testing.assert_close(flat.shadow["q"], torch.full((2,), 0.75))


def test_swap_and_state_round_trip():
    p = torch.nn.Parameter(torch.ones(3))
    ema = ParameterEMA({"p": p}, decay=0.5, update_every=1, warmup=False)
    with torch.no_grad():
        p.fill_(3.0)
    ema.step()  # ema = 2
    with ema.swapped_in():
        torch.testing.assert_close(p.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(p.detach(), torch.full((3,), 3.0))
    other = ParameterEMA({"p": torch.nn.Parameter(torch.zeros(3))}, decay=0.5, update_every=1)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow["p"], ema.shadow["p"])
    with pytest.raises(ValueError, match="EMA state"):
        ParameterEMA({"x": torch.nn.Parameter(torch.zeros(1))}, 0.5).load_state_dict(ema.state_dict())


def test_bad_ema_config_names_the_key(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="ema.decay"):
        load_config(CONFIGS / "grpo.yaml", [f"model={tiny_model('sd3')}", f"output_dir={tmp_path}", "ema.decay=1.5"])


def _sorted_values(tensors) -> torch.Tensor:
    return torch.sort(torch.cat([t.float().flatten() for t in tensors])).values


def test_eval_and_final_weights_use_the_ema(tiny_model, tmp_path):
    from diffalign.trainers.grpo import GRPORecipe

    cfg = load_config(CONFIGS / "grpo.yaml", [f"model={tiny_model('sd3')}", f"output_dir={tmp_path}", "max_steps=2", *SMALL,
                                              "ema.enabled=true", "ema.decay=0.5", "ema.update_every=1", "ema.warmup=false"])
    recipe = GRPORecipe(cfg).setup()
    recipe.train()
    ema = recipe.ema
    raw = {n: p.detach().clone() for n, p in ema.params.items()}
    assert ema.updates == 2 and any(not torch.equal(raw[n], ema.shadow[n]) for n in raw)
    prompts = recipe.eval_prompts
    with_ema = recipe.evaluate(prompts, None)
    assert all(torch.equal(p, raw[n]) for n, p in ema.params.items())  # swapped back out
    recipe.ema = None
    with torch.no_grad():
        for n, p in ema.params.items():
            p.copy_(ema.shadow[n])
    by_hand = recipe.evaluate(prompts, None)
    with torch.no_grad():
        for n, p in ema.params.items():
            p.copy_(raw[n])
    without = recipe.evaluate(prompts, None)
    assert with_ema == by_hand and with_ema != without
    # the saved LoRA holds the EMA values (same numbers under diffusers' names), not the trained ones
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(_sorted_values(saved.values()), _sorted_values(ema.shadow.values()))
    assert not torch.allclose(_sorted_values(saved.values()), _sorted_values(raw.values()))


def _run(model, out, steps, *extra):
    from diffalign.trainers import train

    cfg = load_config(CONFIGS / "grpo.yaml", [f"model={model}", f"output_dir={out}", f"max_steps={steps}", *SMALL,
                                              "ema.enabled=true", "ema.update_every=2", "eval.every=2", "checkpoint_every=2",
                                              *extra])
    train(cfg)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def test_resume_with_ema_is_bit_exact(tiny_model, tmp_path):
    """4 steps in one go == 2 steps + resume + 2 steps: weights, EMA state and metrics (eval included)."""
    model = tiny_model("sd3")
    whole = _run(model, tmp_path / "a", 4)
    _run(model, tmp_path / "b", 2)
    resumed = _run(model, tmp_path / "b", 4, "resume=latest")
    assert whole == resumed and "eval_reward_mean" in whole[-1]
    for name in ("pytorch_lora_weights.safetensors", "checkpoints/step-000004/ema.safetensors",
                 "checkpoints/step-000004/trainable.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert int(load_file(str(tmp_path / "a/checkpoints/step-000004/ema.safetensors"))["__updates__"][0]) == 4


def test_pair_trainer_saves_the_ema_of_its_trajectory(tiny_model, toy_pairs, tmp_path):
    """The pair recipe with an EMA: the raw weights after each step (checkpoints) averaged by hand with flow_grpo's rule
    give the EMA it keeps and the LoRA it saves; training itself is untouched (the checkpoints hold the raw weights)."""
    from diffalign.trainers.pair import PairRecipe

    cfg = load_config(CONFIGS / "sft.yaml", [f"model={tiny_model('sd15')}", f"data={toy_pairs}", f"output_dir={tmp_path}",
                                             "max_steps=4", "batch_size=2", "checkpoint_every=1", "checkpoints_keep=10",
                                             "ema.enabled=true", "ema.update_every=2", "optim.learning_rate=1e-2"])
    recipe = PairRecipe(cfg).setup()
    expected = {n: s.clone() for n, s in recipe.ema.shadow.items()}  # the EMA starts at the initial weights
    recipe.train()
    for n_update in range(4):
        raw = load_file(str(tmp_path / f"checkpoints/step-{n_update + 1:06d}/trainable.safetensors"))
        if (n_update + 1) % 2 == 0:
            d = min((1 + n_update) / (10 + n_update), 0.9)
            expected = {n: d * e + (1 - d) * raw[n].float() for n, e in expected.items()}
    for n, e in expected.items():
        torch.testing.assert_close(recipe.ema.shadow[n], e, rtol=1e-6, atol=1e-7)
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(_sorted_values(saved.values()), _sorted_values(expected.values()))
    assert not torch.allclose(_sorted_values(saved.values()), _sorted_values(raw.values()))
