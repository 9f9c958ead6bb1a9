"""Side by side: another trainer's offline DPO step against diffalign's, on the same model, data,
batch and resolution. Prints a Markdown table; writes nothing else but its work dir.

    python benchmarks/side_by_side.py --setting tiny --workdir /tmp/sbs \\
        --run anchor="python /path/to/train_diffusion_dpo.py --pretrained_model_name_or_path {model} \\
            --dataset_name {data} --dataset_split_name train --output_dir {out} --resolution {resolution} \\
            --train_batch_size {batch} --max_train_steps {steps} --rank {rank} --mixed_precision no \\
            --lr_warmup_steps 0 --report_to wandb" \\
        --run dpo="python -m diffalign.cli train diffalign/configs/tiny/dpo.yaml model={model} data={data} \\
            output_dir={out} max_steps={steps} batch_size={batch} data_opts.resolution={resolution} \\
            lora.rank={rank} overwrite=true" \\
        --baseline anchor --short 5 --long 45 --reps 3

Each ``--run NAME=COMMAND`` is a shell command with placeholders ``{model}`` (a diffusers model
dir the harness builds), ``{data}`` (a dir of Pick-a-Pic-schema parquet it writes), ``{out}`` (a
fresh output dir per run), ``{steps}``, ``{batch}``, ``{resolution}``, ``{rank}``. Point it at
a trainer you have checked out; nothing of it is copied here.

Settings (``--setting``): ``tiny`` is the tiny SD1.5 of ``diffalign tiny-model sd15``;
``sd15-small`` is SD1.5-shaped with random weights: SD1.5's UNet layout (4 levels, channel
multipliers 1-2-4-4, 2 layers per block, 8 heads, 768-d cross attention) at ``--unet-width``
base channels (64: ~35M parameters), SD's VAE and a CLIP ViT-L/14-shaped text encoder.

Method: every command runs once untimed first (diffalign builds its latent cache there, as a
user's first run does; ``DIFFALIGN_CACHE`` points into the work dir). Then the runs are
interleaved (every repetition runs each command once short and once long, in rotating order)
so load from other processes falls on all of them alike. On CPU each run is pinned to one core
(``taskset -c --cpu``) with ``OMP_NUM_THREADS=1``; on GPU (``--gpu``) each runs on one device.
Marginal seconds per step = (t(long) - t(short)) / (long - short), so start-up, model loading
and one-off work (a cache build, a final save) cancel; t is the wall clock and, on CPU, also
the child's CPU time (user + system), which load from other processes on a shared machine
barely changes (the wall clock of one pinned thread does). Peak memory: the
child's peak RSS (``wait4`` rusage) on CPU; with ``--gpu`` the peak of
``torch.cuda.max_memory_allocated`` printed by a wrapper that runs the command's Python script.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CUDA_PEAK = "SIDE_BY_SIDE_CUDA_PEAK_BYTES="


# ------------------------------------------------------------------------------ model and data
def sd15_small_unet(width: int) -> dict:
    """SD1.5's UNet config with ``width`` base channels instead of 320."""
    from pair_step import SD15_UNET

    return {**SD15_UNET, "block_out_channels": tuple(width * m for m in (1, 2, 4, 4)),
            "norm_num_groups": min(32, width // 2)}


def build_model(setting: str, out: Path, unet_width: int) -> Path:
    """A diffusers model dir for ``setting`` (random weights, seed 0)."""
    import torch

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    if setting == "tiny":
        from diffalign.models.tiny import BUILDERS

        return Path(BUILDERS["sd15"](out))
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.models.tiny import tiny_clip_tokenizer
    from pair_step import SD_VAE

    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(clip_l), tokenizer=tiny_clip_tokenizer(),
        unet=diffusers.UNet2DConditionModel(**sd15_small_unet(unet_width)),
        scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def unet_params(model: Path) -> int:
    import json

    from diffusers import UNet2DConditionModel

    cfg = json.loads((model / "unet" / "config.json").read_text())
    return sum(p.numel() for p in UNet2DConditionModel.from_config(cfg).parameters())


def build_data(out: Path, rows: int, size: int) -> Path:
    from diffalign.data.toy import write_toy_pickapic

    if not any(out.glob("*.parquet")):
        write_toy_pickapic(out, n=rows, size=size, seed=0)
    return out


# ------------------------------------------------------------------------------ running
def run_once(command: str, cpu: int | None, gpu: bool, log: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak bytes) of one run; raises on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    argv = shlex.split(command)
    if gpu:
        argv = wrap_for_cuda_peak(argv)
    elif cpu is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(cpu), *argv]
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode}: {command}\n(see {log})")
    peak = usage.ru_maxrss * 1024
    cpu_seconds = usage.ru_utime + usage.ru_stime
    if gpu:
        lines = [l for l in log.read_text().splitlines() if l.startswith(CUDA_PEAK)]
        peak = int(lines[-1].removeprefix(CUDA_PEAK)) if lines else -1
    return wall, cpu_seconds, peak


def wrap_for_cuda_peak(argv: list[str]) -> list[str]:
    """``python X ...`` / ``python -m M ...`` -> the same, run by this file's ``--wrap`` mode."""
    if not argv or "python" not in Path(argv[0]).name:
        raise SystemExit(f"--gpu needs commands that start with a python interpreter, got {argv[:1]}")
    return [argv[0], str(Path(__file__).resolve()), "--wrap", *argv[1:]]


def wrapped_main(argv: list[str]) -> None:
    """Run a script or module as ``python`` would, then print the CUDA peak it allocated."""
    import atexit
    import runpy

    import torch

    def report():
        if torch.cuda.is_available():
            print(f"{CUDA_PEAK}{torch.cuda.max_memory_allocated()}", flush=True)

    atexit.register(report)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--wrap"]:
        wrapped_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="NAME=COMMAND", help="a trainer command (repeatable)")
    p.add_argument("--baseline", default=None, help="NAME the ratios are taken against (default: the first --run)")
    p.add_argument("--setting", default="tiny", choices=["tiny", "sd15-small"])
    p.add_argument("--unet-width", type=int, default=64, help="sd15-small: UNet base channels (SD1.5: 320)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny, 128 sd15-small)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--rows", type=int, default=64, help="Pick-a-Pic-schema rows")
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=45)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cpu", type=int, default=0, help="the core every CPU run is pinned to")
    p.add_argument("--gpu", action="store_true", help="runs use the GPU; peak memory from torch.cuda")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed first run of each command (a work dir whose caches are built)")
    p.add_argument("--workdir", default=None, help="model, data, outputs and logs (default: a temp dir)")
    args = p.parse_args(argv)
    runs = dict(r.split("=", 1) for r in args.run)
    baseline = args.baseline or next(iter(runs))
    res = args.resolution or (64 if args.setting == "tiny" else 128)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="side_by_side-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.setting, work / f"model-{args.setting}-{args.unet_width}", args.unet_width)
    data = build_data(work / f"data-{args.rows}-{max(res, 64)}", args.rows, max(res, 64))
    fill = {"model": str(model), "data": str(data), "batch": args.batch, "resolution": res, "rank": args.rank}

    # diffalign's latent cache (and any other per-user cache) inside the work dir, and built by a
    # warm-up run of every command, as a user's second run would find it
    os.environ.setdefault("DIFFALIGN_CACHE", str(work / "diffalign-cache"))
    for name in runs if args.warmup else ():
        out = work / "out" / f"{name}-warmup"
        shutil.rmtree(out, ignore_errors=True)
        run_once(runs[name].format(**fill, steps=1, out=out), None if args.gpu else args.cpu, args.gpu, work / f"{name}-warmup.log")

    walls: dict[str, dict[int, list[float]]] = {n: {args.short: [], args.long: []} for n in runs}
    cpus: dict[str, dict[int, list[float]]] = {n: {args.short: [], args.long: []} for n in runs}
    peaks: dict[str, list[int]] = {n: [] for n in runs}
    names = list(runs)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for steps in (args.short, args.long):
            for name in order:
                out = work / "out" / f"{name}-{steps}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = runs[name].format(**fill, steps=steps, out=out)
                wall, cpu_s, peak = run_once(cmd, None if args.gpu else args.cpu, args.gpu, work / f"{name}-{steps}-{rep}.log")
                walls[name][steps].append(wall)
                cpus[name][steps].append(cpu_s)
                peaks[name].append(peak)
                print(f"rep {rep} {name} {steps} steps: {wall:.1f} s wall, {cpu_s:.1f} s CPU, peak {peak / 2**30:.2f} GiB",
                      file=sys.stderr, flush=True)

    span = args.long - args.short
    peak = {n: max(peaks[n]) for n in runs}
    where = "GPU" if args.gpu else f"CPU core {args.cpu}, OMP_NUM_THREADS=1"
    print(f"\n{args.setting} (UNet {unet_params(model) / 1e6:.1f}M params) @ {res}px, {args.batch} pairs/step, "
          f"LoRA r{args.rank}, {where}; marginal s/step from {args.short}- vs {args.long}-step runs, {args.reps} reps\n")
    # Wall seconds, and on CPU also the child's CPU seconds (user + system): one pinned thread's
    # CPU time is the work itself, which other processes on a shared machine barely move.
    clocks = {"wall": walls} if args.gpu else {"CPU": cpus, "wall": walls}
    print(f"| run | clock | s/step (per rep) | s/step median | pairs/s | pairs/s vs {baseline} | "
          f"peak {'CUDA alloc' if args.gpu else 'RSS'} GiB | peak vs {baseline} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = {}
    for clock, table in clocks.items():
        marg = {n: [(l - s) / span for s, l in zip(table[n][args.short], table[n][args.long])] for n in runs}
        base_step = statistics.median(marg[baseline])
        for n in runs:
            m = statistics.median(marg[n])
            print(f"| {n} | {clock} | {' / '.join(f'{x:.2f}' for x in marg[n])} | {m:.2f} | {args.batch / m:.2f} | "
                  f"{base_step / m:.2f}x | {peak[n] / 2**30:.2f} | {peak[n] / peak[baseline]:.2f}x |")
        # per-rep ratios (paired runs), so the spread of the ratio shows, not only of the times
        ratios[clock] = {n: [b / x for b, x in zip(marg[baseline], marg[n])] for n in runs if n != baseline}
    print()
    for clock, per_run in ratios.items():
        for n, r in per_run.items():
            print(f"- {n} vs {baseline}, {clock} clock, pairs/s ratio per rep: {' / '.join(f'{x:.2f}' for x in r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
