"""Fine-tune a CLIP-style reward model on preference pairs with the PickScore objective.

PickScore (Kirstain et al. 2023, Sec. 4): for a prompt ``x`` and images ``y0, y1`` with human
preference distribution ``p = (label_0, label_1)`` (ties are ``(0.5, 0.5)``), the model scores
``s_i = logit_scale.exp() * cos(E_T(x), E_I(y_i))`` and minimises the KL divergence between
``p`` and ``softmax(s0, s1)`` -- i.e. the cross-entropy ``-sum_i p_i log softmax(s)_i``.

The model is a transformers ``CLIPModel`` directory or hub id; the result is saved as one
(``config.json``, ``model.safetensors``, processor and tokenizer files), so it loads directly
as ``--reward pickscore=OUTPUT_DIR``. Validation reports pairwise accuracy with the tie
convention of :mod:`diffalign.rewards.pairs`.

Images are preprocessed by the same torch code the ``pickscore`` reward uses, so training and
scoring see identical pixels.

A training loop, so it lives with the trainers and shares their pieces: the guarded optimizer
step and NaN/inf policy (:mod:`diffalign.optim_step`, through :class:`~diffalign.optim_step.SingleProcess`:
one device, plain torch), the precision names (:func:`.common.precision_dtype`), the step timer
(:class:`.common.Timer`) and the config checks (:func:`diffalign.config.check`). It keeps its own
optimizer, warmup and outputs (a transformers ``CLIPModel`` directory and ``metrics.json``), which
differ from the diffusion trainers' (see :func:`train_reward`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import check, deep_merge, from_dict, load_yaml, option, parse_overrides, save_config
from ..errors import UserError
from ..files import fix_safetensors_modes
from ..optim_step import SingleProcess, count_nonfinite, guarded_backward, guarded_step
from ..rewards.pairs import describe_accuracy, iter_pair_batches, pairwise_accuracy
from .common import Timer, precision_dtype


@dataclass
class RewardTrainConfig:
    """``diffalign train-reward`` configuration (YAML + ``key=value`` overrides).

    Defaults follow PickScore's recipe where it is published (CLIP-H init, lr 3e-6, 500 warmup
    steps, 4000 steps); ``batch_size`` is per step (PickScore used 128 pairs, accumulate to
    match).
    """

    model: str = option("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", help="CLIPModel dir or hub id to start from")
    processor: str | None = option(None, help="image processor + tokenizer source; default: model")
    data: str | None = option(None, help="Pick-a-Pic-schema parquet file or directory")
    val_data: str | None = option(None, help="held-out pairs; default: val_fraction of data")
    val_fraction: float = option(0.05, help=(
        "fraction of data's pairs held out for validation (a fixed hash of the row index: the same "
        "split in every run) when val_data is null"))
    max_val_pairs: int = option(2000, help="validation pairs decoded and kept in memory")
    output_dir: str = option("outputs/reward", help="where the trained CLIP model, its processor and metrics.json are written")
    max_steps: int = option(4000, help="optimizer steps (PickScore: 4000)")
    batch_size: int = option(8, help="pairs per step (PickScore used 128: accumulate to match)")
    gradient_accumulation_steps: int = option(1, help="micro-batches whose gradients are summed before each optimizer step")
    learning_rate: float = option(3e-6, help="AdamW learning rate after warm-up (PickScore: 3e-6)")
    weight_decay: float = option(0.3, help="AdamW weight decay, not applied to 1-D parameters or the logit scale (PickScore: 0.3)")
    warmup_steps: int = option(500, help="linear warm-up min(1, (step + 1) / warmup_steps) (PickScore: 500)")
    max_grad_norm: float = option(1.0, help="clip the gradient norm to this (<= 0: no clipping)")
    max_nonfinite_steps: int = option(5, help=(
        "a NaN/inf loss or gradient skips the step; abort after this many in a row"
    ))
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.98, help="AdamW beta2 (PickScore: 0.98)")
    adam_epsilon: float = option(1e-6, help="AdamW epsilon (PickScore: 1e-6)")
    train_logit_scale: bool = option(False, help="PickScore keeps CLIP's temperature fixed by default")
    drop_ties: bool = option(False, help="ties are (0.5, 0.5) targets unless dropped")
    mixed_precision: str = option("no", help="no | bf16 | fp16 (CUDA autocast)")
    shuffle_buffer: int = option(1000, help="pairs in the streaming shuffle buffer")
    eval_every: int = option(500, help="steps between validation accuracy measurements (and at the last step)")
    log_every: int = option(10, help="steps between printed training-loss lines")
    seed: int = option(0, help="seed of the data order (shuffle buffer) and of torch and numpy")
    device: str | None = option(None, help="torch device to train on; null: cuda when available, else cpu")

    def validate(self) -> None:
        check(bool(self.data), "data", "is required (a Pick-a-Pic-schema parquet file or directory)")
        check(self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "must be no, bf16 or fp16")
        check(self.eval_every >= 1, "eval_every", "must be >= 1")
        check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        check(self.val_data is not None or self.val_fraction > 0, "val_fraction",
              "must be > 0 when val_data is not given (validation needs pairs)")


def load_train_config(path: str | None, overrides: list[str] | None = None) -> RewardTrainConfig:
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RewardTrainConfig, data)
    cfg.validate()
    return cfg


def _is_val(row: int, fraction: float) -> bool:
    # A fixed hash of the row index: the same split on every pass and run.
    return ((row * 2654435761) % 2**32) / 2**32 < fraction


Pair = tuple[str, torch.Tensor, torch.Tensor, float, float]


def _pairs(path: str, keep, drop_ties: bool, bad_counter: list) -> Iterator[Pair]:
    for pb in iter_pair_batches(path, batch_rows=64):
        bad_counter.extend(pb.bad)
        for j, row in enumerate(pb.rows):
            l0, l1 = float(pb.label_0[j]), float(pb.label_1[j])
            if l0 + l1 <= 0 or (drop_ties and l0 == l1) or not keep(int(row)):
                continue
            yield pb.captions[j], pb.images_0[j], pb.images_1[j], l0, l1


def _train_stream(cfg: RewardTrainConfig, rng: random.Random, bad: list) -> Iterator[Pair]:
    keep = (lambda r: True) if cfg.val_data else (lambda r: not _is_val(r, cfg.val_fraction))
    buffer: list[Pair] = []
    epoch = 0
    while True:
        n = 0
        for pair in _pairs(cfg.data, keep, cfg.drop_ties, bad if epoch == 0 else []):
            n += 1
            buffer.append(pair)
            if len(buffer) >= cfg.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        if n == 0 and epoch == 0:
            raise UserError(f"train-reward: no usable training pairs in '{cfg.data}'")
        epoch += 1
        rng.shuffle(buffer)  # end of a pass: flush (small datasets never fill the buffer)
        while buffer:
            yield buffer.pop()


def pickscore_loss(logit_scale: torch.Tensor, text: torch.Tensor, img0: torch.Tensor, img1: torch.Tensor,
                   label_0: torch.Tensor, label_1: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the label distribution and ``softmax(scale*cos0, scale*cos1)``
    (embeddings L2-normalised)."""
    logits = logit_scale * torch.stack([(text * img0).sum(-1), (text * img1).sum(-1)], dim=-1)
    target = torch.stack([label_0, label_1], dim=-1)
    target = target / target.sum(-1, keepdim=True)
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def train_reward(cfg: RewardTrainConfig, log=print) -> dict:
    """Train; returns metrics (``val_accuracy_initial``, ``val_accuracy``, ``history``).

    Not the diffusion trainers' :func:`.common.make_optimizer`: CLIP fine-tuning keeps weight decay
    off parameters of under 2 dims (biases, norms, ``logit_scale``: two groups), and warms up as
    ``min(1, (step + 1) / warmup_steps)`` (diffusers' ``constant_with_warmup`` starts at 0). No
    accelerate, checkpoints, output-dir lock or ``metrics.jsonl`` either: one process on one
    device, the model saved once at the end."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from ..rewards.base import default_device
    from ..rewards.clip import CLIPEmbedder
    from ..rewards.weights import load_pretrained

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = torch.device(cfg.device) if cfg.device else default_device()
    embedder = CLIPEmbedder.from_pretrained(cfg.model, cfg.processor, device, torch.float32, what="train-reward",
                                            local_hint="model=/path/to/clip_dir", trainable=True)
    model = embedder.model
    model.train()
    if not cfg.train_logit_scale:
        model.logit_scale.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    amp_dtype = precision_dtype(cfg.mixed_precision)  # float32 for "no"
    use_amp = cfg.mixed_precision != "no" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    # Validation pairs are decoded once and kept in memory (max_val_pairs of them).
    bad: list = []
    val_source = cfg.val_data or cfg.data
    val_keep = (lambda r: True) if cfg.val_data else (lambda r: _is_val(r, cfg.val_fraction))
    val_pairs: list[Pair] = []
    for pair in _pairs(val_source, val_keep, False, bad if cfg.val_data else []):
        val_pairs.append(pair)
        if len(val_pairs) >= cfg.max_val_pairs:
            break
    if not val_pairs:
        raise UserError(f"train-reward: no validation pairs in '{val_source}' (set val_data or val_fraction)")

    def evaluate() -> dict:
        model.eval()
        s0s, s1s = [], []
        with torch.inference_mode():
            for i in range(0, len(val_pairs), max(cfg.batch_size, 16)):
                chunk = val_pairs[i:i + max(cfg.batch_size, 16)]
                caps = [c for c, *_ in chunk]
                txt = embedder.text_embeds(caps)
                img = embedder.image_embeds([p[1] for p in chunk] + [p[2] for p in chunk])
                scale = embedder.logit_scale
                s0s.append((scale * (txt * img[: len(chunk)]).sum(-1)).cpu().numpy())
                s1s.append((scale * (txt * img[len(chunk):]).sum(-1)).cpu().numpy())
        model.train()
        l0 = np.array([p[3] for p in val_pairs])
        l1 = np.array([p[4] for p in val_pairs])
        return pairwise_accuracy(np.concatenate(s0s), np.concatenate(s1s), l0, l1)

    initial = evaluate()
    log(f"train-reward: {len(val_pairs)} validation pairs; initial {describe_accuracy(initial)}")
    history = [{"step": 0, **initial}]
    stream = _train_stream(cfg, rng, bad)
    timer = Timer()
    running = 0.0
    stepper = SingleProcess(opt, scaler)  # one NaN policy with the diffusion trainers (optim_step)
    nonfinite_in_a_row = skipped_total = 0
    for step in range(1, cfg.max_steps + 1):
        losses: list[float] = []

        def backward() -> bool:
            finite = True
            for _ in range(cfg.gradient_accumulation_steps):
                batch = [next(stream) for _ in range(cfg.batch_size)]
                caps = [b[0] for b in batch]
                l0 = torch.tensor([b[3] for b in batch], device=device)
                l1 = torch.tensor([b[4] for b in batch], device=device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    txt = embedder.text_embeds(caps)
                    img = embedder.image_embeds([b[1] for b in batch] + [b[2] for b in batch])
                    loss = pickscore_loss(model.logit_scale.exp().float(), txt, img[: len(batch)], img[len(batch):], l0, l1)
                loss = loss / cfg.gradient_accumulation_steps
                finite = finite and guarded_backward(stepper, loss)
                losses.append(float(loss.detach()))
            return finite

        skipped, _ = guarded_step(stepper, backward, params, stepper.optimizer, sched, cfg.max_grad_norm)
        step_loss = sum(losses)
        skipped_total += int(skipped)
        nonfinite_in_a_row = count_nonfinite(nonfinite_in_a_row, skipped, cfg.max_nonfinite_steps, "train-reward steps",
                                             f"last: step {step}, loss {step_loss}; try a lower learning_rate or "
                                             "mixed_precision=no/bf16")
        if skipped:
            log(f"step {step}: optimizer step skipped (loss {step_loss:.4g} or its gradient is not finite)")
        else:
            running += step_loss
        if step % cfg.log_every == 0:
            log(f"step {step}/{cfg.max_steps} loss {running / cfg.log_every:.4f} lr {sched.get_last_lr()[0]:.2e}")
            running = 0.0
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            m = evaluate()
            history.append({"step": step, **m})
            log(f"step {step}: validation {describe_accuracy(m)}")
    seconds = timer.lap()

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    proc_src = cfg.processor or cfg.model
    load_pretrained(CLIPImageProcessor.from_pretrained, proc_src, "train-reward", "processor=/path").save_pretrained(str(out))
    load_pretrained(AutoTokenizer.from_pretrained, proc_src, "train-reward", "processor=/path").save_pretrained(str(out))
    save_config(cfg, out / "train_reward_config.yaml")
    fix_safetensors_modes(out)
    metrics = {
        "val_accuracy_initial": initial["accuracy"],
        "val_accuracy": history[-1]["accuracy"],
        "val_accuracy_strict": history[-1]["accuracy_strict"],
        "val_pairs": len(val_pairs),
        "skipped_rows": len(bad),
        "nonfinite_skipped": skipped_total,
        "steps": cfg.max_steps,
        "seconds": seconds,
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if bad:
        log(f"train-reward: skipped {len(bad)} row(s) with undecodable images or missing labels")
    log(f"train-reward: saved to {out} (use --reward pickscore={out})")
    return metrics
