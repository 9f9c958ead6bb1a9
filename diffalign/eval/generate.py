"""``diffalign eval``: generate images with fixed seeds, score them with rewards, write results.

Seeds are a function of (prompt index, sample index) only (:func:`image_seed`), and each
image gets its own ``torch.Generator``, so two evals of different models on the same prompt
file are paired image by image (same initial noise), and re-running an eval reproduces
identical images and scores regardless of batch size.

Outputs in ``out``: ``images/PPPP_SEED.png``, ``grid.png``, ``per_image.csv`` (``prompt_idx,
prompt, seed, image``, then one column per reward, then ``reward.detail`` columns) and
``summary.json`` (config + per reward ``mean, std, ci_low, ci_high, n``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.prompts import PROMPT_SUFFIXES, read_prompts
from ..config import option
from ..errors import UserError
from .summary import summarize

# named prompt sets -> (hub dataset id, split, prompt column); loaded only when online
NAMED_PROMPT_SETS: dict[str, tuple[str, str, str]] = {
    "partiprompts": ("nateraw/parti-prompts", "train", "Prompt"),
    "drawbench": ("sayakpaul/drawbench", "train", "Prompts"),
    "pickapic_test": ("yuvalkirstain/pickapic_v2_no_images", "test_unique", "caption"),
    "hpsv2": ("ymhao/HPDv2", "test", "prompt"),
    "geneval": ("fal/geneval", "train", "prompt"),
}
# prompt sets a higher layer generates (the testbed's ``testbed_heldout`` / ``testbed_train``):
# name -> function of the count; registered through the ``diffalign.rewards`` entry points, so
# this layer never imports the testbed
_GENERATED_PROMPT_SETS: dict[str, Callable[[int], list[str]]] = {}


def register_prompt_set(name: str, make: Callable[[int], list[str]]) -> None:
    """Make ``--prompts NAME[:N]`` resolve to ``make(N)`` (N defaults to 64)."""
    _GENERATED_PROMPT_SETS[name] = make


def generated_prompt_sets() -> dict[str, Callable[[int], list[str]]]:
    from ..rewards.registry import load_plugins

    load_plugins()
    return dict(_GENERATED_PROMPT_SETS)


def image_seed(prompt_idx: int, i: int, base_seed: int = 0) -> int:
    """Seed of sample ``i`` of prompt ``prompt_idx`` (independent of model and batching)."""
    return (int(base_seed) * 1_000_003 + int(prompt_idx) * 1009 + int(i)) % (2**31 - 1)


def resolve_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Prompts from a prompt file (``.txt``/``.json``/``.jsonl``/``.csv``, read by
    :func:`diffalign.data.prompts.read_prompts`), a testbed set (``testbed_heldout[:N]``), or a
    named benchmark set (``partiprompts``, ``drawbench``, ``pickapic_test``, ``hpsv2``, ``geneval``;
    needs the hub). ``NAME:N`` keeps the first N."""
    name, _, count = spec.partition(":")
    n = int(count) if count.isdigit() else None
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() not in PROMPT_SUFFIXES:
            raise UserError(f"--prompts {spec}: use a .txt (one prompt a line), .json, .jsonl ({{\"prompt\": ...}} a line) "
                            "or .csv (a prompt column) file")
        prompts = read_prompts(path)
    elif name in NAMED_PROMPT_SETS:
        prompts = _load_named(name)
    elif name in (generated := generated_prompt_sets()):
        prompts = generated[name](n or limit or 64)
    else:
        raise UserError(
            f"--prompts {spec!r}: no such file, and not a named set "
            f"({', '.join([*NAMED_PROMPT_SETS, *generated])})"
        )
    if n is not None:
        prompts = prompts[:n]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise UserError(f"--prompts {spec}: no prompts")
    return prompts


def _load_named(name: str) -> list[str]:
    repo, split, column = NAMED_PROMPT_SETS[name]
    hint = "pass a local prompt file instead (--prompts prompts.txt, one prompt a line)"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(f"--prompts {name}: needs the hub dataset {repo} but the hub is offline; {hint}")
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split)
        prompts = [str(p) for p in ds[column]]
    except Exception as e:
        raise UserError(f"--prompts {name}: could not load {repo} ({type(e).__name__}: {str(e)[:200]}); {hint}") from None
    # de-duplicate, keep order
    return list(dict.fromkeys(p for p in prompts if p.strip()))


@dataclass
class EvalConfig:
    """What ``diffalign eval`` (and :func:`diffalign.evaluate`) generates and scores: fixed seeds per
    prompt, so two evaluations of different weights see the same initial noise."""

    model: str = option(help="diffusers pipeline dir or hub id of the base model")
    prompts: str = option(help="prompt file (.txt one per line, or .json, .jsonl, .csv with a prompt column, e.g. an eval's per_image.csv)")
    rewards: list[str] = option(help="rewards to score with, NAME or NAME=PATH (diffalign.rewards names)")
    out: str = option(help="output directory (images/, per_image.csv, summary.json, grid.png)")
    lora: str | None = option(None, help="training run dir to load: its LoRA weights or its full pipeline; null: the base model")
    seeds: int = option(2, help="images per prompt, one seed each")
    base_seed: int = option(0, help="the first seed; image k of a prompt uses base_seed + k")
    steps: int = option(20, help="denoising steps")
    guidance: float = option(5.0, help="classifier-free guidance scale")
    resolution: int | None = option(None, help="image side in pixels; null: the model's default")
    batch_size: int = option(8, help="images per pipeline call")
    num_prompts: int | None = option(None, help="use only the first N prompts; null: all")
    label: str | None = option(None, help="name of this evaluation in reports; null: the out dir's name")
    device: str = option("cpu", help="torch device to generate on (cpu, cuda, cuda:1, ...)")
    grid_prompts: int = option(16, help="prompts shown in the image grid")
    max_sequence_length: int | None = option(None, help=(
        "T5 tokens for SD3-family prompts; null: what the checkpoint records for a pipeline saved "
        "without T5 (e.g. the testbed's flow base), else the pipeline's default, 256"))
    extra: dict = option(factory=dict, help="free-form fields added to the config recorded in summary.json")


def reward_column(spec: str, taken: set[str]) -> str:
    name = spec.partition("=")[0].strip()
    return spec if name in taken else name


def load_pipeline(model: str, lora: str | None = None, device: str = "cpu"):
    """A diffusers pipeline for ``model`` (dir or hub id) with ``lora`` (a training run dir) applied.

    A run dir holding a full pipeline (``lora.rank=0``) replaces ``model``.
    """
    import torch

    from ..models import load_adapter

    if lora is not None:
        lp = Path(lora)
        if not lp.exists():
            raise UserError(f"--lora {lora}: no such directory")
        if (lp / "model_index.json").is_file():
            model, lora = str(lp), None
        elif not any(lp.glob("*.safetensors")):
            raise UserError(f"--lora {lora}: no pytorch_lora_weights.safetensors (or full pipeline) in it")
    adapter = load_adapter(model, dtype=torch.float32, device=device)
    pipe = adapter.pipe
    if lora is not None:
        from ..logging import TEXT_ENCODER_LORA_NOTICE, library_call

        with library_call(TEXT_ENCODER_LORA_NOTICE):  # our LoRAs train the denoiser only
            pipe.load_lora_weights(lora)
        check_lora_fits(pipe, Path(lora), model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_lora_fits(pipe, lora_dir: Path, model: str) -> None:
    """A LoRA whose layers the model does not have is an error, not a no-op: diffusers skips keys it
    cannot place, and the 'fine-tuned' images would be the base's, byte for byte."""
    from safetensors import safe_open

    files = sorted(lora_dir.glob("*.safetensors"))
    expected = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            expected += sum(1 for k in st.keys() if "lora_A" in k or "lora_down" in k or "lora.down" in k)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    placed = sum(1 for n, _ in denoiser.named_parameters() if "lora_A" in n) if denoiser is not None else 0
    if expected and placed < expected:
        trained_on = ""
        cfg = lora_dir / "config.yaml"
        if cfg.is_file():
            import yaml

            base = (yaml.safe_load(cfg.read_text()) or {}).get("model")
            trained_on = f" (it was trained on {base})" if base else ""
        raise UserError(f"--lora {lora_dir}: {expected - placed} of its {expected} LoRA layers have no place in {model}"
                        f"{trained_on}; pass the base model it was trained on")


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float, resolution: int | None,
             device: str = "cpu", max_sequence_length: int | None = None):
    """Float tensor ``[B, 3, H, W]`` in [0, 1]; one generator per image."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = {}
    if resolution:
        kwargs.update(height=int(resolution), width=int(resolution))
    if not max_sequence_length:
        from ..models.sd3 import zero_t5_tokens

        max_sequence_length = zero_t5_tokens(pipe)
    if max_sequence_length:
        kwargs.update(max_sequence_length=int(max_sequence_length))
    from ..models import PIPELINES

    kwargs.update(PIPELINES[type(pipe).__name__].pipeline_guidance_kwargs(float(guidance), len(prompts)))
    with torch.inference_mode():
        out = pipe(prompt=list(prompts), num_inference_steps=int(steps), generator=gens, output_type="pt", **kwargs)
    return out.images.float().clamp(0, 1).cpu()


def save_png(image, path: Path) -> None:
    from PIL import Image

    arr = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_grid(paths: list[list[Path]], out: Path, scale: int = 1) -> Path | None:
    """Tile images (rows of paths) into one PNG."""
    from PIL import Image

    rows = [r for r in paths if r]
    if not rows:
        return None
    if all(len(r) == 1 for r in rows) and len(rows) > 1:  # one seed per prompt: wrap into rows of 8
        flat = [r[0] for r in rows]
        rows = [flat[i : i + 8] for i in range(0, len(flat), 8)]
    first = Image.open(rows[0][0])
    w, h = first.size
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * w + (ncol - 1) * 2, len(rows) * h + (len(rows) - 1) * 2), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            grid.paste(Image.open(p).convert("RGB"), (c * (w + 2), r * (h + 2)))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(out)
    return out


def run_eval(cfg: EvalConfig, pipe=None, prompts: list[str] | None = None, nested: bool = True) -> dict:
    """Generate ``cfg.seeds`` images per prompt, score with every reward, write the outputs.

    Returns the summary dict (also written to ``summary.json``). ``pipe``/``prompts`` may be
    given to reuse a loaded pipeline or an in-memory prompt list. ``nested=False`` (the ``eval``
    command) makes the image bar the outermost one, so it reports to log files too.
    A run that fails removes the output directory it created: no empty or half-written results.
    """
    from ..rewards import get_reward

    t0 = time.perf_counter()
    if not cfg.rewards:
        raise UserError("give at least one --reward NAME[=PATH]")
    if cfg.seeds < 1:
        raise UserError("--seeds must be >= 1")
    prompts = list(prompts) if prompts is not None else resolve_prompts(cfg.prompts, cfg.num_prompts)
    out = Path(cfg.out)
    rewards, columns = [], []
    for spec in cfg.rewards:
        rewards.append(get_reward(spec))
        columns.append(reward_column(spec, set(columns)))
    if pipe is None:
        pipe = load_pipeline(cfg.model, cfg.lora, cfg.device)
    created = not out.exists()
    (out / "images").mkdir(parents=True, exist_ok=True)
    try:
        return _generate_and_score(cfg, pipe, prompts, rewards, columns, out, t0, nested)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _generate_and_score(cfg: EvalConfig, pipe, prompts: list[str], rewards: list, columns: list[str], out: Path,
                        t0: float, nested: bool) -> dict:
    import torch

    from ..logging import progress

    items = [(pi, p, image_seed(pi, i, cfg.base_seed)) for pi, p in enumerate(prompts) for i in range(cfg.seeds)]
    rows: list[dict] = []
    scores: dict[str, list[float]] = {c: [] for c in columns}
    detail_cols: list[str] = []
    bar = progress(total=len(items), desc=f"eval {cfg.label or out.name}", unit="img", inner=nested)
    for start in range(0, len(items), cfg.batch_size):
        batch = items[start : start + cfg.batch_size]
        caps = [b[1] for b in batch]
        images = generate(pipe, caps, [b[2] for b in batch], steps=cfg.steps, guidance=cfg.guidance,
                          resolution=cfg.resolution, device=cfg.device, max_sequence_length=cfg.max_sequence_length)
        batch_rows = []
        for (pi, p, s), img in zip(batch, images):
            rel = Path("images") / f"{pi:04d}_{s}.png"
            save_png(img, out / rel)
            batch_rows.append({"prompt_idx": pi, "prompt": p, "seed": s, "image": str(rel)})
        for col, reward in zip(columns, rewards):
            res = reward(images, caps)
            vals = res.scores.detach().float().cpu().reshape(-1).tolist()
            for row, v in zip(batch_rows, vals):
                row[col] = float(v)
            scores[col].extend(float(v) for v in vals)
            for k, d in (getattr(res, "details", None) or {}).items():
                if isinstance(d, torch.Tensor) and d.numel() == len(batch):
                    name = f"{col}.{k}"
                    if name not in detail_cols:
                        detail_cols.append(name)
                    for row, v in zip(batch_rows, d.detach().float().cpu().reshape(-1).tolist()):
                        row[name] = float(v)
        rows.extend(batch_rows)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()

    fieldnames = ["prompt_idx", "prompt", "seed", "image", *columns, *detail_cols]
    with open(out / "per_image.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        w.writeheader()
        w.writerows(rows)
    by_prompt: dict[int, list[Path]] = {}
    for r in rows:
        if r["prompt_idx"] < cfg.grid_prompts:
            by_prompt.setdefault(r["prompt_idx"], []).append(out / r["image"])
    make_grid([by_prompt[k] for k in sorted(by_prompt)], out / "grid.png", scale=2)

    config = asdict(cfg)
    config.pop("extra", None)
    config.update(cfg.extra)
    config["num_prompts"] = len(prompts)
    summary = {
        "label": cfg.label or out.name,
        "config": config,
        "rewards": summarize(scores),
        "reward_columns": columns,
        "n_images": len(rows),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
