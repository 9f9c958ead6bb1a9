"""Model shapes without weights: the packaged shape configs, meta-device builds and what they count.

``diffalign/configs/model_shapes/<folder>/<component>.json`` holds the ``config.json`` fields of a
real checkpoint's component (its hub repo and file in ``_source``). :func:`build_meta` turns one
into the module on the ``meta`` device -- every parameter has its real shape and no storage -- so
parameter counts are exact and instant, and no hub, weights or GPU are involved:

* diffusers components (``_class_name``): ``getattr(diffusers, _class_name).from_config(cfg)``;
* transformers components (``architectures`` + ``model_type``): ``AutoConfig.for_model`` and the
  named class's ``_from_config``;
* diffalign's own reward modules (``_library: diffalign``): ImageReward's BLIP and the LAION head.

:func:`probe_activations` measures the activation bytes autograd saves in one training forward of
a denoiser, on the meta device (see its docstring for what is counted). Both are precomputed for
every shape config into ``model_shapes/counts.json`` by ``scripts/model_shape_counts.py``
(``tests/test_plan.py`` rebuilds the SD1.5 entries and compares), so ``diffalign plan`` reads
numbers and builds only the denoiser whose LoRA it counts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import UserError
from ..recipes import configs_root

SHAPES_FOLDER = "model_shapes"
COUNTS_FILE = "counts.json"
COUNTS_VERSION = 1

# Lists of blocks diffusers wraps in torch.utils.checkpoint when gradient checkpointing is on
# (UNets: each resnet, and each BasicTransformerBlock inside a Transformer2DModel; DiTs: each
# transformer block). The outermost module of such a list is one recomputation unit.
CHECKPOINT_LISTS = ("resnets", "transformer_blocks", "single_transformer_blocks")
# shape-config file names of denoisers (their entries get the activation fit)
DENOISER_FILES = ("unet.json", "transformer.json")


# ----------------------------------------------------------------------------- shape configs
def shape_config(rel: str) -> dict[str, Any]:
    """The packaged shape config ``model_shapes/<rel>`` (``sd15/unet.json``) as a dict."""
    node = configs_root().joinpath(SHAPES_FOLDER)
    for part in rel.split("/"):
        node = node.joinpath(part)
    if not node.is_file():
        raise UserError(f"shape config '{rel}' is missing from this diffalign install (reinstall diffalign)")
    return json.loads(node.read_text(encoding="utf-8"))


def shape_configs() -> list[str]:
    """Every packaged shape config, as ``folder/file.json``, sorted."""
    root = configs_root().joinpath(SHAPES_FOLDER)
    out = []
    for folder in root.iterdir():
        if folder.is_dir():
            out += [f"{folder.name}/{f.name}" for f in folder.iterdir() if f.is_file() and f.name.endswith(".json")]
    return sorted(out)


def _fields(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def build_meta(rel: str) -> torch.nn.Module:
    """The module of shape config ``rel`` on the meta device (real shapes, no storage)."""
    cfg = shape_config(rel)
    with torch.device("meta"):
        if cfg.get("_library") == "diffalign":
            from ..rewards.clip import AestheticMLP
            from ..rewards.imagereward import ImageRewardConfig, ImageRewardModel

            builders = {"ImageRewardModel": lambda f: ImageRewardModel(ImageRewardConfig(**f)), "AestheticMLP": lambda f: AestheticMLP(**f)}
            return builders[cfg["_class_name"]](_fields(cfg))
        if "_class_name" in cfg:
            import diffusers

            return getattr(diffusers, cfg["_class_name"]).from_config({k: v for k, v in cfg.items() if k != "_source"})
        import transformers

        config = transformers.AutoConfig.for_model(cfg["model_type"], **_fields(cfg))
        return getattr(transformers, cfg["architectures"][0])._from_config(config)


@functools.lru_cache(maxsize=8)
def meta_module(rel: str) -> torch.nn.Module:
    """:func:`build_meta`, once per process (read-only use: LoRA layer shapes)."""
    return build_meta(rel)


def count_params(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, floating-point buffer elements): the buffers (SD3's positional table) are
    weights in memory too, cast with the module."""
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return params, buffers


def checkpoint_units(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost blocks of the :data:`CHECKPOINT_LISTS` lists: what gradient checkpointing
    recomputes one at a time."""
    units: list[tuple[str, torch.nn.Module]] = []
    inside: set[str] = set()
    for name, m in module.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent.rpartition(".")[2] in CHECKPOINT_LISTS:
            if not any(name.startswith(u + ".") for u in inside):
                units.append((name, m))
                inside.add(name)
    return units


def largest_unit_params(module: torch.nn.Module) -> int:
    """Parameters of the largest checkpoint unit (also FSDP's wrap unit for the DiTs)."""
    units = checkpoint_units(module)
    return max((sum(p.numel() for p in m.parameters()) for _, m in units), default=0)


# ------------------------------------------------------------------------------------- LoRA
def lora_targets_match(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the module's full name, or its name ending in
    ``.TARGET`` (``peft.tuners.tuners_utils.check_target_module_exists``)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layer_params(layer: torch.nn.Module, rank: int) -> int:
    """LoRA parameters peft adds to one layer (no bias, no DoRA): ``A`` and ``B``.

    Linear: ``r * (in + out)``; Conv: ``A`` is a conv of the layer's kernel to ``r`` channels
    (``r * in/groups * prod(kernel)``), ``B`` a 1x1 conv (``r * out``); Embedding: ``r * (num + dim)``."""
    if isinstance(layer, torch.nn.Linear):
        return rank * (layer.in_features + layer.out_features)
    if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return rank * (layer.in_channels // layer.groups * math.prod(layer.kernel_size) + layer.out_channels)
    if isinstance(layer, torch.nn.Embedding):
        return rank * (layer.num_embeddings + layer.embedding_dim)
    raise UserError(f"LoRA target {type(layer).__name__} is not a layer peft adapts (Linear, Conv, Embedding)")


def lora_param_count(module: torch.nn.Module, targets: Iterable[str], rank: int) -> tuple[int, int]:
    """(LoRA parameters, adapted layers) of ``module`` with ``targets`` at ``rank``: the sum of
    :func:`lora_layer_params` over the layers whose names match (:func:`lora_targets_match`)."""
    targets = list(targets)
    total = layers = 0
    for name, m in module.named_modules():
        if name and lora_targets_match(name, targets) and not list(m.children()):
            total += lora_layer_params(m, rank)
            layers += 1
    if not layers:
        raise UserError(f"lora.target_modules {targets} match no layer of {type(module).__name__}")
    return total, layers


# ------------------------------------------------------------------------------ activations
class _FusedAttention(torch.autograd.Function):
    """A fused SDPA kernel's autograd footprint (FlashAttention / memory-efficient attention): it
    saves q, k, v, the output and a float32 log-sum-exp per query row, never the score matrix. On
    the meta device PyTorch would take the math path and save the full scores."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the probe never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention_footprint() -> Iterator[None]:
    """``torch.nn.functional.scaled_dot_product_attention`` as :class:`_FusedAttention` (the probe only)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes live tensors hold while ops run under it: each op's fresh (non-view)
    outputs count until they are garbage collected (``weakref.finalize``). On the meta device this
    is what a forward allocates, with no allocator cache or fragmentation."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in _tensors(out):
                n = _nbytes(t)
                self.current += n
                self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.current -= n


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def denoiser_inputs(module: torch.nn.Module, latent_side: int, text_tokens: int, dtype=torch.bfloat16) -> dict:
    """One sample's forward kwargs for a denoiser class, as its adapter calls it, on the meta
    device: a square latent of ``latent_side`` (pixels / 8) and ``text_tokens`` prompt tokens."""
    c = module.config
    name = type(module).__name__
    s = latent_side
    f = dict(dtype=dtype, device="meta")
    t = torch.ones(1, device="meta")
    if name == "UNet2DConditionModel":
        kw = dict(sample=torch.empty(1, c.in_channels, s, s, **f), timestep=t,
                  encoder_hidden_states=torch.empty(1, text_tokens, c.cross_attention_dim, **f))
        if c.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.empty(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, **f),
                "time_ids": torch.empty(1, 6, **f)}
        return kw
    if name == "SD3Transformer2DModel":
        return dict(hidden_states=torch.empty(1, c.in_channels, s, s, **f), timestep=t,
                    encoder_hidden_states=torch.empty(1, text_tokens, c.joint_attention_dim, **f),
                    pooled_projections=torch.empty(1, c.pooled_projection_dim, **f))
    tokens = (s // 2) ** 2
    if name == "FluxTransformer2DModel":
        kw = dict(hidden_states=torch.empty(1, tokens, c.in_channels, **f), timestep=t,
                  encoder_hidden_states=torch.empty(1, text_tokens, c.joint_attention_dim, **f),
                  pooled_projections=torch.empty(1, c.pooled_projection_dim, **f),
                  img_ids=torch.zeros(tokens, 3, device="meta"), txt_ids=torch.zeros(text_tokens, 3, device="meta"))
        if c.guidance_embeds:
            kw["guidance"] = t
        return kw
    if name == "Flux2Transformer2DModel":
        kw = dict(hidden_states=torch.empty(1, tokens, c.in_channels, **f), timestep=t,
                  encoder_hidden_states=torch.empty(1, text_tokens, c.joint_attention_dim, **f),
                  img_ids=torch.zeros(1, tokens, 4, device="meta"), txt_ids=torch.zeros(1, text_tokens, 4, device="meta"))
        if c.guidance_embeds:
            kw["guidance"] = t
        return kw
    if name == "QwenImageTransformer2DModel":
        return dict(hidden_states=torch.empty(1, tokens, c.in_channels, **f), timestep=t,
                    encoder_hidden_states=torch.empty(1, text_tokens, c.joint_attention_dim, **f),
                    encoder_hidden_states_mask=torch.ones(1, text_tokens, dtype=torch.bool, device="meta"),
                    img_shapes=[[(1, s // 2, s // 2)]])
    raise UserError(f"no activation probe for {name}")


def probe_activations(module: torch.nn.Module, latent_side: int, text_tokens: int) -> dict[str, int]:
    """Activation bytes of one sample's training forward of ``module`` (a meta-device denoiser,
    cast to bf16: mixed-precision activations), every parameter trainable. Counted through
    ``torch.autograd.graph.saved_tensors_hooks``: each tensor autograd saves for the backward,
    once (by identity), parameters excluded, attention as a fused kernel saves it
    (:class:`_FusedAttention`). Returns

    * ``total``: everything saved -- the activation memory without gradient checkpointing;
    * ``outside``: saved outside the checkpoint units (:func:`checkpoint_units`);
    * ``unit_inputs``: the tensors the units are called with (each once): what checkpointing keeps;
    * ``max_unit``: the most one unit saves: what its recomputation holds during the backward;
    * ``nograd_peak``: the peak of live bytes in a forward under ``torch.no_grad`` (a rollout or
      reference pass), inputs included (:class:`LiveBytes`).

    With checkpointing the forward keeps ``outside + unit_inputs`` and the backward adds one
    recomputed unit: ``outside + unit_inputs + max_unit``.
    """
    module.requires_grad_(True)
    params = {id(p) for p in module.parameters()}
    units = checkpoint_units(module)
    per_unit = dict.fromkeys((id(m) for _, m in units), 0)
    state: dict[str, Any] = {"unit": None, "outside": 0, "inputs": 0}
    seen: dict[int, torch.Tensor] = {}  # keeps every counted tensor alive, so ids stay unique
    inputs_seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        if id(t) in params or (t._base is not None and id(t._base) in params) or id(t) in seen:
            return t
        seen[id(t)] = t
        if state["unit"] is None:
            state["outside"] += _nbytes(t)
        else:
            per_unit[id(state["unit"])] += _nbytes(t)
        return t

    def pre(m, args, kwargs):
        if state["unit"] is None:
            state["unit"] = m
            for t in _tensors((args, kwargs)):
                if id(t) not in params and id(t) not in inputs_seen and t.is_floating_point():
                    inputs_seen[id(t)] = t
                    state["inputs"] += _nbytes(t)

    def post(m, args, kwargs, out):
        if state["unit"] is m:
            state["unit"] = None

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for _, m in units]
    handles += [m.register_forward_hook(post, with_kwargs=True) for _, m in units]
    try:
        with fused_attention_footprint(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(**denoiser_inputs(module, latent_side, text_tokens), return_dict=False)
    finally:
        for h in handles:
            h.remove()
    unit_total = sum(per_unit.values())
    live = LiveBytes()
    with fused_attention_footprint(), torch.no_grad(), live:
        module(**denoiser_inputs(module, latent_side, text_tokens), return_dict=False)
    return {"total": state["outside"] + unit_total, "outside": state["outside"], "unit_inputs": state["inputs"],
            "max_unit": max(per_unit.values(), default=0), "nograd_peak": live.peak}


def probe_vae(module: torch.nn.Module, side: int = 256) -> dict[str, float]:
    """Peak live bytes per image pixel of a VAE (cast to bf16) encoding and decoding one image
    under ``torch.no_grad`` (:class:`LiveBytes`; linear in the pixels: the feature maps are)."""
    five_d = type(module).__name__ == "AutoencoderKLQwenImage"  # a video VAE: [B, C, frames, H, W]
    x = torch.empty(1, 3, side, side, device="meta", dtype=torch.bfloat16)
    x = x.unsqueeze(2) if five_d else x
    with torch.no_grad():
        enc = LiveBytes()
        with enc:
            z = module.encode(x).latent_dist.mean
        dec = LiveBytes()
        with dec:
            module.decode(torch.empty(z.shape, device="meta", dtype=torch.bfloat16))
    return {"encode": enc.peak / side**2, "decode": dec.peak / side**2}


# The probe points: (latent side, text tokens). UNets: two image sizes at CLIP's 77 tokens, a
# line in latent pixels; DiTs: three points, a plane in image and text tokens. A fourth point
# checks the fit (``scripts/model_shape_counts.py`` prints its error).
UNET_PROBES = ((32, 77), (64, 77))
DIT_PROBES = ((32, 64), (64, 64), (32, 256))
CHECK_PROBE = (96, 128)
PROBE_KEYS = ("total", "outside", "unit_inputs", "max_unit", "nograd_peak")
# shape-config file names of VAEs (their entries get the no-grad encode/decode peaks)
VAE_FILES = ("vae.json",)


def is_unet(module_or_name) -> bool:
    name = module_or_name if isinstance(module_or_name, str) else type(module_or_name).__name__
    return name.startswith("UNet")


def image_tokens(latent_side: int) -> int:
    """DiT image tokens of a square latent: 2x2 patches (SD3, FLUX.1, Qwen-Image pack them; FLUX.2's
    VAE does)."""
    return (latent_side // 2) ** 2


def fit_activations(module: torch.nn.Module) -> dict[str, Any]:
    """Probe ``module`` at the probe points and fit each :func:`probe_activations` quantity:
    UNets ``a + b * latent_pixels``, DiTs ``a + b * image_tokens + c * text_tokens``."""
    unet = is_unet(module)
    points = UNET_PROBES if unet else DIT_PROBES
    probes = [probe_activations(module, s, t) for s, t in points]
    fits = {}
    for key in PROBE_KEYS:
        if unet:
            (s0, _), (s1, _) = points
            b = (probes[1][key] - probes[0][key]) / (s1 * s1 - s0 * s0)
            fits[key] = [probes[0][key] - b * s0 * s0, b]
        else:
            (s0, t0), (s1, _), (_, t2) = points
            b = (probes[1][key] - probes[0][key]) / (image_tokens(s1) - image_tokens(s0))
            c = (probes[2][key] - probes[0][key]) / (t2 - t0)
            fits[key] = [probes[0][key] - b * image_tokens(s0) - c * t0, b, c]
    return {"basis": "latent_pixels" if unet else "tokens", "fit": fits}


def fitted_activations(entry: dict, latent_side: int, text_tokens: int) -> dict[str, float]:
    """The fitted :func:`probe_activations` bytes of one sample (a ``counts.json`` model entry)."""
    act = entry["activations"]
    if act["basis"] == "latent_pixels":
        return {k: a + b * latent_side * latent_side for k, (a, b) in act["fit"].items()}
    n = image_tokens(latent_side)
    return {k: a + b * n + c * text_tokens for k, (a, b, c) in act["fit"].items()}


# ------------------------------------------------------------------------------- the counts
def count_entry(rel: str, activations: bool | None = None) -> dict[str, Any]:
    """One ``counts.json`` entry: parameters, buffers, and for a denoiser its largest checkpoint
    unit and its activation fit."""
    module = build_meta(rel)
    params, buffers = count_params(module)
    entry: dict[str, Any] = {"class": type(module).__name__, "params": params, "buffers": buffers}
    denoiser = activations if activations is not None else rel.rsplit("/", 1)[-1] in DENOISER_FILES
    if denoiser:
        entry["largest_unit_params"] = largest_unit_params(module)
        from ..logging import FP32_MODULES_NOTICE, library_call

        with library_call(FP32_MODULES_NOTICE):
            module.to(torch.bfloat16)
        entry["activations"] = fit_activations(module)
    elif rel.rsplit("/", 1)[-1] in VAE_FILES:
        from ..logging import FP32_MODULES_NOTICE, library_call

        with library_call(FP32_MODULES_NOTICE):
            module.to(torch.bfloat16)
        entry["peak_bytes_per_pixel"] = probe_vae(module)
    return entry


@functools.lru_cache(maxsize=1)
def load_counts() -> dict[str, Any]:
    """``model_shapes/counts.json`` (written by ``scripts/model_shape_counts.py``)."""
    node = configs_root().joinpath(SHAPES_FOLDER).joinpath(COUNTS_FILE)
    if not node.is_file():
        raise UserError(f"{SHAPES_FOLDER}/{COUNTS_FILE} is missing from this diffalign install "
                        "(python scripts/model_shape_counts.py writes it)")
    counts = json.loads(node.read_text(encoding="utf-8"))
    if counts.get("version") != COUNTS_VERSION:
        raise UserError(f"{SHAPES_FOLDER}/{COUNTS_FILE} is version {counts.get('version')}, this diffalign reads "
                        f"{COUNTS_VERSION}: rerun scripts/model_shape_counts.py")
    return counts


def counts_for(rel: str) -> dict[str, Any]:
    models = load_counts()["models"]
    if rel not in models:
        raise UserError(f"{SHAPES_FOLDER}/{COUNTS_FILE} has no entry for {rel}: rerun scripts/model_shape_counts.py")
    return models[rel]


__all__ = [
    "CHECKPOINT_LISTS", "COUNTS_FILE", "build_meta", "checkpoint_units", "count_entry", "count_params", "counts_for",
    "denoiser_inputs", "fit_activations", "fitted_activations", "fused_attention_footprint", "image_tokens", "is_unet",
    "largest_unit_params", "load_counts", "lora_layer_params", "lora_param_count", "lora_targets_match", "meta_module",
    "probe_activations", "probe_vae", "shape_config", "shape_configs", "LiveBytes",
]
