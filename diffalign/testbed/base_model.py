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
3. the UNet is trained from scratch, epsilon-prediction on the SD1.5 noise schedule, with
   ``cfg_dropout`` of the captions replaced by "" (for classifier-free guidance) and an
   EMA of the weights, for ``steps`` steps.

The pipeline is saved in diffusers format with a DDIM sampler and cached under
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

BASE_MODEL_VERSION = 2


@dataclass
class BaseModelConfig:
    n_train: int = 4000
    resolution: int = 32
    steps: int = 800
    vae_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1.5e-3
    vae_learning_rate: float = 2e-3
    warmup_steps: int = 100
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cfg_dropout: float = 0.1
    ema_decay: float = 0.99
    exclude_heldout: bool = True
    train_text_encoder: bool = False
    text_learning_rate: float = 5e-4
    #: :func:`~diffalign.testbed.world.sample_scene` keyword arguments of the training scenes
    scene: dict = field(default_factory=dict)
    seed: int = 0

    def key(self) -> str:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["version"] = BASE_MODEL_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


#: The testbed-compare world: one object group per scene (colour, shape, count, size,
#: position); two-group scenes need more capacity than a CPU-trained base has.
JOB_SCENE: dict = {"p_two_groups": 0.0}

BUDGETS: dict[str, BaseModelConfig] = {
    "quick": BaseModelConfig(n_train=256, steps=40, vae_steps=40, batch_size=8, warmup_steps=5,
                             train_text_encoder=True, scene=JOB_SCENE),
    "full": BaseModelConfig(n_train=20000, steps=6000, train_text_encoder=True, scene=JOB_SCENE),
}

#: The trained ``full`` base, shipped with the package (reproduce it with
#: ``diffalign testbed-base --budget full --force --out diffalign/testbed/assets/base``).
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "base"


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


def train_base_model(out: str | Path, cfg: BaseModelConfig | None = None, log: Callable[[str], None] | None = print) -> Path:
    """Train the base model and save the pipeline to ``out`` (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ..models.tiny import TINY_TEXT_DIM, build_sd15
    from .training import make_training_set

    cfg = cfg or BaseModelConfig()
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        build_sd15(Path(tmp) / "tiny", seed=cfg.seed)
        pipe = StableDiffusionPipeline.from_pretrained(Path(tmp) / "tiny", safety_checker=None, requires_safety_checker=False)
    vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
    text_encoder.requires_grad_(False).eval()

    samples = make_training_set(cfg.n_train, cfg.resolution, cfg.seed, exclude_heldout=cfg.exclude_heldout, **cfg.scene)
    captions = [c for c, _ in samples]
    x = torch.from_numpy(np.stack([im for _, im in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    # 1. VAE as an autoencoder (posterior mean; the log-variance stays pinned by quant_conv)
    vae.train()
    params = [p for n, p in vae.named_parameters() if not n.startswith("quant_conv")]
    opt = torch.optim.AdamW(params, lr=cfg.vae_learning_rate, weight_decay=0.0)
    bar = _progress(cfg.vae_steps, "testbed base: VAE")
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        xb = x[idx]
        z = vae.encode(xb).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, xb) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        vae_rec = F.mse_loss(vae.decode(lat[:64]).sample, x[:64]).item()
    scale = 1.0 / float(lat.std())
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale
    log(f"VAE: recon mse {vae_rec:.4f}, scaling_factor {scale:.3f}")

    # 2. captions -> token ids (and, for a frozen encoder, embeddings) once per unique caption
    uniq = sorted(set(captions))
    cap_idx = {c: k for k, c in enumerate(uniq)}
    ids_table = tokenizer(uniq + [""], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids  # last row: ""
    sample_cond = torch.tensor([cap_idx[c] for c in captions])
    if not cfg.train_text_encoder:
        with torch.no_grad():
            cond_table = torch.cat([text_encoder(ids_table[i : i + 256])[0] for i in range(0, len(ids_table), 256)])

    # 3. UNet from scratch (+ the text encoder, if trained)
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    acp = noise_sched.alphas_cumprod
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    groups = [{"params": list(unet.parameters()), "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        text_encoder.requires_grad_(True).train()
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_learning_rate})
    ema = copy.deepcopy(model).requires_grad_(False)
    trained = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s / cfg.steps, 1.0))))
    )
    unet.train()
    bar = _progress(cfg.steps, "testbed base: UNet")
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(lat), (cfg.batch_size,), generator=gen)
        z0 = lat[idx]
        ci = sample_cond[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < cfg.cfg_dropout
        ci[drop] = len(uniq)
        enc = text_encoder(ids_table[ci])[0] if cfg.train_text_encoder else cond_table[ci]
        t = torch.randint(0, acp.numel(), (len(idx),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, encoder_hidden_states=enc).sample
        loss = F.mse_loss(pred, eps)
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
    final = StableDiffusionPipeline(
        vae=vae, text_encoder=ema["text_encoder"].eval(), tokenizer=tokenizer, unet=ema["unet"].eval(),
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    final.save_pretrained(str(out), safe_serialization=True)
    info = {
        "config": {**asdict(cfg), "block_out_channels": list(cfg.block_out_channels)},
        "key": cfg.key(),
        "vae_recon_mse": vae_rec,
        "final_loss": float(np.mean(losses[-100:])),
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "prompt_separability": prompt_separability(ema["text_encoder"], tokenizer, uniq[:200]),
    }
    (out / "testbed_base.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    log(f"base model: {cfg.steps} UNet steps, loss {info['final_loss']:.4f}, {info['train_seconds']}s -> {out}")
    return out


def shipped_base_model(cfg: BaseModelConfig) -> Path | None:
    """The shipped base-model directory if it was trained with exactly ``cfg``, else None."""
    try:
        info = json.loads((SHIPPED_DIR / "testbed_base.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return SHIPPED_DIR if info.get("key") == cfg.key() else None


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

    def __init__(self, pipe, steps: int = 20, guidance: float = 5.0, resolution: int | None = None, batch_size: int = 32, name: str = "base"):
        self.pipe, self.steps, self.guidance = pipe, int(steps), float(guidance)
        self.resolution, self.batch_size, self.name = resolution, int(batch_size), name
        pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]):
        import torch

        from ..eval.generate import generate

        prompts, seeds = list(prompts), list(seeds)
        outs = []
        for i in range(0, len(prompts), self.batch_size):
            outs.append(generate(self.pipe, prompts[i : i + self.batch_size], seeds[i : i + self.batch_size],
                                 steps=self.steps, guidance=self.guidance, resolution=self.resolution))
        return torch.cat(outs)
