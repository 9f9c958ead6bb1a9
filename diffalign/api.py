"""The public Python API: what a notebook user calls, re-exported by ``diffalign`` itself.

What this module exports (``__all__``) is the stable surface; every other module is internal and
may change between releases. The functions take the same inputs as the command line (a config
path or recipe name with ``key=value`` overrides, hub ids or directories) and return plain values.

The README's DPO tour, on tiny models, from Python::

    >>> import diffalign as da
    >>> model = da.tiny_model("sd15", tmp / "M")
    >>> data = da.toy_data(tmp / "D", n=16)
    >>> cfg = da.load_config("tiny/dpo", model=model, data=data, output_dir=tmp / "O", max_steps=2)
    >>> result = da.train(cfg)  # toy data has ties, which DPO skips and counts
    skipped 1 of the ... rows training read for its 8 pairs: tie (data_opts.drop_ties) ...
    >>> result["final"]["step"]
    2
    >>> base = da.evaluate(model, "testbed_heldout:2", ["jpeg"], tmp / "E_base", seeds=1, steps=2)
    >>> tuned = da.evaluate(model, "testbed_heldout:2", ["jpeg"], tmp / "E_dpo", lora=tmp / "O", seeds=1, steps=2)
    >>> report = da.compare([tmp / "E_base", tmp / "E_dpo"], tmp / "R")
    >>> sorted(p.name for p in (tmp / "R").glob("report.*"))
    ['report.html', 'report.md']

(``tmp`` is a scratch :class:`~pathlib.Path`; the doctest runs these lines in ``tests/test_api.py``.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .config import load_config as _load_config_file
from .config import to_dict
from .errors import ConfigError, UserError
from .eval.compare import compare as _compare
from .eval.generate import EvalConfig, load_pipeline, run_eval
from .rewards import Reward, get_reward
from .trainers import ForwardRLConfig, GRPOConfig, PairTrainConfig
from .trainers import train as _train

PathLike = str | os.PathLike

__all__ = [
    "ConfigError", "EvalConfig", "ForwardRLConfig", "GRPOConfig", "PairTrainConfig", "Reward", "UserError",
    "compare", "config_dict", "evaluate", "get_reward", "load_config", "load_pipeline", "score", "tiny_model",
    "toy_data", "train",
]


def load_config(config: PathLike | None, overrides: Sequence[str] = (), **keys: Any):
    """A typed, validated trainer config from a YAML file, a packaged config (``"tiny/dpo"``) or a
    recipe name (``"sd15-dpo"``), with dotted ``overrides`` (``["optim.learning_rate=1e-5"]``)
    and top-level ``keys`` (``model=...``, ``max_steps=...``; paths are turned into text).

    >>> cfg = load_config("tiny/dpo", ["loss.beta=1000"], model="M", data="D", max_steps=3)
    >>> type(cfg).__name__, cfg.method, cfg.max_steps, cfg.loss.beta
    ('PairTrainConfig', 'dpo', 3, 1000.0)

    A bad key or value raises :class:`ConfigError` naming it.
    """
    items = list(overrides) + [f"{k}={os.fspath(v) if isinstance(v, os.PathLike) else v}" for k, v in keys.items()]
    return _load_config_file(os.fspath(config) if config is not None else None, items)


def config_dict(cfg) -> dict:
    """A config as nested plain values (what ``--print-config`` prints and ``config.yaml`` holds)."""
    return to_dict(cfg)


def train(cfg) -> dict:
    """Train ``cfg`` (from :func:`load_config`); returns ``{"final": last metrics row, ...}``. The
    run writes ``metrics.jsonl``, ``config.yaml``, the weights and a model card to ``cfg.output_dir``."""
    return _train(cfg)


def evaluate(model: PathLike, prompts: str | PathLike, rewards: Sequence[str], out: PathLike, *,
             lora: PathLike | None = None, **options: Any) -> dict:
    """Generate with fixed seeds and score (``diffalign eval``): ``prompts`` is a file or a named set
    (``"partiprompts"``, ``"testbed_heldout:8"``), ``rewards`` reward specs (``"pickscore"``,
    ``"aesthetic=DIR"``); ``options`` are :class:`EvalConfig` fields (``seeds``, ``steps``,
    ``guidance``, ``resolution``, ...). Returns the summary (also ``out/summary.json``)."""
    cfg = EvalConfig(model=os.fspath(model), prompts=os.fspath(prompts), rewards=list(rewards), out=os.fspath(out),
                     lora=os.fspath(lora) if lora is not None else None, **options)
    return run_eval(cfg)


def compare(eval_dirs: Sequence[PathLike], out: PathLike, **options: Any) -> dict:
    """Paired comparison of eval runs (``diffalign compare``): per-reward deltas with intervals and
    win rates, written as ``out/report.md`` and ``out/report.html``; returns the report's data."""
    return _compare([os.fspath(d) for d in eval_dirs], os.fspath(out), **options)


def score(images, prompts: Sequence[str] | None, reward: str | Reward, **reward_kwargs: Any):
    """Scores of ``images`` (a float tensor ``[B,3,H,W]`` in [0, 1], or a list of PIL images /
    tensors) under one reward spec; returns a ``[B]`` float tensor.

    >>> import torch
    >>> score(torch.zeros(2, 3, 8, 8), None, "brightness").tolist()
    [0.0, 0.0]
    """
    fn = get_reward(reward, **reward_kwargs)
    return fn(images, list(prompts) if prompts is not None else None).scores


def tiny_model(kind: str, directory: PathLike, seed: int = 0) -> str:
    """Write a tiny random-init model in diffusers format, loadable as any checkpoint: a family
    (``"sd15"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ...) or a reward model (``"pickscore"``,
    ``"hpsv2"``, ...); returns its path (``diffalign tiny-model KIND DIR``)."""
    from .files import fix_safetensors_modes
    from .models.tiny import BUILDERS
    from .rewards.tiny import BUILDERS as REWARD_BUILDERS

    builders = {**BUILDERS, **REWARD_BUILDERS}
    if kind not in builders:
        raise UserError(f"unknown KIND {kind!r}; choose one of: {', '.join(builders)}")
    path = builders[kind](os.fspath(directory), seed=seed)
    fix_safetensors_modes(path)  # weights readable like every other file we write, not 0600
    return os.fspath(path)


def toy_data(directory: PathLike, n: int = 64, size: int = 64, seed: int = 0) -> str:
    """Write ``n`` Pick-a-Pic-schema preference rows (parquet, with ties) to ``directory``; returns
    the parquet file's path (``diffalign toy-data pickapic DIR``)."""
    from .data.toy import write_toy_pickapic

    return os.fspath(write_toy_pickapic(os.fspath(directory), n, size=size, seed=seed))
