"""``diffalign benchmark NAME``: published text-to-image benchmarks, each with its own sampling protocol.

A benchmark is a prompt set in its official file format, a sampling protocol (images per prompt, seeds,
sampler defaults) and a scorer. Prompt files are read from local files only (``--prompts``); a missing
file is one line saying where the official file is and which flag takes it.

========================  ================================================  ==============================
benchmark                 prompts (``--prompts``)                           scored with
========================  ================================================  ==============================
``geneval``               GenEval's ``prompts/evaluation_metadata.jsonl``   the ``geneval`` reward's rules:
                          (github.com/djghosh13/geneval; Flow-GRPO's own    per-task accuracy, ``overall``
                          ``dataset/geneval/test_metadata.jsonl`` has the   = mean over tasks (GenEval's
                          same schema)                                      ``summary_scores.py``)
``ocr``                   Flow-GRPO's ``dataset/ocr/test.txt`` (one prompt  the ``ocr`` reward (Flow-GRPO's
                          a line, the text to render in double quotes)      convention), mean score
``hpsv2``                 HPD v2's ``benchmark/{anime,concept-art,          HPS v2.1 (``hpsv2``; pass
                          paintings,photo}.json`` (a directory of them, or  ``--reward hpsv2.0`` for the
                          one of them), huggingface.co/datasets/zhwang/     paper's v2.0): mean per style
                          HPDv2                                             and their average
``partiprompts``          ``PartiPrompts.tsv`` (``Prompt`` and ``Category``  PickScore (Diffusion-DPO's
                          columns), github.com/google-research/parti        PartiPrompts metric), mean and
                                                                            per category
``drawbench``             the DrawBench CSV (``Prompts`` and ``Category``   PickScore, mean and per
                          columns, as the Imagen sheet's export and the     category
                          ``sayakpaul/drawbench`` dataset)
========================  ================================================  ==============================

**Protocols** (:data:`PROTOCOLS`; every default can be overridden on the command line):

* ``geneval``: 4 images per prompt (``diffusers_generate.py --n_samples 4``). The official script calls
  ``seed_everything(42)`` before every prompt, so every prompt starts from the same noise sequence;
  here image ``k`` of every prompt uses ``torch.Generator().manual_seed(42 + k)`` (the same noise for every
  prompt too, and independent of batching, but not bitwise the latents of the official script, which
  draws them one after the other from the global generator). Sampler defaults are the official
  script's: 50 steps, guidance 9.0, the model's resolution; Flow-GRPO evaluates SD3.5-M at 40 steps,
  guidance 4.5, 512 px (``config/grpo.py``: ``eval_num_steps``, ``guidance_scale``, ``resolution``).
  Images are written in GenEval's layout (``images/00000/samples/00000.png`` and
  ``images/00000/metadata.jsonl``), so GenEval's own ``evaluate_images.py images/`` runs on them as well.
* ``ocr``: one image per prompt at Flow-GRPO's evaluation settings for SD3.5-M (40 steps, guidance 4.5,
  512 px: ``general_ocr_sd3``), seed ``42 + k``.
* ``hpsv2``: one image per prompt per style (HPS v2's benchmark: ``{style}/{idx:05d}.jpg``, scored per
  style and averaged); our sampler defaults (40 steps, guidance 4.5; not fixed by the benchmark).
* ``partiprompts`` / ``drawbench``: one image per prompt, PickScore by default (``--reward`` replaces it;
  repeatable), 40 steps, guidance 4.5 (ours).

**Resuming.** Image files are written atomically (a temporary name, then a rename), and a run skips the
images that exist. Images are generated in fixed batches of the whole prompt set (``--batch-size``
consecutive images; a batch with a missing image is regenerated whole and only its missing images are
written), so a run killed and started again, or run with ``--limit`` and then without, writes exactly the
images one uninterrupted run writes. Scoring always reads the images back from their files. The
generation settings are kept in ``benchmark.json``: resuming with other settings is an error.

**Outputs** (``--out``): ``images/``, ``per_image.csv`` (``prompt_idx, prompt, seed, image, group``, then
the score columns), ``summary.json`` (``diffalign eval``'s keys, so ``diffalign compare`` reads it, plus
``benchmark`` and the benchmark's own ``scores``), ``summary.md``, ``grid.png`` and, for GenEval, the
official ``results.jsonl`` (one row per image: ``filename, tag, prompt, correct, reason, metadata,
details``, as ``evaluation/evaluate_images.py`` writes it).

**Score columns.** ``REWARD`` is the per-image score; ``REWARD.GROUP`` holds it only for the images of that
group (GenEval task, HPS style, Parti/DrawBench category; empty elsewhere), so its mean is the group's
score and ``diffalign compare`` gives per-group paired deltas. Where the headline number is a mean over
groups (GenEval's ``overall``, HPS v2's ``average``), ``REWARD.overall`` / ``REWARD.average`` weights each
image by ``N / (G * n_group)``: its mean is exactly the headline number, and its paired difference between
two runs of the same prompts is the difference of their headline numbers, with a t interval.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import option
from ..errors import UserError
from .summary import summarize

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


@dataclass(frozen=True)
class Protocol:
    """A benchmark's prompt source, sampling protocol and scorer."""

    name: str
    reward: str                      # the default reward spec
    images_per_prompt: int
    seed: int                        # image k of every prompt uses seed + k
    steps: int
    guidance: float
    resolution: int | None
    prompt_file: str                 # what --prompts takes, and where to get it
    headline: str                    # "mean", or a group mean's name: "overall" (GenEval), "average" (HPS)
    source: str                      # where the protocol's numbers come from
    custom_reward: bool = True       # whether --reward may replace the scorer


PROTOCOLS: dict[str, Protocol] = {
    "geneval": Protocol(
        "geneval", "geneval", 4, 42, 50, 9.0, None,
        "GenEval's prompts/evaluation_metadata.jsonl (https://github.com/djghosh13/geneval)",
        "overall", "djghosh13/geneval generation/diffusers_generate.py defaults (--n_samples 4, --seed 42, "
        "--steps 50, --scale 9.0); evaluation/summary_scores.py (overall = mean of task accuracies)",
        custom_reward=False),
    "ocr": Protocol(
        "ocr", "ocr", 1, 42, 40, 4.5, 512,
        "Flow-GRPO's dataset/ocr/test.txt (https://github.com/yifan123/flow_grpo)",
        "mean", "yifan123/flow_grpo config/grpo.py general_ocr_sd3 (eval_num_steps 40, guidance_scale 4.5, "
        "resolution 512; one image per test prompt)", custom_reward=False),
    "hpsv2": Protocol(
        "hpsv2", "hpsv2", 1, 42, 40, 4.5, None,
        "HPD v2's anime.json, concept-art.json, paintings.json and photo.json "
        "(https://huggingface.co/datasets/zhwang/HPDv2/tree/main/benchmark) into one directory",
        "average", "tgxs002/HPSv2 benchmark: one image per prompt of each style, mean per style and their average"),
    "partiprompts": Protocol(
        "partiprompts", "pickscore", 1, 42, 40, 4.5, None,
        "PartiPrompts.tsv (https://github.com/google-research/parti/blob/main/PartiPrompts.tsv)",
        "mean", "PartiPrompts (Yu et al. 2022) scored with PickScore, as Diffusion-DPO (Wallace et al. 2023) reports it"),
    "drawbench": Protocol(
        "drawbench", "pickscore", 1, 42, 40, 4.5, None,
        "the DrawBench CSV with Prompts and Category columns (the Imagen DrawBench sheet, "
        "https://imagen.research.google/, or the sayakpaul/drawbench dataset's file)",
        "mean", "DrawBench (Saharia et al. 2022) scored with PickScore"),
}


@dataclass
class Item:
    """One image to make: its prompt, group, seed, path (relative to the out dir) and, for GenEval, its row."""

    prompt_idx: int
    prompt: str
    group: str
    seed: int
    image: str
    meta: dict | None = None


@dataclass
class BenchmarkConfig:
    """What ``diffalign benchmark`` runs: one named benchmark (its :class:`Protocol`) on one model;
    ``None`` fields take the protocol's value."""

    name: str = option(help="the benchmark: geneval | ocr | hpsv2 | partiprompts | drawbench")
    model: str = option(help="diffusers pipeline dir or hub id")
    out: str = option(help="output directory; the same one again resumes")
    prompts: str | None = option(None, help="the benchmark's prompt file in its official format; null: the protocol's")
    lora: str | None = option(None, help="training run dir (LoRA weights or a full pipeline); null: the base model")
    rewards: list[str] = option(factory=list, help="rewards replacing the protocol's (preference sets), NAME[=PATH]")
    reward_path: str | None = option(None, help="PATH of the protocol's own reward (NAME=PATH)")
    reward_opts: dict = option(factory=dict, help="keyword arguments of the reward(s)")
    limit: int | None = option(None, help="only the first N prompts (of each style, for hpsv2)")
    images_per_prompt: int | None = option(None, help="images per prompt; null: the protocol's (geneval 4, others 1)")
    seed: int | None = option(None, help="image k of each prompt uses seed + k; null: 42")
    steps: int | None = option(None, help="denoising steps; null: the protocol's")
    guidance: float | None = option(None, help="guidance scale; null: the protocol's")
    resolution: int | None = option(None, help="image side; null: the protocol's, else the model's")
    batch_size: int = option(4, help="images per pipeline call (keep it when resuming)")
    device: str = option("cpu", help="torch device to generate on")
    label: str | None = option(None, help="name in reports; null: the out dir's name")
    max_sequence_length: int | None = option(None, help="T5 tokens of SD3-family prompts")


# -- prompt files ----------------------------------------------------------------------------------

def _missing(proto: Protocol, spec: str | None) -> UserError:
    where = f"--prompts {spec}: no such file" if spec else "no --prompts given"
    return UserError(f"benchmark {proto.name}: {where}; download {proto.prompt_file} and pass its path with --prompts")


def load_prompts(proto: Protocol, spec: str | None) -> list[tuple[str, str, dict | None]]:
    """``(prompt, group, metadata row or None)`` of the benchmark's whole prompt set, in file order."""
    if not spec or not Path(spec).exists():
        raise _missing(proto, spec)
    path = Path(spec)
    if proto.name == "hpsv2":
        files = [path / f"{s}.json" for s in HPS_STYLES] if path.is_dir() else [path]
        files = [f for f in files if f.is_file()]
        if not files:
            raise _missing(proto, spec)
        out = []
        for f in files:
            data = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise UserError(f"--prompts {f}: HPD v2 benchmark files are a JSON list of prompt strings")
            out += [(p, f.stem, None) for p in data]
        return out
    if path.is_dir():
        raise _missing(proto, spec)
    if proto.name == "geneval":
        from ..rewards.geneval.rules import check_metadata

        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--prompts {spec} line {i} is not JSON ({e}); GenEval's metadata is one JSON row a line") from None
            if not isinstance(row, dict) or not {"prompt", "tag", "include"} <= row.keys():
                raise UserError(f"--prompts {spec} line {i}: a GenEval row needs 'tag', 'include' and 'prompt'")
            try:
                check_metadata(row)
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"--prompts {spec} line {i}: {e}") from None
            rows.append((str(row["prompt"]), str(row["tag"]), row))
        return rows
    if proto.name == "ocr":
        return [(line.strip(), "", None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # partiprompts (tsv, Prompt/Category) and drawbench (csv, Prompts/Category)
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delim)
        fields = reader.fieldnames or []
        col = next((c for c in ("Prompt", "Prompts", "prompt", "prompts") if c in fields), None)
        if col is None:
            raise UserError(f"--prompts {spec}: no Prompt/Prompts column (columns: {', '.join(fields)})")
        cat = next((c for c in ("Category", "category") if c in fields), None)
        return [(r[col].strip(), (r.get(cat) or "").strip() if cat else "", None) for r in reader if (r.get(col) or "").strip()]


def build_items(proto: Protocol, prompts: list[tuple[str, str, dict | None]], n_images: int, seed: int) -> list[Item]:
    """Every image of the whole prompt set, in generation order."""
    items = []
    per_group: dict[str, int] = {}
    for pi, (p, g, meta) in enumerate(prompts):
        gi = per_group.get(g, 0)
        per_group[g] = gi + 1
        for k in range(n_images):
            if proto.name == "geneval":  # GenEval's own layout
                rel = f"images/{pi:05d}/samples/{k:05d}.png"
            elif proto.name == "hpsv2":  # HPS v2's {style}/{idx:05d}
                rel = f"images/{g}/{gi:05d}" + (f"_{k}" if n_images > 1 else "") + ".png"
            else:
                rel = f"images/{pi:05d}_{k}.png"
            items.append(Item(pi, p, g, seed + k, rel, meta))
    return items


def select(proto: Protocol, items: list[Item], limit: int | None) -> list[Item]:
    """The items a ``--limit N`` run makes: the first N prompts (of each style, for HPS v2)."""
    if limit is None:
        return list(items)
    if proto.name != "hpsv2":
        return [it for it in items if it.prompt_idx < limit]
    firsts: dict[str, list[int]] = {}
    for it in items:
        seen = firsts.setdefault(it.group, [])
        if it.prompt_idx not in seen:
            seen.append(it.prompt_idx)
    keep = {pi for idxs in firsts.values() for pi in idxs[:limit]}
    return [it for it in items if it.prompt_idx in keep]


# -- generation ------------------------------------------------------------------------------------

GENERATION_KEYS = ("benchmark", "model", "lora", "seed", "images_per_prompt", "steps", "guidance", "resolution",
                   "batch_size", "max_sequence_length", "prompts_sha")


def _save_atomic(image, path: Path) -> None:
    from .generate import save_png

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    save_png(image, tmp)
    os.replace(tmp, path)


def generate_missing(items: list[Item], needed: list[Item], out: Path, gen: dict, pipe_fn: Callable[[], Any],
                     label: str) -> int:
    """Generate the ``needed`` images that are not on disk, in fixed batches of ``items``; returns how many
    were made. ``pipe_fn`` loads the pipeline (only when something is missing)."""
    from ..logging import progress
    from .generate import generate

    need = {id(it) for it in needed}
    missing = {id(it) for it in needed if not (out / it.image).is_file()}
    if not missing:
        return 0
    bs = max(1, int(gen["batch_size"]))
    bar = progress(total=len(needed), initial=len(needed) - len(missing), desc=f"benchmark {label}", unit="img")
    pipe = pipe_fn()
    made = 0
    for start in range(0, len(items), bs):
        batch = items[start:start + bs]
        if not any(id(it) in missing for it in batch):
            continue
        images = generate(pipe, [it.prompt for it in batch], [it.seed for it in batch], steps=gen["steps"],
                          guidance=gen["guidance"], resolution=gen["resolution"], device=gen["device"],
                          max_sequence_length=gen["max_sequence_length"])
        for it, img in zip(batch, images):
            if id(it) in missing and id(it) in need:
                _save_atomic(img, out / it.image)
                made += 1
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return made


def load_images(paths: list[Path]):
    import numpy as np
    import torch
    from PIL import Image

    arrs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


# -- scoring ---------------------------------------------------------------------------------------

def _reward_kwargs(cfg: BenchmarkConfig) -> dict:
    kw = {"device": cfg.device}
    kw.update(cfg.reward_opts)
    return kw


def score_geneval(cfg: BenchmarkConfig, items: list[Item], out: Path, reward=None) -> tuple[list[dict], list[dict]]:
    """Per item ``{"geneval": 0/1, "geneval.strict", "geneval.partial"}`` and GenEval's results.jsonl rows."""
    from ..rewards import get_reward
    from ..rewards.geneval.colors import to_pil
    from ..rewards.geneval.rules import judge, select_detections

    import torch

    if reward is None:
        spec = "geneval" + (f"={cfg.reward_path}" if cfg.reward_path else "")
        reward = get_reward(spec, **_reward_kwargs(cfg))
    reward.ensure_loaded()
    scores, results = [], []
    bs = max(1, int(getattr(reward, "batch_size", 8)))
    for start in range(0, len(items), bs):
        batch = items[start:start + bs]
        images = load_images([out / it.image for it in batch])
        with torch.inference_mode():
            found = reward._detect(images)
            for it, img, dets in zip(batch, images, found):
                pil: list = []

                def color_fn(cls, group, img=img, pil=pil):
                    if not pil:
                        pil.append(to_pil(img))
                    return list(reward.color_classifier(pil[0], group, cls))

                selected = select_detections(dets, it.meta.get("tag"), reward.rules)
                j = judge(selected, it.meta, color_fn, reward.rules, flow_grpo_partial=reward.flow_grpo_partial)
                scores.append({"geneval": float(j.correct), "geneval.strict": float(j.strict),
                               "geneval.partial": float(j.partial)})
                # evaluation/evaluate_images.py's row: boxes as mmdet's [x0, y0, x1, y1, score], most confident first
                results.append({
                    "filename": str(out / it.image),
                    "tag": it.meta["tag"],
                    "prompt": it.meta["prompt"],
                    "correct": bool(j.correct),
                    "reason": official_reason(j),
                    "metadata": json.dumps(it.meta),
                    "details": json.dumps({cls: [[*map(float, b.tolist()), float(s)] for b, s in zip(d.boxes, d.scores)]
                                           for cls, d in selected.items()}),
                })
    return scores, results


def official_reason(j) -> str:
    """GenEval's ``reason``: its own failures only ("" for a correct image), without the exact-count
    (Flow-GRPO ``strict``) lines our judgement adds."""
    if j.correct:
        return ""
    return "\n".join(line for line in j.reason.split("\n") if "(strict)" not in line)


def score_rewards(specs: list[str], cfg: BenchmarkConfig, items: list[Item], out: Path) -> tuple[list[dict], list[str]]:
    """Per item ``{column: score}`` for reward specs (columns named as ``diffalign eval`` names them)."""
    from ..rewards import get_reward
    from .generate import reward_column

    columns: list[str] = []
    rewards = []
    for spec in specs:
        rewards.append(get_reward(spec, **_reward_kwargs(cfg)))
        columns.append(reward_column(spec, set(columns)))
    rows: list[dict] = [{} for _ in items]
    bs = 16
    for start in range(0, len(items), bs):
        batch = items[start:start + bs]
        images = load_images([out / it.image for it in batch])
        prompts = [it.prompt for it in batch]
        for col, reward in zip(columns, rewards):
            vals = reward(images, prompts).scores.detach().float().cpu().reshape(-1).tolist()
            for r, v in zip(rows[start:start + bs], vals):
                r[col] = float(v)
    return rows, columns


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else float("nan")


def add_group_columns(items: list[Item], rows: list[dict], column: str, headline: str) -> tuple[list[str], dict]:
    """``column.GROUP`` per group and, for a group-mean headline, ``column.HEADLINE`` (see the module doc).
    Returns the new columns and ``{"groups": {g: mean}, headline: value}``."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.group:
            groups.setdefault(it.group, []).append(i)
    if not groups:
        return [], {}
    new = []
    means = {}
    if headline != "mean" and len(items):
        name = f"{column}.{headline}"
        new.append(name)
        n, g = len(items), len(groups)
        for idxs in groups.values():
            for i in idxs:
                rows[i][name] = rows[i][column] * n / (g * len(idxs))
    for grp, idxs in groups.items():
        name = f"{column}.{grp}"
        new.append(name)
        for i in idxs:
            rows[i][name] = rows[i][column]
        means[grp] = _mean([rows[i][column] for i in idxs])
    info = {"groups": means}
    if headline != "mean":
        info[headline] = _mean(list(means.values()))
    return new, info


def _sha(prompts: list[tuple[str, str, dict | None]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p, g, m in prompts:
        h.update(json.dumps([p, g, m], sort_keys=True).encode())
    return h.hexdigest()[:16]


def run_benchmark(cfg: BenchmarkConfig, pipe=None, reward=None) -> dict:
    """Generate what is missing, score everything, write the outputs; returns the summary dict."""
    t0 = time.perf_counter()
    if cfg.name not in PROTOCOLS:
        raise UserError(f"unknown benchmark {cfg.name!r}; one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[cfg.name]
    if cfg.rewards and not proto.custom_reward:
        raise UserError(f"benchmark {proto.name} is scored by its own reward ({proto.reward}); "
                        "pass its checkpoint with --reward-path and options with --reward-opt KEY=VALUE")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError("--limit must be >= 1")
    prompts = load_prompts(proto, cfg.prompts)
    if not prompts:
        raise UserError(f"--prompts {cfg.prompts}: no prompts")
    n_images = cfg.images_per_prompt or proto.images_per_prompt
    if n_images < 1:
        raise UserError("--images-per-prompt must be >= 1")
    for flag, value, ok in (("--batch-size", cfg.batch_size, cfg.batch_size >= 1),
                            ("--steps", cfg.steps, cfg.steps is None or cfg.steps >= 1),
                            ("--resolution", cfg.resolution, cfg.resolution is None or (cfg.resolution >= 8 and cfg.resolution % 8 == 0)),
                            ("--guidance", cfg.guidance, cfg.guidance is None or cfg.guidance >= 0),
                            ("--max-sequence-length", cfg.max_sequence_length,
                             cfg.max_sequence_length is None or cfg.max_sequence_length >= 1)):
        if not ok:  # before anything is written: a bad value must not leave a benchmark.json that refuses the fix
            raise UserError(f"{flag} {value}: must be {'a multiple of 8, >= 8' if flag == '--resolution' else '>= 0' if flag == '--guidance' else '>= 1'}")
    gen = {
        "benchmark": proto.name, "model": cfg.model, "lora": cfg.lora,
        "seed": proto.seed if cfg.seed is None else int(cfg.seed), "images_per_prompt": n_images,
        "steps": cfg.steps or proto.steps, "guidance": proto.guidance if cfg.guidance is None else float(cfg.guidance),
        "resolution": cfg.resolution or proto.resolution, "batch_size": int(cfg.batch_size),
        "max_sequence_length": cfg.max_sequence_length, "prompts_sha": _sha(prompts), "device": cfg.device,
    }
    out = Path(cfg.out)
    state = out / "benchmark.json"
    if state.is_file():
        old = json.loads(state.read_text(encoding="utf-8"))
        diff = [k for k in GENERATION_KEYS if old.get(k) != gen.get(k)]
        if diff:
            k = diff[0]
            raise UserError(f"--out {out} holds a benchmark made with other settings ({k} {old.get(k)!r}, now "
                            f"{gen.get(k)!r}); resume with the same settings or use another --out")
    elif (out / "images").exists():
        raise UserError(f"--out {out} has images/ but no benchmark.json: not a `diffalign benchmark` dir; use another --out")
    created, fresh_state = not out.exists(), not state.is_file()
    out.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(gen, indent=2), encoding="utf-8")

    items = build_items(proto, prompts, n_images, gen["seed"])
    needed = select(proto, items, cfg.limit)
    label = cfg.label or out.name
    if proto.name == "geneval":  # GenEval's per-prompt metadata.jsonl (one JSON object, as the official script)
        for pi in sorted({it.prompt_idx for it in needed}):
            mpath = out / f"images/{pi:05d}/metadata.jsonl"
            if not mpath.is_file():
                mpath.parent.mkdir(parents=True, exist_ok=True)
                mpath.write_text(json.dumps(prompts[pi][2]), encoding="utf-8")

    def pipe_fn():
        if pipe is not None:
            return pipe
        from .generate import load_pipeline

        return load_pipeline(cfg.model, cfg.lora, cfg.device)

    for tmp in (out / "images").rglob(".*.tmp*.png") if (out / "images").is_dir() else []:
        tmp.unlink(missing_ok=True)  # half-written by a killed run
    try:
        made = generate_missing(items, needed, out, gen, pipe_fn, label)
    except BaseException:
        # nothing generated (a model that does not load, ...): undo what this run wrote, so the next
        # run with the fix is not refused as "other settings" (eval removes its dir the same way)
        if fresh_state and not any((out / "images").rglob("*.png")):
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                state.unlink(missing_ok=True)
                shutil.rmtree(out / "images", ignore_errors=True)
        raise

    # -- score
    extra: dict[str, Any] = {}
    if proto.name == "geneval":
        rows, results = score_geneval(cfg, needed, out, reward)
        columns = ["geneval"]
        detail_cols = ["geneval.strict", "geneval.partial"]
        with open(out / "results.jsonl", "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        from ..rewards.geneval.rules import summarize as geneval_summary

        extra = geneval_summary([{"tag": it.meta["tag"], "correct": r["geneval"], "strict": r["geneval.strict"],
                                  "partial": r["geneval.partial"]} for it, r in zip(needed, rows)])
        extra["prompts"] = len({it.prompt_idx for it in needed})
        per_prompt: dict[int, bool] = {}
        for it, r in zip(needed, rows):  # summary_scores.py's "% correct prompts": any image correct
            per_prompt[it.prompt_idx] = per_prompt.get(it.prompt_idx, False) or bool(r["geneval"])
        extra["correct_prompts"] = _mean([float(v) for v in per_prompt.values()])
    else:
        specs = cfg.rewards or [proto.reward + (f"={cfg.reward_path}" if cfg.reward_path else "")]
        if cfg.reward_path and cfg.rewards:
            raise UserError("--reward-path goes with the benchmark's default reward; with --reward give NAME=PATH")
        rows, columns = score_rewards(specs, cfg, needed, out)
        detail_cols = []
    group_cols: list[str] = []
    groups_info: dict[str, Any] = {}
    for col in list(columns):
        new, info = add_group_columns(needed, rows, col, proto.headline)
        group_cols += new
        if info:
            groups_info[col] = info
    reward_columns = columns + group_cols

    table = []
    for it, r in zip(needed, rows):
        table.append({"prompt_idx": it.prompt_idx, "prompt": it.prompt, "seed": it.seed, "image": it.image,
                      "group": it.group, **r})
    with open(out / "per_image.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt_idx", "prompt", "seed", "image", "group", *reward_columns, *detail_cols],
                           restval="")
        w.writeheader()
        w.writerows(table)

    from .generate import make_grid

    by_prompt: dict[int, list[Path]] = {}
    for it in needed:
        if len(by_prompt) < 16 or it.prompt_idx in by_prompt:
            by_prompt.setdefault(it.prompt_idx, []).append(out / it.image)
    make_grid([by_prompt[k] for k in sorted(by_prompt)], out / "grid.png", scale=2)

    scores = {c: [r[c] for r in rows if c in r] for c in reward_columns}
    if proto.name == "geneval":
        headline = {"overall": extra["overall"]}
        bench_scores = extra
    elif proto.headline != "mean":
        col = columns[0]
        headline = {proto.headline: groups_info.get(col, {}).get(proto.headline, _mean(scores[col]))}
        bench_scores = {c: {"mean": _mean(scores[c]), **groups_info.get(c, {})} for c in columns}
    else:
        headline = {"mean": _mean(scores[columns[0]])}
        bench_scores = {c: {"mean": _mean(scores[c]), **groups_info.get(c, {})} for c in columns}
    config = {k: v for k, v in asdict(cfg).items() if k not in ("name",)}
    config.update(gen)
    config["num_prompts"] = len({it.prompt_idx for it in needed})
    summary = {
        "label": label,
        "benchmark": proto.name,
        "protocol": asdict(proto),
        "headline": headline,
        "scores": bench_scores,
        "config": config,
        "rewards": summarize(scores),
        "reward_columns": reward_columns,
        "n_images": len(needed),
        "generated": made,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def summary_markdown(summary: dict) -> str:
    name = summary["benchmark"]
    lines = [f"# {name}: {summary['label']}", "",
             f"{summary['n_images']} images of {summary['config']['num_prompts']} prompts; "
             f"model `{summary['config']['model']}`" + (f", LoRA `{summary['config']['lora']}`" if summary["config"].get("lora") else ""),
             "", "Protocol: " + summary["protocol"]["source"], ""]
    for k, v in summary["headline"].items():
        lines.append(f"**{k}: {v:.4f}**")
    lines += ["", "| score | mean [95% CI] | n |", "|---|---|---|"]
    for c in summary["reward_columns"]:
        s = summary["rewards"][c]
        lines.append(f"| {c} | {s['mean']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}] | {s['n']} |")
    lines.append("")
    return "\n".join(lines)
