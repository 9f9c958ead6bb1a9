"""A small text-to-image base model for the testbed, trained from scratch on CPU.

Architecture: the tiny SD1.5 layout of :func:`diffalign.models.tiny.build_sd15` (byte-level
CLIP tokenizer, 2-layer CLIP text encoder, 2x-downsampling AutoencoderKL, cross-attention
UNet) with a somewhat wider UNet, at 32 px (16x16x4 latents). Training, all deterministic
in ``seed``:

1. the VAE is fitted as a plain autoencoder on the training images for ``vae_steps``
   (a random-init decoder cannot turn anything into images) and then frozen, with
   ``scaling_factor`` recalibrated to unit latent std;
2. the text encoder is trained jointly with the UNet (``train_text_encoder``; a frozen
   random byte-level encoder makes colour/shape binding slow to learn) or stays frozen at
   its random init (different captions still give different token embeddings;
   :func:`prompt_separability` checks it);
3. the denoiser is trained from scratch, with ``cfg_dropout`` of the captions replaced by ""
   (for classifier-free guidance) and an EMA of the weights, for ``steps`` steps:
   ``family="sd15"``: a UNet, epsilon prediction on the SD1.5 noise schedule, DDIM sampler;
   ``family="sd3"``: an SD3-layout MMDiT with two CLIP encoders and no T5, rectified flow
   (velocity target, logit-normal sigma), flow-matching Euler sampler.
   ``init_from`` continues another budget's base instead (its VAE, encoders and denoiser).

The training images use ``style`` (the job's bases: ``"tinted"`` backgrounds). The pipeline is
saved in diffusers format and cached under
``~/.cache/diffalign/testbed/base-<hash>`` (``$DIFFALIGN_CACHE`` overrides the root), keyed
by every hyperparameter, so the second call is instant.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

BASE_MODEL_VERSION = 3

#: Base-model families: ``sd15`` (UNet, epsilon prediction, DDIM sampler) and ``sd3`` (an
#: SD3-layout MMDiT trained with rectified flow, Euler flow-matching sampler).
FAMILIES = ("sd15", "sd3")


@dataclass
class BaseModelConfig:
    family: str = "sd15"
    n_train: int = 4000
    resolution: int = 32
    steps: int = 800
    vae_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1.5e-3
    vae_learning_rate: float = 2e-3
    warmup_steps: int = 100
    #: UNet widths (sd15); the MMDiT (sd3) uses ``dit_layers`` x ``dit_width``.
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    dit_layers: int = 4
    dit_width: int = 64
    #: VAE encoder/decoder widths (two blocks: 2x spatial compression).
    vae_channels: tuple[int, ...] = (8, 16)
    cfg_dropout: float = 0.1
    ema_decay: float = 0.99
    exclude_heldout: bool = True
    train_text_encoder: bool = False
    text_learning_rate: float = 5e-4
    #: background style of the training images (:data:`~diffalign.testbed.world.STYLES`)
    style: str = "plain"
    #: :func:`~diffalign.testbed.world.sample_scene` keyword arguments of the training scenes
    scene: dict = field(default_factory=dict)
    #: T5 tokens of the (absent) third SD3 text encoder: zeros the MMDiT attends to. Every
    #: caller of an sd3 testbed base passes the same ``max_sequence_length``.
    max_sequence_length: int = 8
    seed: int = 0
    #: continue from the base of this budget (its VAE, text encoders and denoiser) for ``steps``
    #: more denoiser steps, instead of training from scratch
    init_from: str | None = None

    def key(self) -> str:
        d = asdict(self)
        if d["init_from"] is None:  # keys of bases trained before the field existed stay valid
            del d["init_from"]
        d["block_out_channels"] = list(self.block_out_channels)
        d["vae_channels"] = list(self.vae_channels)
        d["version"] = BASE_MODEL_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


#: The testbed-compare world: one object group per scene (colour, shape, count, size,
#: position); two-group scenes need more capacity than a CPU-trained base has.
JOB_SCENE: dict = {"p_two_groups": 0.0}

BUDGETS: dict[str, BaseModelConfig] = {
    "quick": BaseModelConfig(n_train=256, steps=40, vae_steps=40, batch_size=8, warmup_steps=5,
                             train_text_encoder=True, scene=JOB_SCENE, style="tinted"),
    "quick_flow": BaseModelConfig(family="sd3", n_train=256, steps=40, vae_steps=40, batch_size=8, warmup_steps=5,
                                  train_text_encoder=True, scene=JOB_SCENE, style="tinted"),
    "full": BaseModelConfig(n_train=20000, steps=3000, vae_steps=1200, vae_channels=(16, 32), learning_rate=2e-3,
                            train_text_encoder=True, scene=JOB_SCENE, style="tinted"),
    # the MMDiT learns the world more slowly than the UNet: 3000 steps from scratch, then more
    "flow_pre": BaseModelConfig(family="sd3", n_train=20000, steps=3000, vae_steps=1200, vae_channels=(16, 32), dit_layers=6,
                                learning_rate=1e-3, train_text_encoder=True, scene=JOB_SCENE, style="tinted"),
}
BUDGETS["full_flow"] = replace(BUDGETS["flow_pre"], init_from="flow_pre", steps=4000, warmup_steps=50, seed=1)
# shapes were still improving at 7000 steps (colour was already right): 8000 more denoiser steps,
# text encoders frozen (a third of the step time)
BUDGETS["flow_long"] = replace(BUDGETS["full_flow"], init_from="full_flow", steps=8000, train_text_encoder=False, seed=2)

#: The trained ``full`` (UNet) / ``flow_long`` (flow MMDiT) bases, shipped with the package (reproduce one with
#: ``diffalign testbed-base --budget full --force --out diffalign/testbed/assets/base``).
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED_DIRS: dict[str, Path] = {"full": ASSETS_DIR / "base", "flow_long": ASSETS_DIR / "base_flow"}
SHIPPED_DIR = SHIPPED_DIRS["full"]


def cache_root() -> Path:
    root = os.environ.get("DIFFALIGN_CACHE")
    return Path(root) / "testbed" if root else Path.home() / ".cache" / "diffalign" / "testbed"


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _encode_text(tokenizer, text_encoder, prompts: Sequence[str]):
    import torch

    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def prompt_separability(text_encoder, tokenizer, prompts: Sequence[str]) -> dict:
    """How distinguishable prompts are to the (frozen) text encoder: min / mean pairwise
    L2 distance of the flattened token embeddings, and the number of identical pairs."""
    import torch

    emb = _encode_text(tokenizer, text_encoder, prompts).flatten(1)
    d = torch.cdist(emb, emb)
    iu = torch.triu_indices(len(prompts), len(prompts), 1)
    v = d[iu[0], iu[1]]
    return {"min_dist": float(v.min()), "mean_dist": float(v.mean()), "identical_pairs": int((v < 1e-6).sum())}


def warmup_cosine(total: int, warmup: int, floor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor``."""

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / max(warmup, 1))
        return w * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(step / max(total, 1), 1.0))))

    return f


def _build_vae(cfg: BaseModelConfig):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        norm_num_groups=8, latent_channels=4, sample_size=cfg.resolution,
    )
    import torch

    with torch.no_grad():  # a near-deterministic encoder: log-variance pinned at -12
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -12.0
    return vae


def _train_vae(vae, x, cfg: BaseModelConfig, gen, log):
    """Fit the VAE as an autoencoder on images ``x`` in [-1, 1]; set its latent scale (and
    shift, for sd3) so training latents have zero mean / unit std. Returns the scaled latents."""
    import torch
    import torch.nn.functional as F

    vae.train()
    params = [p for n, p in vae.named_parameters() if not n.startswith("quant_conv")]
    opt = torch.optim.AdamW(params, lr=cfg.vae_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.vae_steps, 20))
    bar = _progress(cfg.vae_steps, "testbed base: VAE")
    for _ in range(cfg.vae_steps):
        xb = x[torch.randint(0, len(x), (cfg.batch_size,), generator=gen)]
        z = vae.encode(xb).latent_dist.mean
        loss = F.mse_loss(vae.decode(z).sample, xb) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        rec = F.mse_loss(vae.decode(lat[:256]).sample, x[:256]).item()
    shift = float(lat.mean()) if cfg.family == "sd3" else None
    scale = 1.0 / float((lat - (shift or 0.0)).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    log(f"VAE: recon mse {rec:.4f}, scaling_factor {scale:.3f}")
    return (lat - (shift or 0.0)) * scale, rec


class _UNetBase:
    """sd15 family: epsilon prediction on SD1.5's noise schedule, DDIM sampler."""

    def __init__(self, cfg: BaseModelConfig, template):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from ..models.tiny import TINY_TEXT_DIM

        self.cfg, self.template = cfg, template
        self.net = UNet2DConditionModel(
            sample_size=cfg.resolution // 2, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            cross_attention_dim=TINY_TEXT_DIM, attention_head_dim=8, norm_num_groups=16,
        )
        self.acp = DDPMScheduler.from_config(template.scheduler.config).alphas_cumprod
        self.text_encoders = [template.text_encoder]

    def cond(self, encoders, ids):
        return {"encoder_hidden_states": encoders[0](ids)[0]}

    def loss(self, z0, cond, gen):
        import torch
        import torch.nn.functional as F

        t = torch.randint(0, self.acp.numel(), (len(z0),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = self.acp[t].view(-1, 1, 1, 1)
        pred = self.net(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        return F.mse_loss(pred, eps)

    def pipeline(self, vae, encoders, net):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=self.template.tokenizer, unet=net,
            scheduler=DDIMScheduler.from_config(self.template.scheduler.config, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


class _FlowBase:
    """sd3 family: an SD3-layout MMDiT (two CLIP text encoders, no T5), rectified flow
    ``x_t = (1 - s) x_0 + s * noise`` with velocity target ``noise - x_0`` and logit-normal
    ``s`` (SD3's training density), Euler flow-matching sampler (shift 1: 16x16 latents)."""

    def __init__(self, cfg: BaseModelConfig, template):
        import torch
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        from ..models.tiny import TINY_TEXT_DIM, tiny_clip_text_config

        self.cfg, self.template = cfg, template
        heads = max(1, cfg.dit_width // 16)
        self.net = SD3Transformer2DModel(
            sample_size=cfg.resolution // 2, patch_size=2, in_channels=4, out_channels=4,
            num_layers=cfg.dit_layers, attention_head_dim=cfg.dit_width // heads, num_attention_heads=heads,
            joint_attention_dim=2 * TINY_TEXT_DIM, caption_projection_dim=cfg.dit_width,
            pooled_projection_dim=2 * TINY_TEXT_DIM, pos_embed_max_size=cfg.resolution // 2,
        )
        torch.manual_seed(cfg.seed + 1)
        self.text_encoders = [CLIPTextModelWithProjection(tiny_clip_text_config()) for _ in range(2)]
        self.tokenizer = template.tokenizer

    def cond(self, encoders, ids):
        import torch

        outs = [enc(ids, output_hidden_states=True) for enc in encoders]
        # as StableDiffusion3Pipeline.encode_prompt: penultimate hidden states, concatenated;
        # the absent T5 contributes max_sequence_length zero tokens
        clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        t5 = clip.new_zeros(clip.shape[0], self.cfg.max_sequence_length, clip.shape[-1])
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=1),
                "pooled_projections": torch.cat([o.text_embeds for o in outs], dim=-1)}

    def loss(self, z0, cond, gen):
        import torch
        import torch.nn.functional as F

        s = torch.sigmoid(torch.randn(len(z0), generator=gen)).view(-1, 1, 1, 1)
        noise = torch.randn(z0.shape, generator=gen)
        pred = self.net(hidden_states=(1 - s) * z0 + s * noise, timestep=s.flatten() * 1000.0,
                        encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        return F.mse_loss(pred, noise - z0)

    def pipeline(self, vae, encoders, net):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), vae=vae,
            text_encoder=encoders[0], tokenizer=self.tokenizer, text_encoder_2=encoders[1], tokenizer_2=self.tokenizer,
            text_encoder_3=None, tokenizer_3=None,
        )


def _absent_components(cfg: BaseModelConfig) -> dict:
    return {"text_encoder_3": None, "tokenizer_3": None} if cfg.family == "sd3" else {"safety_checker": None, "requires_safety_checker": False}


def train_base_model(out: str | Path, cfg: BaseModelConfig | None = None, log: Callable[[str], None] | None = print) -> Path:
    """Train the base model and save the pipeline to ``out`` (see the module docstring)."""
    import torch

    from ..models.tiny import build_sd15
    from .training import make_training_set

    cfg = cfg or BaseModelConfig()
    if cfg.family not in FAMILIES:
        raise ValueError(f"BaseModelConfig.family: {cfg.family!r}; known: {', '.join(FAMILIES)}")
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:  # tokenizer, text encoder and SD1.5 schedule
        from diffusers import StableDiffusionPipeline

        build_sd15(Path(tmp) / "tiny", seed=cfg.seed)
        template = StableDiffusionPipeline.from_pretrained(Path(tmp) / "tiny", safety_checker=None, requires_safety_checker=False)
    tokenizer = template.tokenizer

    samples = make_training_set(cfg.n_train, cfg.resolution, cfg.seed, style=cfg.style,
                                exclude_heldout=cfg.exclude_heldout, **cfg.scene)
    captions = [c for c, _ in samples]
    x = torch.from_numpy(np.stack([im for _, im in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    init = None
    if cfg.init_from is not None:  # continue an earlier base: its VAE, text encoders and denoiser
        from diffusers import DiffusionPipeline

        init = DiffusionPipeline.from_pretrained(get_base_model(cfg.init_from, log=log), **_absent_components(cfg))
    # 1. VAE as an autoencoder (posterior mean; the log-variance stays pinned by quant_conv)
    if init is None:
        vae = _build_vae(cfg)
        lat, vae_rec = _train_vae(vae, x, cfg, gen, log)
    else:
        vae = init.vae.requires_grad_(False).eval()
        with torch.no_grad():
            lat = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
            vae_rec = torch.nn.functional.mse_loss(vae.decode(lat[:256]).sample, x[:256]).item()
        lat = (lat - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    # 2. captions -> token ids once per unique caption (last row: "" for CFG dropout)
    uniq = sorted(set(captions))
    cap_idx = {c: k for k, c in enumerate(uniq)}
    ids_table = tokenizer(uniq + [""], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    sample_cond = torch.tensor([cap_idx[c] for c in captions])

    # 3. denoiser from scratch (+ the text encoders, if trained), EMA of both
    torch.manual_seed(cfg.seed)
    arch = (_UNetBase if cfg.family == "sd15" else _FlowBase)(cfg, template)
    if init is not None:
        arch.net = init.unet if cfg.family == "sd15" else init.transformer
        arch.text_encoders = [init.text_encoder] + ([init.text_encoder_2] if cfg.family == "sd3" else [])
    encoders = torch.nn.ModuleList(arch.text_encoders)
    model = torch.nn.ModuleDict({"net": arch.net, "text": encoders})
    groups = [{"params": list(arch.net.parameters()), "lr": cfg.learning_rate}]
    encoders.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
    if cfg.train_text_encoder:
        groups.append({"params": list(encoders.parameters()), "lr": cfg.text_learning_rate})
    ema = copy.deepcopy(model).requires_grad_(False)
    trained = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.warmup_steps, floor=0.1))
    arch.net.train()
    bar = _progress(cfg.steps, f"testbed base: {type(arch.net).__name__}")
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(lat), (cfg.batch_size,), generator=gen)
        ci = sample_cond[idx].clone()
        ci[torch.rand(len(idx), generator=gen) < cfg.cfg_dropout] = len(uniq)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            cond = arch.cond(encoders, ids_table[ci])
        loss = arch.loss(lat[idx], cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    bar.close()

    out = Path(out)
    final = arch.pipeline(vae, [e.eval() for e in ema["text"]], ema["net"].eval())
    final.save_pretrained(str(out), safe_serialization=True)
    info = {
        "config": {**asdict(cfg), "block_out_channels": list(cfg.block_out_channels), "vae_channels": list(cfg.vae_channels)},
        "key": cfg.key(),
        "vae_recon_mse": vae_rec,
        "final_loss": float(np.mean(losses[-100:])),
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "prompt_separability": prompt_separability(ema["text"][0], tokenizer, uniq[:200]),
    }
    (out / "testbed_base.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    log(f"base model: {cfg.steps} steps, loss {info['final_loss']:.4f}, {info['train_seconds']}s -> {out}")
    return out


def shipped_base_model(cfg: BaseModelConfig) -> Path | None:
    """The shipped base-model directory if it was trained with exactly ``cfg``, else None."""
    for path in SHIPPED_DIRS.values():
        try:
            info = json.loads((path / "testbed_base.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if info.get("key") == cfg.key():
            return path
    return None


def get_base_model(cfg: BaseModelConfig | str | None = None, *, force: bool = False, out: str | Path | None = None, log=print) -> Path:
    """The base model for ``cfg`` (a config or a budget name): the shipped weights when they
    match ``cfg``, else the cached copy, else trained now (and cached). ``force`` retrains;
    ``out`` trains into that directory instead of the cache."""
    if isinstance(cfg, str):
        cfg = BUDGETS[cfg]
    cfg = cfg or BaseModelConfig()
    path = Path(out) if out is not None else cache_root() / f"base-{cfg.key()}"
    if not force and out is None:
        shipped = shipped_base_model(cfg)
        if shipped is not None:
            return shipped
    if (path / "testbed_base.json").is_file() and not force:
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_base_model(tmp, cfg, log=log)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


class PipelineSampler:
    """A diffusers pipeline as a testbed sampler: ``sampler(prompts, seeds) -> [B, 3, H, W]`` in [0, 1].

    One generator per image, so images are deterministic in (prompt, seed) whatever the batching.
    """

    def __init__(self, pipe, steps: int = 20, guidance: float = 5.0, resolution: int | None = None, batch_size: int = 32,
                 name: str = "base", max_sequence_length: int | None = None):
        self.pipe, self.steps, self.guidance = pipe, int(steps), float(guidance)
        self.max_sequence_length = max_sequence_length
        self.resolution, self.batch_size, self.name = resolution, int(batch_size), name
        pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]):
        import torch

        from ..eval.generate import generate

        prompts, seeds = list(prompts), list(seeds)
        outs = []
        for i in range(0, len(prompts), self.batch_size):
            outs.append(generate(self.pipe, prompts[i : i + self.batch_size], seeds[i : i + self.batch_size],
                                 steps=self.steps, guidance=self.guidance, resolution=self.resolution,
                                 max_sequence_length=self.max_sequence_length))
        return torch.cat(outs)
