"""Offline pair-trainer step benchmark: pairs/s, peak memory and (on GPU) model FLOP utilisation.

    python benchmarks/pair_step.py --quick                      # tiny models, CPU, < 1 minute
    python benchmarks/pair_step.py --arch sd15 --resolution 512 --dtype bf16 --batch 4   # GPU
    python benchmarks/pair_step.py --arch sd3 --resolution 1024 --dtype bf16 --batch 1 --lora 32

``--arch sd15|sd3|sd35m|flux`` builds the *real* architectures (diffusers' SD1.5 UNet / SD3-medium /
FLUX.1-dev transformer configs; ``sd35m``: SD3.5-Medium from ``diffalign/configs/model_shapes/sd35_medium``;
CLIP ViT-L text tower, SD/FLUX VAE) with random weights in memory,
so no weights are needed; ``--quick`` uses the tiny test models. FLUX's T5-XXL keeps its width
(4096, the transformer's input) but one layer: prompts are encoded outside the timed step when the
cache is on. ``--layers N`` keeps only N double and N single blocks (a CPU smoke check):

    python benchmarks/pair_step.py --arch flux --resolution 1024 --dtype bf16 --batch 1 --lora 32 --cache on
    python benchmarks/pair_step.py --arch flux --layers 1 --resolution 64 --dtype fp32 --lora 4 --steps 1 --warmup 0 \
        --methods dpo --attention sdpa --checkpointing on --cache on     # CPU: does it run Each row times full optimizer steps
(encode, one fused chosen+rejected forward, reference forward for DPO, backward, AdamW) after
warm-up, over a grid of method x attention kernel x gradient checkpointing x latent/text cache. Prints a Markdown table and writes ``--json``.

``--methods diffusers_example`` (LoRA only) times the step of diffusers'
``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` as a reference beside ours, written
here from its published loss (:func:`example_dpo_step`; the script itself is not in the diffusers wheel).

MFU: FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions
and SDPA attention, forward and backward) / step seconds / the card's dense bf16 peak
(:func:`peak_bf16_tflops`; an unknown card: no MFU). xformers' attention is not counted by
FlopCounterMode, so an xformers row takes the FLOPs of the SDPA row of the same case (``flops_from``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
# black-forest-labs/FLUX.1-dev transformer/config.json (12B): 19 double-stream + 38 single-stream blocks
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name(),
# most specific first (NVIDIA's datasheets: H100 SXM5 989.4, H100 PCIe 756.5, H100 NVL 835.5 per GPU,
# H200 SXM 989.4, H200 NVL 835.5, A100 312); the SXM parts report "H100 80GB HBM3" / "H200"
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4),
                    ("H200", 989.4), ("A100", 312.0))


def peak_bf16_tflops(name: str) -> float | None:
    """The dense bf16 peak of the card called ``name`` (TFLOP/s); None for a card not in the table."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def sd35_medium_transformer(layers: int | None = None) -> dict:
    """The SD3.5-Medium transformer config (``model_shapes/sd35_medium/transformer.json``); ``layers``:
    keep only that many blocks (dual-attention ones among them as in the real model)."""
    from diffalign.plan.shapes import shape_config

    config = {k: v for k, v in shape_config("sd35_medium/transformer.json").items() if not k.startswith("_")}
    if layers:
        config["num_layers"] = layers
        config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < layers]
    return config


def build_adapter(arch: str, opts, device, dtype, layers: int | None = None):
    """An adapter around an in-memory pipeline: real architecture (or tiny), random weights.
    ``layers``: keep only that many blocks of each kind (FLUX), for smoke runs."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.models import SD3Adapter, UNetAdapter
    from diffalign.models.tiny import tiny_clip_tokenizer
    from diffalign.plan.shapes import shape_config

    torch.manual_seed(0)
    if arch.startswith("tiny-"):
        import tempfile

        from diffalign.models import load_adapter
        from diffalign.models.tiny import BUILDERS

        path = BUILDERS[arch.split("-")[1]](Path(tempfile.mkdtemp()) / arch)
        return load_adapter(str(path), opts, dtype=dtype, device=device)
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    if arch == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(clip_l), tokenizer=tiny_clip_tokenizer(),
            unet=diffusers.UNet2DConditionModel(**SD15_UNET),
            scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        adapter = UNetAdapter(pipe, "sd15-architecture (random weights)", opts)
    elif arch == "sd3":
        clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
        vae = diffusers.AutoencoderKL(**{**SD_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609})
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel(**SD3_MEDIUM),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=CLIPTextModelWithProjection(clip_l), tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None)  # T5 absent: zeros, as diffusers allows
        adapter = SD3Adapter(pipe, "sd3-medium-architecture (random weights)", opts)
    elif arch == "sd35m":
        # --layers N: N transformer blocks and a one-layer CLIP-G (a smoke run: the widths stay real)
        clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                num_hidden_layers=1 if layers else 32, num_attention_heads=20,
                                max_position_embeddings=77, projection_dim=1280)
        with torch.device(device):  # 2.5B random weights: initialise on the GPU, not the CPU
            transformer = diffusers.SD3Transformer2DModel(**sd35_medium_transformer(layers)).to(dtype)
        vae_config = {k: v for k, v in shape_config("sd35_medium/vae.json").items() if not k.startswith("_")}
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=diffusers.AutoencoderKL(**vae_config),
            text_encoder=CLIPTextModelWithProjection(clip_l), tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None)  # T5 absent: zeros, as diffusers allows
        adapter = SD3Adapter(pipe, "sd35-medium-architecture (random weights)", opts)
    elif arch == "flux":
        from transformers import T5Config, T5EncoderModel

        from diffalign.models import FluxAdapter
        from diffalign.models.tiny import tiny_t5_tokenizer

        config = dict(FLUX_DEV)
        if layers:
            config.update(num_layers=layers, num_single_layers=layers)
        with torch.device(device):  # 12B random weights: initialise on the GPU, not the CPU
            transformer = diffusers.FluxTransformer2DModel(**config).to(dtype)
        t5_tok = tiny_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
            vae=diffusers.AutoencoderKL(**FLUX_VAE), text_encoder=CLIPTextModel(clip_l), tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
        adapter = FluxAdapter(pipe, "flux1-dev-architecture (random weights)", opts)
    else:
        raise SystemExit(f"unknown --arch {arch}")
    return adapter.to(device, dtype)


DIFFUSERS_EXAMPLE_BETA = 2500.0  # the example's --beta_dpo default for SD1.5; the step's time does not depend on it


def example_dpo_step(adapter, net, pixels_w: torch.Tensor, pixels_l: torch.Tensor, captions: list[str],
                     generator: torch.Generator, beta: float = DIFFUSERS_EXAMPLE_BETA) -> torch.Tensor:
    """The loss of one step of diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
    (SD1.5, LoRA), as its README and the Diffusion-DPO paper (Wallace et al. 2023, eq. 14) state it,
    written here (the script is not shipped in the diffusers wheel and cannot be fetched on a GPU box
    without network), with the pipeline's own modules and no diffalign training code: each step
    encodes chosen and rejected images with the VAE (a posterior sample, x scaling factor) and the
    captions with the text encoder, draws one noise and one timestep per pair shared by its two
    images, runs the LoRA UNet on the 2B rows and the reference (the same UNet with its adapters
    disabled, no grad) on the same rows, and returns
    ``-log sigmoid(-beta/2 * ((mse_w - mse_l) - (ref_w - ref_l))).mean()`` (epsilon targets).
    A timing reference only: this is not the script, and it is not diffalign's step."""
    import torch.nn.functional as F

    pipe, device = adapter.pipe, adapter.device
    vae, text_encoder, tokenizer, scheduler = pipe.vae, pipe.text_encoder, pipe.tokenizer, adapter.noise_scheduler
    n = len(captions)
    with torch.no_grad():
        pixels = torch.cat([pixels_w, pixels_l]).to(device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        hidden = text_encoder(ids)[0].repeat(2, 1, 1)
    noise = torch.randn(latents[:n].shape, generator=generator).to(device, latents.dtype).repeat(2, 1, 1, 1)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(device).repeat(2)
    x_t = scheduler.add_noise(latents, noise, t)
    mse = lambda pred: F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))  # noqa: E731
    model_w, model_l = mse(net(x_t, t, hidden).sample).chunk(2)
    with torch.no_grad(), adapter.adapters_disabled(net):
        ref_w, ref_l = mse(net(x_t, t, hidden).sample).chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean()


def run_case(args, method: str, attention: str, checkpointing: bool, device, cache: bool = False) -> dict:
    from diffalign.config import LoraOptions, ModelOptions
    from diffalign.data.batches import CachedPairBatch, PairBatch
    from diffalign.trainers.pair import PairTrainConfig, pair_forward, pair_loss

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cuda":  # the previous case's models must not count in this case's peak memory
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    adapter = build_adapter(args.arch, ModelOptions(attention=attention), device, dtype, args.layers)
    net = adapter.denoiser
    if checkpointing:
        net.enable_gradient_checkpointing()
    if args.lora:
        net.requires_grad_(False)
        adapter.add_lora(LoraOptions(rank=args.lora))
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        reference = None
    else:
        net.requires_grad_(True)
        reference = None
        if method == "dpo":
            import copy

            reference = copy.deepcopy(net).requires_grad_(False).eval()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    cfg = PairTrainConfig(method="dpo" if method == "diffusers_example" else method, data="bench")
    r = args.resolution
    batch = PairBatch(pixels_w=torch.rand(args.batch, 3, r, r) * 2 - 1, pixels_l=torch.rand(args.batch, 3, r, r) * 2 - 1,
                      captions=["a benchmark prompt"] * args.batch)
    if cache:  # what the latent cache hands the step: VAE moments and conditioning, precomputed
        with torch.no_grad():
            mw, sw = adapter.encode_moments(batch.pixels_w.to(device))
            ml, sl = adapter.encode_moments(batch.pixels_l.to(device))
            batch = CachedPairBatch(mean_w=mw, std_w=sw, mean_l=ml, std_l=sl, cond=adapter.encode_prompt(batch.captions),
                                    captions=batch.captions)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    example = method == "diffusers_example"
    if example and (not args.lora or cache or not isinstance(batch, PairBatch)):
        raise SystemExit("--methods diffusers_example: the example trains LoRA from pixels (--lora N --cache off)")

    def step():
        with autocast:
            if example:
                loss = example_dpo_step(adapter, net, batch.pixels_w, batch.pixels_l, batch.captions, gen)
            else:
                mse_w, mse_l, ref_w, ref_l = pair_forward(adapter, net, reference, batch, gen, method, cfg)
                loss, _ = pair_loss(cfg, mse_w, mse_l, ref_w, ref_l, adapter.num_train_timesteps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = None
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    row = {"arch": args.arch, "method": method, "cache": cache, "attention": attention, "checkpointing": checkpointing,
           "resolution": r, "batch_pairs": args.batch, "dtype": args.dtype, "lora": args.lora,
           "step_seconds": round(dt, 4), "pairs_per_second": round(args.batch / dt, 3)}
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        name = torch.cuda.get_device_name()
        peak = peak_bf16_tflops(name)
        row["device"] = name
        row["flops"] = flops
        if peak:
            row["peak_tflops"] = peak
        if flops and peak:
            row["tflops_per_s"] = round(flops / dt / 1e12, 1)
            row["mfu"] = round(flops / dt / (peak * 1e12), 3)
    else:
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        row["device"] = "cpu"
    return row


def with_sdpa_flops(rows: list[dict]) -> None:
    """xformers rows: MFU from the FLOPs of the SDPA row of the same case (FlopCounterMode does not see
    xformers' attention kernels, so their own count misses the attention)."""
    same = lambda a, b: all(a[k] == b[k] for k in ("method", "cache", "checkpointing"))  # noqa: E731
    for r in rows:
        if r["attention"] != "xformers" or not r.get("peak_tflops"):
            continue
        ref = next((q for q in rows if q["attention"] == "sdpa" and q.get("flops") and same(q, r)), None)
        if ref is not None:
            r["flops"], r["flops_from"] = ref["flops"], "sdpa"
            r["tflops_per_s"] = round(ref["flops"] / r["step_seconds"] / 1e12, 1)
            r["mfu"] = round(ref["flops"] / r["step_seconds"] / (r["peak_tflops"] * 1e12), 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models on CPU, fp32, 32 px")
    p.add_argument("--arch", default="sd15", help="sd15 | sd3 | sd35m | flux (real architectures) | tiny-sd15 | tiny-sd3 | tiny-flux")
    p.add_argument("--layers", type=int, default=None, help="flux: keep N double + N single blocks; sd35m: N blocks (smoke runs)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tune)")
    p.add_argument("--methods", nargs="+", default=["dpo", "mapo"])
    p.add_argument("--attention", nargs="+", default=["sdpa", "sdpa_math"])
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"])
    p.add_argument("--cache", nargs="+", default=["off", "on"], help="latent/text cache off/on")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.batch, args.dtype, args.lora = 32, 4, "fp32", 8
        args.steps, args.warmup = 3, 1
        if not args.arch.startswith("tiny-"):
            args.arch = "tiny-sd15"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for method in args.methods:
        for cache in args.cache:
            for attention in args.attention:
                for ckpt in args.checkpointing:
                    rows.append(run_case(args, method, attention, ckpt == "on", device, cache == "on"))
                    print(json.dumps(rows[-1]), flush=True)
    with_sdpa_flops(rows)
    keys = [k for k in rows[0] if k not in ("arch", "dtype", "resolution", "batch_pairs", "lora", "device", "flops",
                                            "peak_tflops")]
    print(f"\n{rows[0]['arch']} @ {args.resolution}px, {args.batch} pairs/step, {args.dtype}, "
          f"{'LoRA r' + str(args.lora) if args.lora else 'full fine-tune'}, {rows[0]['device']}\n")
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
