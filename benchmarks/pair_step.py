"""Offline pair-trainer step benchmark: pairs/s, peak memory and (on GPU) model FLOP utilisation.

    python benchmarks/pair_step.py --quick                      # tiny models, CPU, < 1 minute
    python benchmarks/pair_step.py --arch sd15 --resolution 512 --dtype bf16 --batch 4   # GPU
    python benchmarks/pair_step.py --arch sd3 --resolution 1024 --dtype bf16 --batch 1 --lora 32

``--arch sd15|sd3|flux`` builds the *real* architectures (diffusers' SD1.5 UNet / SD3-medium /
FLUX.1-dev transformer configs, CLIP ViT-L text tower, SD/FLUX VAE) with random weights in memory,
so no weights are needed; ``--quick`` uses the tiny test models. FLUX's T5-XXL keeps its width
(4096, the transformer's input) but one layer: prompts are encoded outside the timed step when the
cache is on. ``--layers N`` keeps only N double and N single blocks (a CPU smoke check):

    python benchmarks/pair_step.py --arch flux --resolution 1024 --dtype bf16 --batch 1 --lora 32 --cache on
    python benchmarks/pair_step.py --arch flux --layers 1 --resolution 64 --dtype fp32 --lora 4 --steps 1 --warmup 0 \
        --methods dpo --attention sdpa --checkpointing on --cache on     # CPU: does it run Each row times full optimizer steps
(encode, one fused chosen+rejected forward, reference forward for DPO, backward, AdamW) after
warm-up, over a grid of method x attention kernel x gradient checkpointing x latent/text cache. Prints a Markdown table and writes ``--json``.
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
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def build_adapter(arch: str, opts, device, dtype, layers: int | None = None):
    """An adapter around an in-memory pipeline: real architecture (or tiny), random weights.
    ``layers``: keep only that many blocks of each kind (FLUX), for smoke runs."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.models import SD3Adapter, UNetAdapter
    from diffalign.models.tiny import tiny_clip_tokenizer

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


def run_case(args, method: str, attention: str, checkpointing: bool, device, cache: bool = False) -> dict:
    from diffalign.config import LoraOptions, ModelOptions
    from diffalign.data.batches import CachedPairBatch, PairBatch
    from diffalign.trainers.pair import PairTrainConfig, pair_forward, pair_loss

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
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
    cfg = PairTrainConfig(method=method, data="bench")
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

    def step():
        with autocast:
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
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        row["device"] = name
        if flops and peak:
            row["tflops_per_s"] = round(flops / dt / 1e12, 1)
            row["mfu"] = round(flops / dt / (peak * 1e12), 3)
    else:
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        row["device"] = "cpu"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models on CPU, fp32, 32 px")
    p.add_argument("--arch", default="sd15", help="sd15 | sd3 | flux (real architectures) | tiny-sd15 | tiny-sd3 | tiny-flux")
    p.add_argument("--layers", type=int, default=None, help="flux: keep N double + N single blocks (smoke runs)")
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
    keys = [k for k in rows[0] if k not in ("arch", "dtype", "resolution", "batch_pairs", "lora", "device")]
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
