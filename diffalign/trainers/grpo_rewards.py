"""What the GRPO trainer scores: its prompts (with per-prompt metadata for rewards) and its rewards."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.prompts import read_prompt_file
from ..errors import UserError
from ..rewards import get_reward, simple

BUILTIN_PROMPTS = [
    "a photo of a cat", "a red apple on a table", "a mountain lake at sunrise", "a bowl of fruit",
    "a city street at night", "a portrait of an old man", "a small boat on the sea", "a field of sunflowers",
    "a dog running on the beach", "a cup of coffee", "a castle on a hill", "a forest in autumn",
    "a bicycle leaning on a wall", "a plate of pasta", "a snowy village", "a hot air balloon in the sky",
]


def load_prompts(data: str | None, key: str = "data") -> tuple[list[str], list[dict] | None]:
    """``None`` -> built-in prompts; else a prompt file (:func:`diffalign.data.prompts.read_prompt_file`):
    the prompts, and the rows (``.jsonl``/``.json`` objects, ``.csv`` rows) as reward metadata."""
    if data is None:
        return list(BUILTIN_PROMPTS), None
    if not Path(data).is_file():
        raise ConfigError(f"config key '{key}': prompt file '{data}' does not exist "
                          "(a .txt, .json, .jsonl or .csv file, or null for built-in prompts)")
    prompts = read_prompt_file(data)
    return prompts.prompts, prompts.rows


def resolve_reward(name: str, args: dict | None = None, device: torch.device | None = None):
    """A reward callable by name: ``diffalign.rewards.get_reward``, else the simple rewards.
    ``device``: where its model goes (the trainer passes ``accelerator.device``, which carries this
    rank's GPU index); a ``device`` in ``args`` wins; None: the reward's own default."""
    kwargs = dict(args or {})
    if device is not None:
        kwargs.setdefault("device", device)
    try:
        return get_reward(name, **kwargs)
    except UserError:
        if name not in simple.SIMPLE_REWARDS:
            raise
    return simple.SIMPLE_REWARDS[name]


def preload_reward(reward) -> None:
    """Load a reward's weights now (on the calling thread) instead of on its first call, which in
    training is on the scoring thread; composed rewards load their components."""
    for part in getattr(reward, "components", ()):  # WeightedSum: [(reward, weight), ...]
        preload_reward(part[0])
    if getattr(reward, "inner", None) is not None:  # Affine, RunningZScore
        preload_reward(reward.inner)
    if hasattr(reward, "ensure_loaded"):
        reward.ensure_loaded()


def use_device_in_thread(device: torch.device) -> None:
    """Make ``device`` this thread's current CUDA device (a no-op off CUDA). The scoring thread runs
    it first: the current device is per thread and accelerate sets it only in the main thread, so
    without it anything a reward puts on a bare ``cuda`` would land on GPU 0 on every rank."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:  # no index: nothing to pin it to
        torch.cuda.set_device(device)


def reward_scores(out, n: int, name: str) -> torch.Tensor:
    """A reward's return value (an object with ``.scores``, a tensor, or a list) -> float32 CPU [n]."""
    scores = getattr(out, "scores", out)
    scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if scores.shape[0] != n:
        raise UserError(f"reward '{name}' returned {scores.shape[0]} scores for {n} images")
    return scores


def score_images(adapter, latents: torch.Tensor, prompts: list[str], metadata, rewards) -> dict[str, torch.Tensor]:
    """Decode latents and score them with every ``(name, weight, fn)`` reward (runs on the reward
    thread); ``"_seconds"``: the time it took."""
    t0 = time.perf_counter()
    images = adapter.decode_latents(latents)
    out = {name: reward_scores(fn(images, prompts, metadata), len(prompts), name) for name, _, fn in rewards}
    out["_seconds"] = torch.tensor(time.perf_counter() - t0)
    return out
