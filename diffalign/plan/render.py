"""Plans as text: one plan's breakdown, and the Markdown page of every packaged recipe
(``docs/memory_plans.md``, ``diffalign plan --all``). A plain pipe table, written with f-strings."""

from __future__ import annotations

from .estimate import COLUMNS, GiB, MemoryPlan, plan_recipe


def _g(n: float) -> str:
    """GiB with one decimal; a nonzero amount under 0.05 GiB is ``<0.1``, not ``0.0``."""
    return "<0.1" if 0 < n < 0.05 * GiB else f"{n / GiB:.1f}"


def verdict(plan: MemoryPlan) -> str:
    mem = f"{plan.gpu_mem_gib:g} GiB"
    if plan.fits:
        return f"fits {mem} with {plan.headroom_gib:.1f} GiB headroom"
    return f"does NOT fit {mem}: {-plan.headroom_gib:.1f} GiB over"


def describe(plan: MemoryPlan) -> str:
    """One plan as a breakdown: every term with its count x bytes, column totals, the verdict."""
    kind = (f"LoRA ({plan.trainable_params:,} trainable params in {plan.lora_layers} layers)" if plan.lora_layers
            else f"full fine-tuning ({plan.trainable_params:,} trainable params)")
    lines = [f"{plan.label}: {plan.method} on {plan.model}, {kind}",
             f"  {plan.gpus} GPU(s), {plan.sharding.upper()} ({plan.sharding_source}); GiB per process",
             ""]
    width = max(len(p.what) for p in plan.parts)
    for column in (*COLUMNS, "overhead"):
        parts = [p for p in plan.parts if p.column == column]
        if not parts:
            continue
        lines.append(f"  {column:<12} {_g(plan.column(column)):>7}")
        for p in parts:
            lines.append(f"    {p.what:<{width}}  {_g(p.bytes):>7}  {p.formula}")
    lines += ["", f"  total        {_g(plan.total):>7} GiB per GPU: {verdict(plan)}"]
    if plan.notes:
        lines += [""] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


def table(plans: list[MemoryPlan]) -> str:
    """The Markdown table: one row per plan, GiB per process."""
    mem = {f"{p.gpu_mem_gib:g}" for p in plans}
    fits = f"fits {mem.pop()} GiB?" if len(mem) == 1 else "fits?"
    head = ["recipe", "GPUs", "weights", "trainable", "grads", "optimizer", "activations", "total per GPU", fits]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * 7 + [":--"]) + "|"]
    for p in plans:
        shard = "" if p.sharding == "ddp" else f" {p.sharding.upper()}"
        ok = f"yes ({p.headroom_gib:.1f} free)" if p.fits else f"**no** ({-p.headroom_gib:.1f} over)"
        cells = [f"`{p.label}`", f"{p.gpus}{shard}", *(_g(p.column(c)) for c in COLUMNS), _g(p.total), ok]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def all_recipe_plans(gpu_mem_gib: float = 80.0, gpus: int | None = None, sharded: bool | None = None) -> list[MemoryPlan]:
    from ..recipes import recipe_names

    return [plan_recipe(name, gpus=gpus, gpu_mem_gib=gpu_mem_gib, sharded=sharded) for name in recipe_names()]


INTRO = """\
# Memory plans

GPU memory per training process of every packaged recipe, in GiB (2^30 bytes), at the GPU count and
sharding its launch line names (FSDP only where the recipe launches with `accelerate/fsdp`; otherwise
DDP, which replicates). Written by `python scripts/memory_plans.py`; `diffalign plan --all` prints the
same page, and `diffalign plan RECIPE [key=value ...] [--gpus N] [--gpu-mem 80] [--sharded]` breaks one
plan down term by term.

No weights, hub or GPU are involved: the components' `config.json` fields are packaged in
`diffalign/configs/model_shapes/` (each file names the hub repo and file it copies), the modules are
built on PyTorch's meta device and counted (`scripts/model_shape_counts.py` writes the counts to
`model_shapes/counts.json`).

## What is counted

| column | per process | exact or estimated |
|---|---|---|
| weights | every frozen component on the GPU in the run's dtype (2 B under bf16/fp16 mixed precision): the denoiser's frozen base under LoRA, the VAE and text encoders (not for a pair run that trains from the latent cache: they are released first), the reward models of online methods (fp32), a frozen reference copy of the denoiser for full fine-tuning with a reference (DPO, a KL term; under LoRA the reference is the same network with its adapters disabled), fp32 copies of the trainable parameters for an EMA, DiffusionNFT's old policy and AWM's EMA-KL anchor | exact counts |
| trainable | the trainable parameters' fp32 master weights (LoRA: r x (in + out) summed over the adapted Linear layers of the recipe's `lora.target_modules`, or the family's default targets; `lora.rank: 0`: the whole denoiser), plus under mixed precision the 16-bit working copies autocast makes (2 B a parameter; under FSDP two all-gathered blocks instead) | exact counts |
| grads | fp32 gradients, 4 B a trainable parameter; with DDP on more than one GPU another 4 B for DDP's gradient buckets | exact counts |
| optimizer | AdamW's two fp32 moments, 8 B a trainable parameter (2 B with `optim.use_8bit_adam`) | exact counts |
| activations | the largest of: the training forward + backward, a no-grad denoiser forward (the reference pass, a rollout), the VAE at full resolution; online methods add the step's stored trajectories | estimated |

FSDP (full shard) divides the denoiser's weights, trainable weights, EMA copies, gradients and
optimizer states by the GPU count and adds two all-gathered blocks; a launch line with
`accelerate/deepspeed_zero2` divides gradients and optimizer states; `--sharded` plans FSDP and
`--no-sharded` DDP whatever the recipe says. The total adds 1 GiB for the CUDA context and library
workspaces. Parameter counts are exact for the configs packaged (built from them, no weights); the
bytes per parameter follow the trainers' dtypes; activations are an estimate.

Checks against known numbers (`tests/test_plan.py`): the SD1.5 UNet built from its shape config has
859,520,964 parameters; Qwen-Image's LoRA r64 on 12 projections x 60 blocks is 424,673,280 parameters
(6.8 GB with fp32 weights, gradients and AdamW); MaPO's full SDXL UNet with fp32 gradients and 8-bit
Adam is 25.7 GB before activations (+1.8 GB of bf16 encoders); FLUX.1-dev's transformer, T5-XXL,
CLIP-L and VAE in fp32 are 67.5 GB.

**Activations.** Per sample, the bytes autograd saves in one training forward of the denoiser are
measured on the meta device at three (UNets: two) sizes and fitted by `a + b x latent_pixels`
(UNets) or `a + b x image_tokens + c x text_tokens` (DiTs; within 1% of a fourth probe; image tokens =
(resolution / 16)^2, text tokens = 77 (UNets), 77 + T5's `max_sequence_length` (SD3),
`max_sequence_length` (FLUX, Qwen-Image)). Attention is counted as a fused SDPA kernel saves it
(q, k, v, the output and an fp32 log-sum-exp; never the score matrix). Without gradient
checkpointing a sample costs `S` = everything saved; with it `S_outside + I_units + max_u S_u`: what
is saved outside the checkpointed blocks, the blocks' stored inputs, and one block recomputed during
the backward. Rows per training forward: 2 x `batch_size` for pair methods (chosen and rejected in
one forward), `train_batch_size` (x 2 with CFG) for online ones. A no-grad forward (a rollout at
`batch_size` x (2 with CFG) rows, a pair method's reference pass) costs `rows x P`, `P` the peak of
live bytes of one sample's no-grad forward on the meta device (every allocation counted until it is
garbage collected); the VAE at full resolution (a pair run without the latent cache encodes its
images, an online run decodes a rollout batch) `images x H x W x p`, `p` its measured peak bytes per
pixel in bf16 (with `reward_threads > 0` an online run decodes one batch on the reward thread while
the next one samples: the two add up). Terms are summed: with gradient accumulation (every recipe here
accumulates) the gradients live through the next micro-batch's forward. Not counted: the allocator's
fragmentation and cache, evaluation batches (`eval.batch_size`), text-encoder and reward forwards
(no grad, small), optimizer temporaries.
"""


def memory_plans_markdown(gpu_mem_gib: float = 80.0, gpus: int | None = None, sharded: bool | None = None) -> str:
    """The whole ``docs/memory_plans.md`` page: the method, the table, every plan's breakdown
    (``gpus``/``sharded``: as :func:`.estimate.plan_recipe`, for every recipe)."""
    plans = all_recipe_plans(gpu_mem_gib, gpus, sharded)
    out = [INTRO, "## The recipes", "", table(plans), "", "## Breakdowns", ""]
    for p in plans:
        out += [f"### {p.label}", "", "```text", describe(p), "```", ""]
    return "\n".join(out)


__all__ = ["all_recipe_plans", "describe", "memory_plans_markdown", "table", "verdict"]
