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


def _flow_grpo_ema(weights: list[torch.Tensor], every: int, decay: float = 0.9, per_micro_batch: int = 1):
    """The release's rule, written out (yifan123/flow_grpo flow_grpo/ema.py + scripts/train_sd3.py): ``global_step``
    counts optimizer updates and is incremented right after each one; the EMA is called with it (once per update, or
    with ``per_micro_batch`` G once after every micro-batch, an update closing every G-th micro-batch) and moves when
    ``(global_step + 1) % every == 0``, by ``ema += (1 - min((1 + s) / (10 + s), decay)) * (theta - ema)``.
    ``weights[u]``: the weights after update u. Returns {u: the EMA once update u's micro-batches are done, just
    before update u + 1 changes the weights} and the (update count, decay) of every move."""
    ema, moves, before_next = weights[0].clone(), [], {}
    global_step = 0
    G = per_micro_batch
    for b in range(G * (len(weights) - 1)):
        if (b + 1) % G == 0:  # this micro-batch closes an update
            global_step += 1
        theta = weights[global_step]
        if (global_step + 1) % every == 0:
            d = min((1 + global_step) / (10 + global_step), decay)
            ema = ema + (1 - d) * (theta - ema)
            moves.append((global_step, d))
        if (b + 2) % G == 0:  # the next micro-batch takes update global_step + 1
            before_next[global_step] = ema.clone()
    return before_next, moves


def _random_walk(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(5, 3, generator=g)]
    for _ in range(n):
        out.append(out[-1] + 0.1 * torch.randn(5, 3, generator=g))
    return out


def _ema_trajectory(weights, **kw) -> tuple[list[torch.Tensor], list[int]]:
    """ParameterEMA stepped after each update: its value after every update and the updates that moved it."""
    p = torch.nn.Parameter(weights[0].clone())
    ema = ParameterEMA({"w": p}, **kw)
    values, moved = [ema.shadow["w"].clone()], []
    for u, w in enumerate(weights[1:], start=1):
        with torch.no_grad():
            p.copy_(w)
        ema.step()
        if not torch.equal(ema.shadow["w"], values[-1]):
            moved.append(u)
        values.append(ema.shadow["w"].clone())
    return values, moved


@pytest.mark.parametrize("every", [8, 1, 3])
def test_ema_cadence_and_decays_follow_flow_grpos_one_based_global_step(every):
    """update_every 8 moves after updates 7, 15, 23, ... (not 8, 16); update_every 1 ramps 2/11, 3/12, ...
    (not 1/10, 2/11): the release's 1-based global_step, compared on tensors."""
    weights = _random_walk(40)
    expected, moves = _flow_grpo_ema(weights, every)
    values, moved = _ema_trajectory(weights, decay=0.9, update_every=every)
    assert moved == [u for u, _ in moves] == [u for u in range(1, 41) if (u + 1) % every == 0]
    if every == 8:
        assert moved == [7, 15, 23, 31, 39]
    if every == 1:
        assert [round(d, 6) for _, d in moves[:3]] == [round(2 / 11, 6), 0.25, round(4 / 13, 6)]
    for u in range(1, 40):
        torch.testing.assert_close(values[u], expected[u], rtol=1e-6, atol=1e-6)


def test_ema_decays_used_are_read_back_from_the_average():
    """The decay of each move recovered from the tensors: ema_new = d * ema_old + (1 - d) * theta."""
    weights = [torch.full((2,), float(u), dtype=torch.float64) for u in range(91)]
    values, _ = _ema_trajectory(weights, decay=0.9, update_every=1)
    used = [float((weights[u][0] - values[u][0]) / (weights[u][0] - values[u - 1][0])) for u in range(1, 91)]
    assert used == pytest.approx([min((1 + u) / (10 + u), 0.9) for u in range(1, 91)], rel=1e-5)
    assert used[0] == pytest.approx(2 / 11, rel=1e-5) and used[-1] == pytest.approx(0.9)
    # without warmup every move uses the decay itself
    q = torch.nn.Parameter(torch.zeros(2))
    flat = ParameterEMA({"q": q}, decay=0.5, update_every=1, warmup=False)
    with torch.no_grad():
        q.fill_(1.0)
    flat.step()
    flat.step()
    torch.testing.assert_close(flat.shadow["q"], torch.full((2,), 0.75))
    assert flat.updates == 2


@pytest.mark.parametrize("every,G", [(8, 2), (1, 2), (8, 3), (2, 3)])
def test_applies_per_firing_matches_flow_grpos_per_micro_batch_call(every, G):
    """flow_grpo's train_sd3.py calls the EMA after every micro-batch with the update count: each firing is applied G
    (= gradient_accumulation_steps) times to the same weights before the next update. ema.applies_per_firing = G
    gives the same EMA at every update; 1 does not."""
    weights = _random_walk(40, seed=1)
    expected, moves = _flow_grpo_ema(weights, every, per_micro_batch=G)
    values, _ = _ema_trajectory(weights, decay=0.9, update_every=every, applies_per_firing=G)
    for u in range(1, 40):
        torch.testing.assert_close(values[u], expected[u], rtol=1e-6, atol=1e-6)
    assert [u for u, _ in moves if 0 < u < 40] == [u for u in range(1, 40) for _ in range(G) if (u + 1) % every == 0]
    once, _ = _ema_trajectory(weights, decay=0.9, update_every=every, applies_per_firing=1)
    assert not torch.allclose(once[39], expected[39], rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("override,key", [("ema.decay=1.5", "ema.decay"),
                                          ("ema.applies_per_firing=0", "ema.applies_per_firing")])
def test_bad_ema_config_names_the_key(tiny_model, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "grpo.yaml", [f"model={tiny_model('sd3')}", f"output_dir={tmp_path}", override])


def _sorted_values(tensors) -> torch.Tensor:
    return torch.sort(torch.cat([t.float().flatten() for t in tensors])).values


def test_eval_and_final_weights_use_the_ema(tiny_model, tmp_path):
    from diffalign.trainers.online import OnlineRecipe

    cfg = load_config(CONFIGS / "grpo.yaml", [f"model={tiny_model('sd3')}", f"output_dir={tmp_path}", "max_steps=2", *SMALL,
                                              "ema.enabled=true", "ema.decay=0.5", "ema.update_every=1", "ema.warmup=false"])
    recipe = OnlineRecipe(cfg).setup()
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
    for u in range(1, 5):  # flow_grpo's 1-based update count: update_every 2 moves after updates 1 and 3
        raw = load_file(str(tmp_path / f"checkpoints/step-{u:06d}/trainable.safetensors"))
        if (u + 1) % 2 == 0:
            d = min((1 + u) / (10 + u), 0.9)
            expected = {n: d * e + (1 - d) * raw[n].float() for n, e in expected.items()}
    for n, e in expected.items():
        torch.testing.assert_close(recipe.ema.shadow[n], e, rtol=1e-6, atol=1e-7)
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(_sorted_values(saved.values()), _sorted_values(expected.values()))
    assert not torch.allclose(_sorted_values(saved.values()), _sorted_values(raw.values()))
