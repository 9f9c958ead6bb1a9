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
# Help as data
# --------------------------------------------------------------------------------------------


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field whose help is data: ``dataclasses.field`` with ``metadata={"help": help}``
    (trl's convention). ``help`` says what the key does and where its default comes from; it is
    what ``diffalign train CONFIG --help-keys``, ``diffalign recipes --show`` and the docs' config
    reference print. ``factory`` is ``default_factory`` (lists, nested blocks)."""
    return field(default=default, default_factory=factory, metadata={"help": " ".join(help.split())})


@dataclass(frozen=True)
class KeyHelp:
    """One config key as ``--help-keys`` and the docs print it."""

    key: str  # dotted, as in YAML overrides: ``sampler.num_steps``
    type: str  # ``int``, ``float | None``, ``list[int]``
    default: Any  # the dataclass default (a factory's value)
    value: Any  # the resolved value in the config asked about (the default without one)
    help: str  # the field's metadata["help"]; "" where a field has none (a test forbids that)


def config_keys(cfg_or_cls: Any, prefix: str = "") -> list[KeyHelp]:
    """Every leaf key of a config dataclass (class or instance), depth first in field order.

    >>> from diffalign.config import BaseTrainConfig, config_keys
    >>> row = next(k for k in config_keys(BaseTrainConfig) if k.key == "optim.learning_rate")
    >>> row.type, row.default
    ('float', 0.0001)
    """
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    instance = None if isinstance(cfg_or_cls, type) else cfg_or_cls
    hints = typing.get_type_hints(cls)
    rows: list[KeyHelp] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        value = getattr(instance, f.name) if instance is not None else default
        if dataclasses.is_dataclass(tp):
            rows.extend(config_keys(value if value is not None else tp, prefix + f.name + "."))
            continue
        rows.append(KeyHelp(prefix + f.name, _annotation_name(tp), default, value, f.metadata.get("help", "")))
        (item,) = typing.get_args(tp) if typing.get_origin(tp) is list else (None,)
        if dataclasses.is_dataclass(item):  # a list of blocks (``rewards``): the keys of one item
            rows.extend(config_keys(item, f"{prefix}{f.name}[]."))
    return rows


def yaml_key_comments(text: str) -> dict[str, str]:
    """Dotted key -> the comment a YAML config writes beside it (``key: value  # why``) or in the
    comment lines just above it. The file's opening comment block describes the file, not its
    first key. Keys inside a flow mapping (``lora: {rank: 32}  # why``) have no comment of their
    own: look up their block. Positions come from PyYAML's composed nodes, so flow mappings
    spread over lines are read right."""
    lines = text.splitlines()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    header_end = 0  # the opening comment block (and blank lines) of the file
    while header_end < len(lines) and (not lines[header_end].strip() or lines[header_end].lstrip().startswith("#")):
        header_end += 1
    out: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = prefix + str(key_node.value)
            said = []
            if not node.flow_style:
                above, row = [], key_node.start_mark.line - 1
                while row >= header_end and lines[row].lstrip().startswith("#"):
                    above.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                said.extend(above)
                end = value_node.end_mark
                # a block value ends at the start of the next line: its comment is on the key's line
                line = lines[end.line] if end.column and end.line < len(lines) else lines[key_node.start_mark.line]
                rest = line[end.column:] if end.column else line[key_node.end_mark.column:]
                if "#" in rest and rest.split("#", 1)[0].strip(" :,") == "":
                    said.append(rest.split("#", 1)[1].strip())
            if said:
                out[key] = " ".join(said)
            walk(value_node, key + ".")

    walk(root, "")
    return out


def _annotation_name(tp: Any) -> str:
    """``int | None`` rather than ``typing.Optional[int]``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_annotation_name(a) for a in args)
    if tp is type(None):
        return "None"
    if args:
        return f"{getattr(typing.get_origin(tp), '__name__', str(tp))}[{', '.join(_annotation_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


# --------------------------------------------------------------------------------------------
# Shared blocks
# --------------------------------------------------------------------------------------------


@dataclass
class ModelOptions:
    """How the backbone is loaded and run (``model`` itself is the top-level hub id or dir)."""

    revision: str | None = option(None, help=(

        "hub revision (branch, tag or commit) of the model; null: the default branch"

    ))
    variant: str | None = option(None, help='e.g. "fp16" weights files on the hub')
    vae: str | None = option(None, help="replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL)")
    attention: str = option("sdpa", help="sdpa | xformers | any diffusers attention backend name (DiTs)")
    gradient_checkpointing: bool = option(False, help=(
        "recompute the denoiser's activations in the backward pass: less memory, about a third more "
        "compute"
    ))
    vae_decode_batch: int = option(0, help=(
        "images per VAE decode call (rollouts, evaluation): 0 = a whole batch at once. Bounds the "
        "decode's peak memory beside the training state (Qwen-Image's VAE: ~0.9 GB per 512 px image in "
        "flight)"
    ))
    channels_last: bool = option(False, help="UNets: NHWC convolutions (faster on recent GPUs)")
    compile: bool = option(False, help="torch.compile the denoiser (in place, so adapters can still be toggled)")
    compile_backend: str = option("inductor", help=(
        "torch.compile backend when compile is true (torch._dynamo.list_backends(exclude_tags=()) names "
        "them)"
    ))
    max_sequence_length: int = option(256, help="T5 tokens for SD3/FLUX prompts")
    guidance: float = option(3.5, help=(
        "guidance-distilled models (FLUX.1-dev, FLUX.2-dev): the guidance input of forwards without a "
        "sampler (pair methods); diffusers' FLUX LoRA scripts train at 3.5"
    ))
    timestep_sampling: str = option("uniform", help="flow models: uniform | logit_normal | mode")
    logit_mean: float = option(0.0, help=(
        "timestep_sampling: logit_normal: the mean of the normal before the sigmoid (SD3 paper: 0)"
    ))
    logit_std: float = option(1.0, help="timestep_sampling: logit_normal: its standard deviation (SD3 paper: 1)")
    mode_scale: float = option(1.29, help=(
        "timestep_sampling: mode: the scale s of the mode sampling density (SD3 paper: 1.29)"
    ))


@dataclass
class LoraOptions:
    """LoRA via peft. ``rank: 0`` means full fine-tuning of the denoiser."""

    rank: int = option(8, help="LoRA rank r of every targeted linear/conv layer; 0: full fine-tuning of the denoiser")
    alpha: float | None = option(None, help="defaults to rank (scale 1)")
    dropout: float = option(0.0, help="LoRA dropout on the adapter input (peft lora_dropout)")
    target_modules: list[str] | None = option(None, help="None: the adapter's family default")
    init: str | bool = option("gaussian", help=(
        "peft init_lora_weights: gaussian | true (kaiming) | false (B and A random: a test-only "
        "non-identity start) | pissa | pissa_niter_N | olora | eva | corda | loftq | orthogonal"
    ))


@dataclass
class OptimOptions:
    learning_rate: float = option(1e-4, help=(
        "AdamW learning rate (the peak, after warm-up; times batch, accumulation and processes with "
        "scale_lr)"
    ))
    scale_lr: bool = option(False, help="multiply lr by batch * accumulation * processes (Diffusion-DPO did)")
    lr_scheduler: str = option("constant_with_warmup", help=(
        "diffusers.optimization.get_scheduler name: constant | constant_with_warmup | linear | cosine | "
        "cosine_with_restarts | polynomial | piecewise_constant"
    ))
    warmup_steps: int = option(0, help="optimizer steps of linear learning-rate warm-up (schedulers with warm-up)")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.999, help="AdamW beta2")
    weight_decay: float = option(1e-2, help="AdamW decoupled weight decay")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon")
    max_grad_norm: float = option(1.0, help=(
        "clip the global gradient norm to this before each optimizer step; 0: no clipping"
    ))
    use_8bit_adam: bool = option(False, help="bitsandbytes' 8-bit AdamW (needs diffalign[bnb] and a CUDA device)")


@dataclass
class DataOptions:
    """Pick-a-Pic-schema preference data (hub id, local dir or parquet files)."""

    split: str = option("train", help=(

        "the dataset split to read (Pick-a-Pic: train, validation, test, validation_unique, test_unique)"

    ))
    streaming: bool = option(False, help=(
        "read a hub dataset as a stream (no full download; rows are shuffled in a buffer of "
        "shuffle_buffer)"
    ))
    resolution: int = option(512, help="image side in pixels that pairs are resized and cropped to (a multiple of 8)")
    random_crop: bool = option(False, help="crop at a random position after resizing; false: a centre crop")
    random_flip: bool = option(True, help=(
        "flip both images of a pair horizontally with probability 0.5 (Diffusion-DPO's training did)"
    ))
    drop_ties: bool = option(True, help="drop pairs the raters called a tie (label_0 == 0.5), as Diffusion-DPO did")
    drop_identical: bool = option(True, help="rows with are_different == False")
    empty_prompt_prob: float = option(0.0, help='fraction of captions replaced by "" (CFG-style dropout)')
    caption_column: str = option("caption", help="the column holding the prompt")
    max_samples: int | None = option(None, help=(
        "read at most this many rows (after dropping ties and identical pairs); null: all"
    ))
    shuffle_buffer: int = option(1000, help="streaming only")
    cache: bool = option(True, help=(
        "Pair trainer: precompute VAE latent moments and prompt embeddings once and train from them (the "
        "same estimator: fresh timestep and noise every step; diffalign.data.cache). Built on first use, "
        "content-keyed; false: encode every batch with the VAE and text encoders."
    ))
    cache_dir: str | None = option(None, help=(
        "where the cache lives; None: ~/.cache/diffalign/latents/<content key> ($DIFFALIGN_LATENT_CACHE / "
        "$DIFFALIGN_CACHE move it)"
    ))
    cache_dtype: str = option("float32", help=(
        "dtype of the cached latent moments and prompt embeddings: float32 | bfloat16 | float16. The "
        "16-bit ones halve the cache (FLUX.1 at 1024 px: 8 MiB a pair in float32 with flips); the "
        "training step casts them to its own dtype anyway, so bfloat16 suits a bf16 run."
    ))
    num_workers: int = option(0, help="torch DataLoader worker processes (0: load in the training process)")


@dataclass
class BaseTrainConfig:
    """Keys shared by every trainer. ``model``, ``data``, ``output_dir``, ``max_steps`` and
    ``seed`` are the public contract of ``diffalign train``."""

    method: str = option("dpo", help=(

        "the method that runs: an offline method (dpo, mapo, sft, kto, ...) or an online one (grpo, nft, "

        "awm); it picks the trainer and its config"

    ))
    model: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5", help=(
        "the backbone: a hub id or a local diffusers directory (its model_index.json picks the family "
        "adapter)"
    ))
    data: str | None = option(None, help=(
        "preference data (pair trainer) or a prompt file (online trainers): hub id, dataset dir, parquet, "
        "txt or jsonl"
    ))
    output_dir: str = option("outputs/run", help=(
        "where the run writes metrics.jsonl, config.yaml, weights, checkpoints and its model card"
    ))
    max_steps: int = option(1000, help=(
        "optimizer steps to train (each over batch_size x gradient_accumulation_steps x processes "
        "samples)"
    ))
    seed: int = option(0, help=(
        "seed of every random draw (data order, noise, timesteps, rollouts); same config and seed: same "
        "run"
    ))
    mixed_precision: str = option("no", help="no | fp16 | bf16")
    batch_size: int = option(1, help="per process")
    gradient_accumulation_steps: int = option(1, help=(
        "micro-batches whose gradients are summed before each optimizer step"
    ))
    log_every: int = option(1, help=(
        "optimizer steps between metric lines in metrics.jsonl and the trackers (the last step is always "
        "logged)"
    ))
    report_to: str = option("none", help="none | tensorboard | wandb | all")
    allow_tf32: bool = option(True, help=(
        "allow TF32 matmuls on Ampere+ GPUs (torch.backends.cuda.matmul.allow_tf32); no effect on CPU"
    ))
    checkpoint_every: int = option(0, help="optimizer steps between checkpoints (0 = none)")
    checkpoints_keep: int = option(3, help="keep the last K checkpoints")
    resume: str | None = option(None, help='"latest" or a checkpoint dir; only a checkpoint of the same config resumes')
    overwrite: bool = option(False, help=(
        "true: remove a previous run's files from output_dir (metrics, checkpoints, weights) and start "
        "fresh. Without it a non-empty output_dir of a different config is refused."
    ))
    model_opts: ModelOptions = option(factory=ModelOptions, help="how the backbone is loaded and run")
    lora: LoraOptions = option(factory=LoraOptions, help="the LoRA adapter (peft), or full fine-tuning with rank 0")
    optim: OptimOptions = option(factory=OptimOptions, help="optimizer and learning-rate schedule")

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
