"""GPU memory per training process of a config, as numbers: what each trainer keeps on the GPU.

Every term is ``count x bytes`` (``count`` from the shape counts of :mod:`.shapes`, exact) except
the activations (an estimate, see :func:`activation_terms`). The rules follow the trainers:

* **denoiser**: LoRA (``lora.rank > 0``) loads it in the run's dtype (bf16/fp16 under mixed
  precision) and adds fp32 LoRA weights; full fine-tuning (``lora.rank: 0``) keeps it in fp32 and
  trains all of it (``trainers.common.build_trainable``).
* **reference**: a method that compares with a frozen reference (``needs_reference``: DPO, the
  GRPO/NFT/AWM KL) uses the LoRA-disabled network under LoRA (no copy) and a second copy of the
  denoiser in the run's dtype under full fine-tuning.
* **VAE and text encoders** in the run's dtype, resident -- except for a pair run that trains from
  the latent cache (``data.cache.cache_applies``), which releases them before training.
* **reward models** (online methods) in float32 (the rewards' default dtype; ``args.dtype`` changes it).
* **EMA** (``ema.enabled``), DiffusionNFT's old policy and AWM's EMA-KL anchor: fp32 copies of
  the trainable parameters.
* **trainable**: the fp32 master weights (4 B a parameter), plus under mixed precision the 16-bit
  working copies autocast makes in the forward and the backward still holds (2 B a parameter;
  under FSDP the all-gathered units instead: 2 x the largest block).
* **gradients**: fp32, 4 B a trainable parameter; with DDP on more than one GPU another 4 B for
  DDP's gradient buckets (accelerate's default ``gradient_as_bucket_view=False``).
* **optimizer**: AdamW's two fp32 moments, 8 B a trainable parameter; 2 B with
  ``optim.use_8bit_adam`` (bitsandbytes' AdamW8bit).
* **sharding** (only where the recipe's launch line uses ``accelerate/fsdp`` or
  ``accelerate/deepspeed_zero2``, or ``--sharded``): FSDP full shard divides the denoiser's
  weights, trainable weights, EMA/old-policy copies, gradients and optimizer states by N; ZeRO-2
  divides gradients and optimizer states. DDP replicates everything.
* a fixed 1 GiB for the CUDA context and library workspaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ..errors import UserError
from .shapes import (counts_for, fitted_activations, image_tokens, is_unet, lora_param_count, meta_module,
                     shape_config)

GiB = 2**30
CUDA_OVERHEAD_BYTES = 1 * GiB
SHARDINGS = ("ddp", "fsdp", "zero2")
COLUMNS = ("weights", "trainable", "grads", "optimizer", "activations")


@dataclass(frozen=True)
class ModelShapes:
    """The shape configs of one pipeline: ``family`` is its ``diffalign.models.FAMILIES`` key."""

    family: str
    denoiser: str
    vae: str
    text_encoders: tuple[tuple[str, str], ...]  # (pipeline attribute, shape config)


_SD15 = ModelShapes("sd15", "sd15/unet.json", "sd15/vae.json", (("text_encoder", "encoders/clip_l.json"),))
_SD35_ENCODERS = (("text_encoder", "encoders/clip_l_proj.json"), ("text_encoder_2", "encoders/openclip_bigg_proj.json"),
                  ("text_encoder_3", "encoders/t5_xxl.json"))
# hub id -> shapes (each file names the hub config it copies)
MODEL_SHAPES: dict[str, ModelShapes] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "CompVis/stable-diffusion-v1-4": _SD15,  # the same architecture as v1-5
    "stabilityai/stable-diffusion-xl-base-1.0": ModelShapes(
        "sdxl", "sdxl/unet.json", "sdxl/vae.json",
        (("text_encoder", "encoders/clip_l.json"), ("text_encoder_2", "encoders/openclip_bigg_proj.json"))),
    "stabilityai/stable-diffusion-3.5-medium": ModelShapes("sd3", "sd35_medium/transformer.json", "sd35_medium/vae.json", _SD35_ENCODERS),
    "stabilityai/stable-diffusion-3.5-large": ModelShapes("sd3", "sd35_large/transformer.json", "sd35_medium/vae.json", _SD35_ENCODERS),
    "black-forest-labs/FLUX.1-dev": ModelShapes(
        "flux", "flux1_dev/transformer.json", "flux1_dev/vae.json",
        (("text_encoder", "encoders/clip_l.json"), ("text_encoder_2", "encoders/t5_xxl.json"))),
    "black-forest-labs/FLUX.2-dev": ModelShapes(
        "flux2", "flux2_dev/transformer.json", "flux2_dev/vae.json", (("text_encoder", "encoders/mistral_small_31_24b.json"),)),
    "Qwen/Qwen-Image": ModelShapes("qwenimage", "qwen_image/transformer.json", "qwen_image/vae.json",
                                   (("text_encoder", "encoders/qwen25_vl_7b.json"),)),
}
# model_opts.vae replacements of the same architecture
VAE_SHAPES = {"madebyollin/sdxl-vae-fp16-fix": "sdxl/vae.json"}
# reward name (diffalign.rewards registry) -> the shape configs of the models it loads
REWARD_SHAPES: dict[str, tuple[str, ...]] = {
    "pickscore": ("rewards/clip_vit_h14.json",),  # CLIP ViT-H/14 fine-tuned on Pick-a-Pic
    "hpsv2": ("rewards/clip_vit_h14.json",),  # open_clip ViT-H/14 (HPSv2.1 weights)
    "hpsv2.1": ("rewards/clip_vit_h14.json",),
    "hpsv2.0": ("rewards/clip_vit_h14.json",),
    "imagereward": ("rewards/imagereward.json",),  # BLIP ViT-L/16 + BERT-base with cross-attention + MLP
    "aesthetic": ("rewards/clip_vit_l14.json", "rewards/aesthetic_head.json"),  # CLIP ViT-L/14 + MLP
    "clipscore": ("rewards/clip_vit_b32.json",),  # Hessel et al.: ViT-B/32
    "clip": ("rewards/clip_vit_b32.json",),
    "clipscore_l14": ("rewards/clip_vit_l14.json",),
}
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}


@dataclass
class Part:
    """One term of a plan: ``bytes`` in ``column``, with the count and formula that give it."""

    column: str
    what: str
    bytes: float
    formula: str


@dataclass
class MemoryPlan:
    label: str
    model: str
    method: str
    gpus: int
    gpu_mem_gib: float
    sharding: str
    sharding_source: str
    trainable_params: int
    lora_layers: int  # 0: full fine-tuning
    parts: list[Part] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def column(self, name: str) -> float:
        return sum(p.bytes for p in self.parts if p.column == name)

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def headroom_gib(self) -> float:
        return self.gpu_mem_gib - self.total / GiB

    @property
    def fits(self) -> bool:
        return self.headroom_gib >= 0


# ------------------------------------------------------------------------------------ helpers
def model_shapes(model: str) -> ModelShapes:
    if model in MODEL_SHAPES:
        return MODEL_SHAPES[model]
    raise UserError(f"no packaged shape config for model={model!r}; diffalign plan knows {', '.join(MODEL_SHAPES)} "
                    "(add its configs under diffalign/configs/model_shapes and a line to diffalign.plan.estimate.MODEL_SHAPES)")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _n(n: float) -> str:
    return f"{int(n):,}"


def _weights_part(column: str, what: str, rel: str, nbytes: int, dtype: str, divide: int = 1) -> Part:
    c = counts_for(rel)
    count = c["params"] + c["buffers"]
    shard = f" / {divide} GPUs" if divide > 1 else ""
    return Part(column, f"{what} ({c['class']})", count * nbytes / divide, f"{_n(count)} params x {nbytes} B ({dtype}){shard}")


def _cfg_rows(cfg, family: str) -> int:
    """2 when a denoiser forward carries CFG's unconditional rows (online samplers with CFG on a
    family whose guidance is not distilled), else 1."""
    from ..models import FAMILIES

    s = getattr(cfg, "sampler", None)
    if s is None or FAMILIES[family].distilled_guidance:
        return 1
    return 2 if s.cfg and s.guidance_scale > 1.0 else 1


def text_tokens(cfg, family: str) -> int:
    """Prompt tokens the denoiser attends to: CLIP's 77 (UNets), 77 + T5's (SD3), the padded
    ``model_opts.max_sequence_length`` (FLUX.1/2, Qwen-Image)."""
    msl = int(cfg.model_opts.max_sequence_length)
    return {"sd15": 77, "sdxl": 77, "sd3": 77 + msl}.get(family, msl)


# ---------------------------------------------------------------------------------- activations
def activation_terms(cfg, shapes: ModelShapes, is_pair: bool, cached: bool, needs_reference: bool) -> tuple[list[Part], list[Part]]:
    """(the candidates for the activation peak, largest first; the terms added to it) for one process.

    Per sample, from the denoiser's probe fit (:func:`.shapes.fitted_activations` at the run's
    latent side = resolution / 8 and its prompt tokens): ``S`` = the bytes autograd saves in a
    training forward without checkpointing; with ``model_opts.gradient_checkpointing``
    ``S_ckpt = S_outside + I_units + max_u S_u`` (what is saved outside the checkpointed blocks,
    the blocks' stored inputs, one block recomputed in the backward). Candidates, which never
    coexist (the largest is the peak):

    * training forward + backward: ``rows x S`` (or ``S_ckpt``); rows = 2 x batch_size for pair
      methods (chosen + rejected in one forward; batch_size for unpaired data), train_batch_size
      x (2 with CFG) for online ones;
    * a no-grad denoiser forward (the reference pass of a pair method, an online rollout at
      batch_size x (2 with CFG) rows): ``rows x P`` with ``P`` the probe's peak of live bytes of
      one sample's no-grad forward;
    * the VAE at full resolution, no grad (a pair run without the latent cache encodes its 2 x
      batch_size images; an online run decodes batch_size images): ``images x H x W x p`` with
      ``p`` the VAE probe's peak bytes per pixel (bf16). With ``reward_threads > 0`` the decode of
      one rollout batch runs on the reward thread while the next batch samples: the two add up.

    Added to the peak for online methods: the step's trajectories, which stay on the GPU while it
    trains on them (``prompts_per_step x group_size`` images x ``num_steps + 1`` latents and step
    means in fp32).
    """
    den = counts_for(shapes.denoiser)
    res = int(cfg.data_opts.resolution if is_pair else cfg.sampler.resolution)
    side = res // 8 if is_unet(den["class"]) else 2 * (res // 16)
    tokens = text_tokens(cfg, shapes.family)
    per = fitted_activations(den, side, tokens)
    ckpt = bool(cfg.model_opts.gradient_checkpointing)
    per_train = per["outside"] + per["unit_inputs"] + per["max_unit"] if ckpt else per["total"]
    cfg_rows = _cfg_rows(cfg, shapes.family)
    where = (f"{res} px (latent {side}x{side}" + (f", {image_tokens(side)} image + {tokens} text tokens)" if not is_unet(den["class"])
                                                  else f", {tokens} text tokens)"))
    mode = "checkpointed: outside + unit inputs + one unit" if ckpt else "no checkpointing: all saved"
    if is_pair:
        unpaired = "unpaired" in cfg.objective.variant.value
        rows = cfg.batch_size * (1 if unpaired else 2)
        rows_text = f"{cfg.batch_size} {'example(s)' if unpaired else 'pair(s) x 2'}"
        nograd_rows, nograd_what = (rows, "reference forward (no grad)") if needs_reference else (0, "")
        vae_images, vae_what = (0, "") if cached else (rows, "VAE encode of the batch (no grad)")
    else:
        rows = cfg.train_batch_size * cfg_rows
        rows_text = f"{cfg.train_batch_size} transitions" + (" x 2 (CFG)" if cfg_rows == 2 else "")
        nograd_rows, nograd_what = cfg.batch_size * cfg_rows, "rollout forward (no grad)"
        decode_batch = cfg.model_opts.vae_decode_batch or cfg.batch_size
        vae_images = min(decode_batch, cfg.batch_size)
        vae_what = "VAE decode of a rollout batch (no grad" + (f", {vae_images} images per call)" if vae_images < cfg.batch_size else ")")
    candidates = [Part("activations", f"training forward+backward at {where}", rows * per_train,
                       f"{rows_text} = {rows} rows x {_gib(per_train)}/row ({mode})")]
    nograd = vae = None
    if nograd_rows:
        nograd = Part("activations", nograd_what, nograd_rows * per["nograd_peak"],
                      f"{nograd_rows} rows x {_gib(per['nograd_peak'])} (no-grad peak per row)")
    if vae_images:
        per_pixel = counts_for(VAE_SHAPES.get(cfg.model_opts.vae or "", shapes.vae))["peak_bytes_per_pixel"]
        b = per_pixel["encode" if is_pair else "decode"]
        vae = Part("activations", vae_what, vae_images * res * res * b,
                   f"{vae_images} images x {res}x{res} px x {b:.0f} B/px (no-grad peak)")
    if not is_pair and getattr(cfg, "reward_threads", 0) > 0 and nograd and vae:
        # the reward thread decodes (and scores) one batch while the main thread samples the next
        candidates.append(Part("activations", "rollout forward + the previous batch's VAE decode on the reward thread",
                               nograd.bytes + vae.bytes, f"{nograd.formula} + {vae.formula}"))
    else:
        candidates += [p for p in (nograd, vae) if p is not None]
    candidates.sort(key=lambda p: -p.bytes)
    extra = []
    if not is_pair:  # the step's trajectories stay on the GPU while it trains on them
        den_cfg = shape_config(shapes.denoiser)
        per_latent = den_cfg["in_channels"] * (side * side if is_unet(den["class"]) or shapes.family == "sd3" else image_tokens(side))
        images = cfg.prompts_per_step * cfg.group_size
        steps = cfg.sampler.num_steps + 1
        extra.append(Part("activations", "stored rollout trajectories (latents and step means, fp32)",
                          images * steps * per_latent * 4 * 2,
                          f"{images} images x {steps} states x {_n(per_latent)} x 4 B x 2"))
    return candidates, extra


# ------------------------------------------------------------------------------------- the plan
def plan_config(cfg, *, label: str | None = None, gpus: int = 1, gpu_mem_gib: float = 80.0, sharding: str = "ddp",
                sharding_source: str = "default") -> MemoryPlan:
    """The per-process memory plan of a loaded training config (``diffalign.config.load_config``)."""
    from ..models import FAMILIES

    if sharding not in SHARDINGS:
        raise UserError(f"sharding must be one of {', '.join(SHARDINGS)}, not {sharding!r}")
    if gpus < 1:
        raise UserError("--gpus must be >= 1")
    shapes = model_shapes(cfg.model)
    mp = cfg.mixed_precision
    wb, wdtype = (2, mp) if mp in ("bf16", "fp16") else (4, "fp32")
    den = counts_for(shapes.denoiser)
    use_lora = cfg.lora.rank > 0
    fsdp = sharding == "fsdp"
    n_shard = gpus if fsdp else 1
    n_states = gpus if sharding in ("fsdp", "zero2") else 1
    method = cfg.method
    is_pair = hasattr(cfg, "objective")
    needs_reference = bool(getattr(cfg, "needs_reference", False))

    if use_lora:
        targets = list(cfg.lora.target_modules or FAMILIES[shapes.family].default_lora_targets)
        trainable, layers = lora_param_count(meta_module(shapes.denoiser), targets, cfg.lora.rank)
    else:
        trainable, layers = den["params"], 0
    plan = MemoryPlan(label or method, cfg.model, method, gpus, gpu_mem_gib, sharding, sharding_source, trainable, layers)
    add = plan.parts.append
    shard = f" / {n_shard} GPUs" if n_shard > 1 else ""
    states_shard = f" / {n_states} GPUs" if n_states > 1 else ""

    # ---- weights
    if use_lora:
        add(_weights_part("weights", "denoiser, frozen base", shapes.denoiser, wb, wdtype, n_shard))
        plan.notes.append(f"LoRA r{cfg.lora.rank} on {layers} layers ({', '.join(targets)}): "
                          f"{_n(trainable)} params = sum of r x (in + out) over the adapted Linear layers")
    elif den["buffers"]:
        add(Part("weights", "denoiser buffers", den["buffers"] * 4 / n_shard, f"{_n(den['buffers'])} x 4 B (fp32){shard}"))
    if needs_reference and not use_lora:
        add(_weights_part("weights", "frozen reference copy of the denoiser", shapes.denoiser, wb, wdtype))
    elif needs_reference:
        plan.notes.append("reference = the same network with its LoRA disabled: no second copy")
    cached = False
    if is_pair:
        from ..data.cache import cache_applies

        cached = cache_applies(cfg)[0]
    if cached:
        plan.notes.append("trains from the latent cache: the VAE and text encoders are released before training "
                          "(`diffalign cache` builds it first, on its own)")
    else:
        for attr, rel in shapes.text_encoders:
            add(_weights_part("weights", attr, rel, wb, wdtype))
        vae = shapes.vae
        if cfg.model_opts.vae:
            if cfg.model_opts.vae not in VAE_SHAPES:
                plan.notes.append(f"model_opts.vae={cfg.model_opts.vae!r} has no shape config: counted as the model's own VAE")
            vae = VAE_SHAPES.get(cfg.model_opts.vae, vae)
        add(_weights_part("weights", "vae", vae, wb, wdtype))
    if not is_pair:
        seen = set()
        for r in [*cfg.rewards, *getattr(cfg.eval, "rewards", [])]:
            name = r.name.split("=", 1)[0].strip()
            if name in seen:
                continue
            seen.add(name)
            dtype = str(r.args.get("dtype", "float32"))
            rels = REWARD_SHAPES.get(name)
            if rels is None:
                plan.notes.append(f"reward {name!r}: no model weights counted (not a model reward diffalign plan knows)")
                continue
            for rel in rels:
                add(_weights_part("weights", f"reward {name}", rel, DTYPE_BYTES.get(dtype, 4), dtype))
    copies = []
    ema = getattr(cfg, "ema", None)
    if ema is not None and ema.enabled:
        copies.append("EMA of the trainable parameters")
    if method == "nft":
        copies.append("DiffusionNFT old policy")
    if method == "awm" and cfg.awm.ema_beta > 0:
        copies.append("AWM EMA-KL anchor")
    for what in copies:
        add(Part("weights", f"{what} (fp32 copy)", trainable * 4 / n_shard, f"{_n(trainable)} x 4 B{shard}"))

    # ---- trainable parameters
    add(Part("trainable", "trainable parameters, fp32 master", trainable * 4 / n_shard, f"{_n(trainable)} x 4 B{shard}"))
    if fsdp:  # FSDP all-gathers one block while it runs and prefetches the next
        unit = den["largest_unit_params"]
        add(Part("weights" if use_lora else "trainable", f"{wdtype} all-gathered blocks (current + prefetched)",
                 2 * unit * wb, f"2 x {_n(unit)} (largest block) x {wb} B"))
    if wb == 2 and (use_lora or not fsdp):
        add(Part("trainable", f"{wdtype} autocast copies of the trainable weights", trainable * wb,
                 f"{_n(trainable)} x {wb} B"))

    # ---- gradients and optimizer states
    add(Part("grads", "gradients (fp32)", trainable * 4 / n_states, f"{_n(trainable)} x 4 B{states_shard}"))
    if sharding == "ddp" and gpus > 1:
        add(Part("grads", "DDP gradient buckets", trainable * 4, f"{_n(trainable)} x 4 B"))
    if cfg.optim.use_8bit_adam:
        add(Part("optimizer", "AdamW8bit moments (2 x 1 B)", trainable * 2 / n_states, f"{_n(trainable)} x 2 B{states_shard}"))
    else:
        add(Part("optimizer", "AdamW moments (2 x fp32)", trainable * 8 / n_states, f"{_n(trainable)} x 8 B{states_shard}"))

    # ---- activations
    candidates, extra = activation_terms(cfg, shapes, is_pair, cached, needs_reference)
    add(candidates[0])
    for p in extra:
        add(p)
    for p in candidates[1:]:
        plan.notes.append(f"smaller transient: {p.what}, {_gib(p.bytes)} ({p.formula})")
    add(Part("overhead", "CUDA context and library workspaces", CUDA_OVERHEAD_BYTES, "fixed"))
    return plan


# ------------------------------------------------------------------------------- from a recipe
_LAUNCH = re.compile(r"accelerate launch.*")
_BUILT_ON = re.compile(r"Built on (\S+?)\.ya?ml's memory plan")
_TARGET = re.compile(r"Target:\s*(\d+)")
_PROCESSES = re.compile(r"--num_processes\s+(\d+)")


def recipe_launch(text: str, read=None, depth: int = 0) -> tuple[str, int | None, str]:
    """(sharding, target GPUs or None, where that was read) from a recipe's comments: its
    ``accelerate launch`` line (``accelerate/fsdp`` -> fsdp, ``accelerate/deepspeed_zero2`` ->
    zero2, anything else DDP) and the first number after ``Target:`` (else ``--num_processes``).
    A recipe "Built on X.yaml's memory plan" without its own launch line takes X's (``read(X)``)."""
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    launch = _LAUNCH.search(comments)
    target = _TARGET.search(comments) or _PROCESSES.search(comments)
    gpus = int(target.group(1)) if target else None
    if launch is None:
        built = _BUILT_ON.search(comments)
        if built and read is not None and depth < 3:
            sharding, parent_gpus, _ = recipe_launch(read(built.group(1)), read, depth + 1)
            return sharding, gpus or parent_gpus, f"{built.group(1)}'s launch line"
        return "ddp", gpus, "no launch line: DDP"
    line = launch.group(0)
    sharding = "fsdp" if "accelerate/fsdp" in line else "zero2" if "deepspeed_zero2" in line else "ddp"
    return sharding, gpus, "the recipe's launch line"


def _read_recipe(spec):
    from ..recipes import resolve_config

    return resolve_config(spec)


def plan_recipe(spec: str, overrides: list[str] | None = None, *, gpus: int | None = None, gpu_mem_gib: float = 80.0,
                sharded: bool | None = None) -> MemoryPlan:
    """The plan of a recipe name or config file (``import diffalign.trainers`` first: it registers
    the trainer configs ``load_config`` needs). ``gpus``: default the recipe's target count;
    ``sharded``: None as the recipe's launch line says, True FSDP, False DDP."""
    from ..config import load_config
    from ..recipes import recipe_names

    cfg = load_config(spec, overrides)
    node = _read_recipe(spec)
    sharding, target, source = recipe_launch(node.read_text(encoding="utf-8"),
                                             lambda stem: _read_recipe(stem).read_text(encoding="utf-8"))
    if sharded is not None:
        sharding, source = ("fsdp" if sharded else "ddp"), ("--sharded" if sharded else "--no-sharded")
    packaged = {str(f): name for name, f in recipe_names().items()}
    label = packaged.get(str(node), str(spec))
    return plan_config(cfg, label=label, gpus=gpus or target or 1, gpu_mem_gib=gpu_mem_gib, sharding=sharding,
                       sharding_source=source)


__all__ = ["COLUMNS", "GiB", "MODEL_SHAPES", "MemoryPlan", "ModelShapes", "Part", "REWARD_SHAPES", "SHARDINGS",
           "activation_terms", "model_shapes", "plan_config", "plan_recipe", "recipe_launch", "text_tokens"]
