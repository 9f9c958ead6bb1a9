"""The model-family adapter: everything a trainer needs to know about a backbone.

A trainer never branches on the model family. It asks the adapter to
``encode_prompt`` -> conditioning dict, ``encode_images`` -> latents,
``sample_timesteps`` + ``noisy_input_and_target`` -> (x_t, target), and ``predict`` -> output
in the target's space. The adapter wraps the diffusers pipeline it loaded, so prompt encoding
is the pipeline's own code and the saved LoRA is what ``pipe.load_lora_weights`` expects.

Conditioning is a plain ``dict[str, Tensor]`` whose tensors are all batch-first, so it can be
concatenated (chosen+rejected in one forward; cond+uncond for CFG) and indexed with
:func:`cat_cond` / :func:`index_cond` / :func:`repeat_cond`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import ConfigError, UserError

Cond = dict[str, torch.Tensor]


def cat_cond(*conds: Cond) -> Cond:
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def index_cond(cond: Cond, idx) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def repeat_cond(cond: Cond, n: int) -> Cond:
    """Repeat each row ``n`` times consecutively (row i -> rows i*n .. i*n+n-1)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


class AttentionError(UserError, RuntimeError):
    pass


@dataclass
class SamplingSchedule:
    """An ``S``-step sampling schedule in the one notation ``x = alpha x0 + sigma eps`` of every family.

    Plain data, what :meth:`DiffusionAdapter.sampling_schedule` returns: for each step the model
    timestep it is evaluated at, where it lands, and the coefficients before and after it.
    ``pipelines.schedules.SamplingTable`` adds the per-step lookups the rollout engine needs.
    """

    parametrization: str  # epsilon | v_prediction | flow
    timesteps: torch.Tensor  # [S] model input timestep of each step (float32)
    next_timesteps: torch.Tensor  # [S] model timestep where the step lands; < 0: none (terminal)
    alpha: torch.Tensor  # [S]
    sigma: torch.Tensor  # [S]
    alpha_next: torch.Tensor  # [S]
    sigma_next: torch.Tensor  # [S]
    sigma_cap: float  # flow-space sigma Flow-SDE uses in place of s = 1


# predict(x, timesteps) -> the (reference) network output in the adapter's prediction space
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


SDPA_KERNELS = ("flash", "efficient", "math", "cudnn")


def pin_sdpa_kernel(name: str | None) -> None:
    """Allow only one PyTorch SDPA kernel (``sdpa_math``, ``sdpa_flash``, ``sdpa_efficient``,
    ``sdpa_cudnn``), or all of them again (``None``/``sdpa``).

    Process-wide on purpose: a context manager around the forward would not cover the
    recomputation of gradient checkpointing in backward, which must pick the same kernel.
    """
    kernel = None if name in (None, "sdpa") else name.removeprefix("sdpa_")
    if kernel is not None and kernel not in SDPA_KERNELS:
        raise AttentionError(f"model_opts.attention={name!r}: valid SDPA kernels are {', '.join('sdpa_' + k for k in SDPA_KERNELS)}")
    b = torch.backends.cuda
    b.enable_flash_sdp(kernel in (None, "flash"))
    b.enable_mem_efficient_sdp(kernel in (None, "efficient"))
    b.enable_math_sdp(kernel in (None, "math"))
    b.enable_cudnn_sdp(kernel in (None, "cudnn"))


class DiffusionAdapter:
    """Base class; subclasses set the class attributes and implement the abstract methods."""

    family: str = "base"  # the key in ``models.FAMILIES`` and the name of its tiny builder
    pipeline_class: str = ""  # diffusers pipeline class name in model_index.json ("" = abstract)
    pipeline_kwargs: dict[str, Any] = {}  # extra from_pretrained kwargs of that pipeline (copied per load)
    is_flow: bool = False
    denoiser_name: str = "unet"  # attribute of the pipeline holding the trainable network
    default_lora_targets: tuple[str, ...] = ()
    # UNet LoRAs are saved in diffusers' legacy key format (as its SD/SDXL LoRA scripts do);
    # DiT loaders expect peft's own keys (as its SD3/FLUX scripts save them).
    lora_keys_in_diffusers_format: bool = True
    # True where the pipeline's ``guidance_scale`` is not classifier-free guidance: a guidance-distilled
    # checkpoint (FLUX.1-dev, FLUX.2-dev) takes the value as a network input (:meth:`with_guidance`), a
    # step-distilled one (FLUX.1-schnell) ignores it. Samplers then run one conditional forward per
    # step and never an unconditional one, as those pipelines do.
    distilled_guidance: bool = False

    def __init__(self, pipe, model_id: str, opts) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.opts = opts
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()
        if self.denoiser is not None:  # a cache build loads no denoiser (models.load_encoders): nothing attends
            self.set_attention(opts.attention)

    # ----------------------------------------------------------------------- components
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        setattr(self.pipe, self.denoiser_name, module)

    TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")

    @property
    def vae(self):
        if self.pipe.vae is None and self.encoders_released:
            raise RuntimeError("the VAE was released (training reads the latent cache); call restore_encoders() first")
        return self.pipe.vae

    @property
    def vae_config(self):
        """The VAE's config (scaling and shift factors, block widths); kept when the VAE is released."""
        return self._released["vae_config"] if self.encoders_released else self.pipe.vae.config

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, n, None) for n in self.TEXT_ENCODER_NAMES) if m is not None]

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipe.vae, *self.text_encoders()) if m is not None]

    @property
    def encoders_released(self) -> bool:
        return getattr(self, "_released", None) is not None

    def release_encoders(self, vae_config=None, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Drop the VAE and text encoders (their memory is freed once nothing else holds them).

        For training from the latent cache, which holds every latent moment and prompt embedding
        the step reads: the step then keeps only the denoiser. What the step still needs of the VAE
        (its config, device, dtype) is kept; :meth:`restore_encoders` loads them back. An adapter
        loaded without them (``load_adapter(encoders=False)``) is given those three instead."""
        if self.encoders_released:
            return
        vae = self.pipe.vae
        if vae is not None:
            vae_config, device, dtype = vae.config, next(vae.parameters()).device, next(vae.parameters()).dtype
            # encoders restored for a cache build (VAE in fp32) keep the latent dtype the run
            # recorded before, so a run that builds its cache samples latents as one reading it
            dtype = getattr(self, "_dtype_before_restore", None) or dtype
            self.keep_from_vae(vae)
        self._released = {"vae_config": vae_config, "device": torch.device(device), "dtype": dtype}
        self.pipe.vae = None
        for name in self.TEXT_ENCODER_NAMES:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)

    # True for a family whose latent normalisation lives in the VAE's weights (FLUX.2's BatchNorm
    # statistics), not its config: training from the cache then loads the VAE once to keep them
    latent_stats_in_vae_weights = False

    def keep_from_vae(self, vae) -> None:
        """Keep what the latent scaling needs of ``vae`` before :meth:`release_encoders` drops it
        (nothing by default: the config is kept anyway)."""

    def restore_encoders(self, dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None) -> None:
        """Load the VAE and text encoders (released by :meth:`release_encoders`, or never loaded)
        from ``model_id`` on the device recorded for them; the denoiser is kept. The text encoders
        come in ``dtype``, the VAE in ``vae_dtype`` (default: ``dtype``, else the dtype recorded)."""
        if not self.encoders_released:
            return
        from .loading import load_pipeline

        released = self._released
        names = ("vae", *self.TEXT_ENCODER_NAMES)
        text = dtype or released["dtype"]
        fresh = load_pipeline(self.model_id, type(self), self.opts, {"default": text, "vae": vae_dtype or text},
                              skip=(self.denoiser_name,))
        self._released = None
        self._dtype_before_restore = released["dtype"]
        for name in names:
            module = getattr(fresh, name, None)
            if module is not None:
                module.requires_grad_(False).eval().to(released["device"])
                # register_modules, not setattr: a pipeline records a component set to None as
                # absent in its config (model_index.json), and setattr would not record it back
                self.pipe.register_modules(**{name: module})

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    @property
    def device(self) -> torch.device:
        if self.encoders_released:
            return self._released["device"]
        return next(self.vae.parameters()).device

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the VAE encodes and decodes in."""
        return self._released["dtype"] if self.encoders_released else self.vae.dtype

    def to(self, device, dtype: torch.dtype | None = None) -> "DiffusionAdapter":
        """Move all components; ``dtype`` applies to the frozen parts (VAE, text encoders)."""
        for m in self.frozen_modules():
            m.to(device=device)
        self.cast_frozen(dtype)
        self.denoiser.to(device)
        return self

    def cast_frozen(self, dtype: torch.dtype | None) -> None:
        """Cast the frozen parts to ``dtype``, only those not already in it. diffusers models
        warn on every ``.to(dtype=...)`` ("modules ... that should be kept in float32: []")
        even when that list is empty and nothing is cast; we filter exactly that message."""
        from ..logging import FP32_MODULES_NOTICE, library_call

        if dtype is None:
            return
        for m in self.frozen_modules():
            if m is self.vae and dtype == torch.float16 and getattr(m.config, "force_upcast", False):
                # diffusers' flag of a VAE that overflows in fp16 (SD1.5's, SDXL's): its pipelines decode it
                # in fp32 under fp16, and so do we (bf16 has fp32's range: no upcast needed)
                continue
            if any(p.is_floating_point() and p.dtype != dtype for p in m.parameters()):
                with library_call(FP32_MODULES_NOTICE, bars=True):
                    m.to(dtype=dtype)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    # ----------------------------------------------------------------------- attention
    def set_attention(self, name: str) -> None:
        """``sdpa`` (default), ``sdpa_math|sdpa_flash|sdpa_efficient|sdpa_cudnn`` (pin one PyTorch SDPA
        kernel), ``xformers``, or ``diffusers:<backend>`` (diffusers' attention dispatcher, DiTs)."""
        if name == "sdpa" or name.startswith("sdpa_"):
            pin_sdpa_kernel(name)  # "sdpa" re-allows every kernel a previous adapter may have pinned
            return
        if name == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise AttentionError(
                    "model_opts.attention=xformers but xformers is not installed "
                    "(pip install 'diffalign[xformers]' on a CUDA machine), or use attention=sdpa"
                )
            if not torch.cuda.is_available():
                raise AttentionError("model_opts.attention=xformers needs a CUDA GPU (xformers has no CPU kernels); use attention=sdpa")
            self.denoiser.enable_xformers_memory_efficient_attention()
            return
        if name.startswith("diffusers:"):
            backend = name.split(":", 1)[1]
            if not hasattr(self.denoiser, "set_attention_backend"):
                raise AttentionError(f"model_opts.attention={name!r}: this diffusers version has no attention backends")
            try:
                self.denoiser.set_attention_backend(backend)
            except Exception as e:  # diffusers raises ValueError/ImportError with its own reason
                raise AttentionError(f"model_opts.attention={name!r}: {e}") from None
            return
        raise AttentionError(
            f"model_opts.attention={name!r}: use sdpa, sdpa_math, sdpa_flash, sdpa_efficient, xformers or diffusers:<backend>"
        )

    def attention_context(self):
        """Context for every denoiser forward (a hook for backends that need one; none do today)."""
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------- LoRA
    def add_lora(self, opts) -> None:
        from peft import LoraConfig

        targets = list(opts.target_modules) if opts.target_modules else list(self.default_lora_targets)
        if opts.target_modules:  # peft skips a target that matches no layer (and fails only when none does)
            names = [n for n, _ in self.denoiser.named_modules() if n]
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in self.denoiser.named_modules()
                                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
                raise ConfigError(f"config key 'lora.target_modules': {', '.join(missing)} match no layer of "
                                  f"{type(self.denoiser).__name__} (layer names: {', '.join(leaves[:30])})")
        config = LoraConfig(
            r=opts.rank,
            lora_alpha=opts.alpha if opts.alpha is not None else opts.rank,
            lora_dropout=opts.dropout,
            target_modules=targets,
            init_lora_weights=_peft_init(opts.init),
        )
        self.denoiser.add_adapter(config)

    @contextlib.contextmanager
    def adapters_disabled(self, module: torch.nn.Module | None = None) -> Iterator[None]:
        """The reference model of DPO/GRPO: the same network with its LoRA switched off."""
        module = module if module is not None else self.denoiser
        module.disable_adapters()
        try:
            yield
        finally:
            module.enable_adapters()

    def lora_state_dict(self, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict
        from diffusers.utils import convert_state_dict_to_diffusers

        module = module if module is not None else self.denoiser
        state = get_peft_model_state_dict(module)
        return convert_state_dict_to_diffusers(state) if self.lora_keys_in_diffusers_format else state

    def save_lora(self, output_dir: str, module: torch.nn.Module | None = None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(output_dir)`` loads."""
        layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.lora_state_dict(module).items()}
        type(self.pipe).save_lora_weights(output_dir, **{f"{self.denoiser_name}_lora_layers": layers}, safe_serialization=True)

    def save_full(self, output_dir: str) -> None:
        """Write the whole pipeline (trained denoiser included) as a diffusers model dir. The frozen
        components are saved at full precision: a bf16/fp16 run loaded them in its weight dtype, and
        the saved pipeline must not lose the base's precision in everything it did not train."""
        from .loading import load_pipeline

        self.restore_encoders()  # a pipeline dir needs every component
        frozen = {name: getattr(self.pipe, name, None) for name in ("vae", *self.TEXT_ENCODER_NAMES)}
        reduced = {name: m for name, m in frozen.items()
                   if isinstance(m, torch.nn.Module) and any(p.dtype != torch.float32 for p in m.parameters())}
        if not reduced:
            self.pipe.save_pretrained(output_dir, safe_serialization=True)
            return
        fresh = load_pipeline(self.model_id, type(self), self.opts, torch.float32, skip=(self.denoiser_name,))
        self.pipe.register_modules(**{name: getattr(fresh, name) for name in reduced})
        try:
            self.pipe.save_pretrained(output_dir, safe_serialization=True)
        finally:
            self.pipe.register_modules(**reduced)

    # ----------------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1], [B,3,H,W] -> scaled (and shifted) VAE latents, as the denoiser sees them."""
        mean, std = self.encode_moments(pixels)
        return self.latents_from_moments(mean, std, generator)

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std), unscaled: what the latent cache stores."""
        vae = self.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from_moments(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the posterior and scale, exactly as ``latent_dist.sample()`` would: cached and
        uncached training draw the same numbers from the same RNG."""
        mean = mean.to(self.device, self.latent_dtype)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) if generator is None \
            else torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return self.scale_latents(mean + std.to(mean.device, mean.dtype) * noise)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the denoiser's space: ``(z - shift_factor) * scaling_factor``."""
        cfg = self.vae_config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return ((latents.to(self.device) - shift) * cfg.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], float32 [B,3,H,W], ``model_opts.vae_decode_batch`` images per
        VAE call (0: all at once). A VAE decode's peak memory grows with the images it decodes: the
        large VAEs at 512-1024 px need several GB per image in flight."""
        chunk = self.opts.vae_decode_batch or latents.shape[0]
        if chunk >= latents.shape[0]:
            return self.decode_batch(latents)
        return torch.cat([self.decode_batch(part) for part in latents.split(chunk)])

    @torch.no_grad()
    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        """One VAE call of :meth:`decode_latents` (families with their own latent layout override this)."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        images = vae.decode(x, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def with_guidance(self, cond: Cond, guidance_scale: float) -> Cond:
        """``cond`` for sampling at ``guidance_scale`` when :attr:`distilled_guidance`: a guidance-distilled
        family adds the value as the network input its pipeline passes; others return ``cond``."""
        return cond

    # ----------------------------------------------------------------------- abstract
    def encode_prompt(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def noisy_input_and_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Cond, denoiser: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def guide(self, cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance of one step: ``uncond + scale * (cond - uncond)``. A family whose
        pipeline combines the two predictions otherwise (Qwen-Image's norm rescale) overrides this."""
        return uncond_out + scale * (cond_out - uncond_out)

    @classmethod
    def pipeline_guidance_kwargs(cls, scale: float, batch_size: int) -> dict:
        """Keyword arguments of the family's diffusers pipeline call for classifier-free guidance at
        ``scale`` over ``batch_size`` prompts (``diffalign eval`` samples through the pipeline)."""
        return {"guidance_scale": scale}

    def sampling_schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> SamplingSchedule:
        """The ``num_steps``-step sampling schedule of this checkpoint (CPU tensors), as the family's
        diffusers pipeline would sample at ``height`` x ``width`` pixels (None: the size does not
        matter, or the family's default). A family whose schedule depends on the image size (FLUX's
        dynamic shifting: ``mu`` from the image sequence length) computes that here."""
        raise NotImplementedError

    def invert(self, predict: Predict, latents: torch.Tensor, timesteps: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """InPO noising: ``(x_t, target)`` like :meth:`noisy_input_and_target`, with ``x_t`` the
        deterministic inversion of ``latents`` to ``timesteps`` in ``steps`` steps of ``predict``
        (the reference model), and ``target`` the prediction that ``x_t`` implies."""
        raise NotImplementedError


def _peft_init(name: str):
    low = str(name).lower()
    if low in ("true", "kaiming", "default"):
        return True
    if low == "false":
        return False
    return name
