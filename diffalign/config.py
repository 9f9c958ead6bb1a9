"""Typed configs: YAML file + ``key=value`` dotted overrides -> nested dataclasses.

Every trainer has its own config dataclass (``PairTrainConfig`` beside the pair trainer,
``GRPOConfig`` beside the GRPO trainer); they share :class:`BaseTrainConfig`. Loading is strict:
an unknown key, a wrong type or an impossible value raises one :class:`ConfigError` naming the
dotted key, with the valid keys listed where that helps.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


from .errors import ConfigError  # defined with the other user errors; re-exported here


# --------------------------------------------------------------------------------------------
# Shared blocks
# --------------------------------------------------------------------------------------------


@dataclass
class ModelOptions:
    """How the backbone is loaded and run (``model`` itself is the top-level hub id or dir)."""

    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weights files on the hub
    vae: str | None = None  # replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL)
    attention: str = "sdpa"  # sdpa | xformers | any diffusers attention backend name (DiTs)
    gradient_checkpointing: bool = False
    # images per VAE decode call (rollouts, evaluation): 0 = a whole batch at once. Bounds the decode's
    # peak memory beside the training state (Qwen-Image's VAE: ~0.9 GB per 512 px image in flight)
    vae_decode_batch: int = 0
    channels_last: bool = False  # UNets: NHWC convolutions (faster on recent GPUs)
    compile: bool = False  # torch.compile the denoiser (in place, so adapters can still be toggled)
    compile_backend: str = "inductor"
    max_sequence_length: int = 256  # T5 tokens for SD3/FLUX prompts
    guidance: float = 3.5  # guidance-distilled models (FLUX.1-dev, FLUX.2-dev): the guidance input of forwards without a sampler (pair methods); diffusers' FLUX LoRA scripts train at 3.5
    timestep_sampling: str = "uniform"  # flow models: uniform | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass
class LoraOptions:
    """LoRA via peft. ``rank: 0`` means full fine-tuning of the denoiser."""

    rank: int = 8
    alpha: float | None = None  # defaults to rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the adapter's family default
    # peft init_lora_weights: gaussian | true (kaiming) | false (B and A random: a test-only non-identity start)
    # | pissa | pissa_niter_N | olora | eva | corda | loftq | orthogonal
    init: str | bool = "gaussian"


@dataclass
class OptimOptions:
    learning_rate: float = 1e-4
    scale_lr: bool = False  # multiply lr by batch * accumulation * processes (Diffusion-DPO did)
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False


@dataclass
class DataOptions:
    """Pick-a-Pic-schema preference data (hub id, local dir or parquet files)."""

    split: str = "train"
    streaming: bool = False
    resolution: int = 512
    random_crop: bool = False
    random_flip: bool = True
    drop_ties: bool = True
    drop_identical: bool = True  # rows with are_different == False
    empty_prompt_prob: float = 0.0  # fraction of captions replaced by "" (CFG-style dropout)
    caption_column: str = "caption"
    max_samples: int | None = None
    shuffle_buffer: int = 1000  # streaming only
    # Pair trainer: precompute VAE latent moments and prompt embeddings once and train from them
    # (the same estimator: fresh timestep and noise every step; diffalign.data.cache). Built on
    # first use, content-keyed; false: encode every batch with the VAE and text encoders.
    cache: bool = True
    cache_dir: str | None = None  # where the cache lives; None: ~/.cache/diffalign/latents/<content key> ($DIFFALIGN_LATENT_CACHE / $DIFFALIGN_CACHE move it)
    # dtype of the cached latent moments and prompt embeddings: float32 | bfloat16 | float16. The
    # 16-bit ones halve the cache (FLUX.1 at 1024 px: 8 MiB a pair in float32 with flips); the
    # training step casts them to its own dtype anyway, so bfloat16 suits a bf16 run.
    cache_dtype: str = "float32"
    num_workers: int = 0


@dataclass
class BaseTrainConfig:
    """Keys shared by every trainer. ``model``, ``data``, ``output_dir``, ``max_steps`` and
    ``seed`` are the public contract of ``diffalign train``."""

    method: str = "dpo"
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    data: str | None = None
    output_dir: str = "outputs/run"
    max_steps: int = 1000
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    log_every: int = 1
    report_to: str = "none"  # none | tensorboard | wandb | all
    allow_tf32: bool = True
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = none)
    checkpoints_keep: int = 3  # keep the last K checkpoints
    resume: str | None = None  # "latest" or a checkpoint dir; only a checkpoint of the same config resumes
    # true: remove a previous run's files from output_dir (metrics, checkpoints, weights) and start
    # fresh. Without it a non-empty output_dir of a different config is refused.
    overwrite: bool = False
    model_opts: ModelOptions = field(default_factory=ModelOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)

    def validate(self) -> None:
        check(self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        check(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "must be no, fp16 or bf16")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = no checkpoints)")
        check(self.checkpoints_keep >= 1, "checkpoints_keep", "must be >= 1")
        check(not (self.overwrite and self.resume), "overwrite",
               f"overwrite=true starts over and resume={self.resume} continues: set only one of them")
        check(self.model_opts.vae_decode_batch >= 0, "model_opts.vae_decode_batch", "must be >= 0 (0 = a whole batch at once)")
        check(self.lora.rank >= 0, "lora.rank", "must be >= 0 (0 = full fine-tuning)")
        check(self.optim.learning_rate > 0, "optim.learning_rate", "must be > 0")
        check(self.optim.lr_scheduler in LR_SCHEDULERS, "optim.lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
        check(self.report_to in REPORT_TO, "report_to", f"must be one of {', '.join(REPORT_TO)}")
        trackers = {"none": (), "all": tuple(TRACKER_PACKAGES)}.get(self.report_to, (self.report_to,))
        for tracker in trackers:  # accelerate only warns when a tracker's package is missing, and logs nothing
            package = TRACKER_PACKAGES[tracker]
            check(importlib.util.find_spec(package) is not None, "report_to",
                  f"{tracker} is not installed (pip install 'diffalign[tracking]' or {package})")
        check(self.model_opts.timestep_sampling in ("uniform", "logit_normal", "mode"),
               "model_opts.timestep_sampling", "must be uniform, logit_normal or mode")
        check(isinstance(self.lora.init, bool) or self.lora.init.lower() in LORA_INITS
              or re.fullmatch(r"pissa_niter_\d+", self.lora.init) is not None,
              "lora.init", f"must be one of {', '.join(LORA_INITS)} or pissa_niter_N")
        check(self.model_opts.compile_backend == "inductor" or self.model_opts.compile_backend in _compile_backends(),
              "model_opts.compile_backend", "must be a torch.compile backend: torch._dynamo.list_backends(exclude_tags=())")
        attention = self.model_opts.attention
        check(attention in ATTENTION_NAMES or (attention.startswith("diffusers:") and len(attention) > len("diffusers:")),
              "model_opts.attention", f"must be one of {', '.join(ATTENTION_NAMES)} or diffusers:<backend>")


# diffusers.optimization.get_scheduler's names (SchedulerType)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
# peft's init_lora_weights values (True/False spelled as words too)
LORA_INITS = ("gaussian", "true", "kaiming", "default", "false", "pissa", "olora", "eva", "corda", "loftq", "orthogonal")
# models.base.DiffusionAdapter.set_attention's names (diffusers:<backend> besides)
ATTENTION_NAMES = ("sdpa", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "xformers")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _compile_backends() -> list[str]:
    import torch._dynamo  # 1-2 s to import: only asked when a backend other than the default is named

    return torch._dynamo.list_backends(exclude_tags=())


def check(ok: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``ok``: the one line of every ``validate``."""
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


_check = check  # the old private name, kept for scripts outside the package


# --------------------------------------------------------------------------------------------
# dict -> dataclass, strictly
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:  # kept as text by parse_overrides
            return _YAML11_BOOLS[value.lower()]
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise, listing the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        # the nearest valid key, by difflib's ratio (stdlib; catches typos such as learning_rte)
        near = difflib.get_close_matches(unknown[0], sorted(names), n=1, cutoff=0.6)
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'"
            + (f" (did you mean '{prefix}{near[0]}'?)" if near else "")
            + (f" (and {', '.join(prefix + u for u in unknown[1:])})" if len(unknown) > 1 else "")
            + f"; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# YAML 1.1 reads these words as booleans; on the command line they are kept as text, so that
# `mixed_precision=no` sets the string "no" (a bool field still accepts them)
_YAML11_BOOLS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "model=x"]`` -> nested dict; values parsed as YAML scalars (except the YAML 1.1
    words yes/no/on/off/y/n, kept as text: a string field gets the word, a bool field its value)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = raw.strip() if raw.strip().lower() in _YAML11_BOOLS else (yaml.safe_load(raw) if raw != "" else "")
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key below the scalar '{p}'")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping. ``path`` may also name a packaged config (``tiny/dpo.yaml``, the old
    clone path ``configs/tiny/dpo.yaml``) or a recipe (``sd15-dpo``): see :mod:`diffalign.recipes`."""
    from .recipes import resolve_config

    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


# ``method`` value -> the config dataclass of the trainer that runs it. Trainers register their
# config here (:func:`register_config`, done by ``import diffalign.trainers``), so this layer
# never imports a trainer.
CONFIG_CLASSES: dict[str, type] = {}


def register_config(cls: type, *methods: str) -> None:
    """Make ``cls`` the config dataclass of every method in ``methods``."""
    for method in methods:
        CONFIG_CLASSES[method] = cls


def config_class_for(method: str) -> type:
    """The trainer config dataclass for a ``method`` value."""
    if not CONFIG_CLASSES:
        raise ConfigError("no trainer config is registered: import diffalign.trainers (it registers every "
                          "trainer's config) before load_config")
    if method not in CONFIG_CLASSES:
        raise ConfigError(f"config key 'method': unknown method {method!r}; valid: {', '.join(sorted(CONFIG_CLASSES))}")
    return CONFIG_CLASSES[method]


def load_config(path: str | Path | None, overrides: list[str] | None = None):
    """YAML + overrides -> the trainer config dataclass chosen by ``method``; validated.

    ``path``: a YAML file, a packaged config path (``tiny/dpo.yaml``) or a recipe name (``sd15-dpo``)."""
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    method = data.get("method", "dpo")
    if not isinstance(method, str):
        raise ConfigError(f"config key 'method': expected a string, got {method!r}")
    cfg = from_dict(config_class_for(method), data)
    cfg.validate()
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
