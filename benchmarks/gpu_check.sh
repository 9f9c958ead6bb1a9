#!/usr/bin/env bash
# The first-GPU-run checks and measurements, as one prepared command for a lent GPU (`device` tool:
# run it from the repository root; results land in $OUT, default gpu_check/). Each section prints one
# "gpu_check: <name> ok|FAIL ..." line and one "gpu_check: seconds <name> N" line; gpu_check.json
# collects the numbers and gpu_check.md holds them as benchmarks/RESULTS.md tables.
#
# Checks (issue #30, items 1-4 and 9), tiny models, no hub: CPU CI covers the same paths with
# stand-ins (tests/test_grpo_multigpu.py, test_bf16_paths.py, test_cache_build.py); this runs them on
# CUDA kernels.
# Measurements (issue #27, item 5): full-size architectures with random weights (no download), bf16:
#   bench_pair_dpo         SD1.5 UNet (full fine-tune) DPO step at 512 px, 4 pairs, latent cache on,
#                          SDPA and xformers if installed: pairs/s, peak memory, MFU (FlopCounterMode
#                          FLOPs of one step / step seconds / the card's dense bf16 peak, by device
#                          name; an unknown card: no MFU) -- benchmarks/pair_step.py
#   bench_pair_vs_example  the same UNet with LoRA r8 from pixels (cache off): our step beside the step
#                          of diffusers' DPO example, written from its published loss
#                          (pair_step.example_dpo_step; the script is not in the diffusers wheel and the
#                          GPU box has no network): ratio of pairs/s and peak memory
#   bench_grpo_sd35m       SD3.5-Medium-shaped transformer, LoRA r32, Flow-GRPO step at 512 px (CFG,
#                          10 steps, 2 prompts x 4 images, one rollout batch per prompt)
#   bench_grpo_flux        FLUX.1-dev-shaped transformer (12B), LoRA r64, Flow-GRPO step at 1024 px (6
#                          steps, 1 prompt x 4 images), gradient checkpointing: rollout images/s,
#                          update (train) seconds -- benchmarks/grpo_step.py, the trainer's own loop
#   fsdp_one_gpu           the packaged accelerate/fsdp.yaml with one process (SD3 tiny, full
#                          fine-tune, 2 steps): a smoke test that accelerate shards (final_state.json)
# The real run is sized for <= 8 minutes on an H100/H200: each section runs under `timeout` (its own
# limit, and none past START + GPU_CHECK_BUDGET_S = 460 s: a section left without time is skipped
# and reported FAIL); the seconds of every section are printed. The sizes are estimates: no GPU has
# run this yet. --dry-run
# runs every command on the CPU with tiny shapes (tiny models, 1-block architectures at 32-64 px, FSDP
# through tests/fsdp_on_cpu.py), so the script is known to work before a GPU is there to run it
# (tests/test_gpu_check.py).
#   bash benchmarks/gpu_check.sh            # needs a CUDA GPU; installs the package into .venv-gpu
#   bash benchmarks/gpu_check.sh --dry-run  # the same commands on the CPU (bf16 autocast): the script works
set -uo pipefail
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
if [ "$DRY_RUN" = 1 ]; then
  python3 -c "import diffalign" || exit 1
  echo "gpu_check: dry run on the CPU"
else
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    python3 -m venv .venv-gpu && . .venv-gpu/bin/activate && pip install -q -e '.[test,rewards]' || exit 1
  fi
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('gpu_check:', torch.cuda.get_device_name(0))" || exit 1
fi
START=$SECONDS
W="$OUT/work"; mkdir -p "$W"
diffalign -q tiny-model sd15 "$W/sd15" && diffalign -q tiny-model sd3 "$W/sd3" && diffalign -q tiny-model pickscore "$W/ps" \
  && diffalign -q toy-data pickapic "$W/pairs" --n 32 || exit 1
status=0
: >"$OUT/seconds.tsv"
check() {  # check NAME CMD...: one line per check, the command's output kept in $OUT/NAME.log
  local name="$1"; shift
  local t0=$SECONDS rc
  "$@" >"$OUT/$name.log" 2>&1; rc=$?
  if [ $rc = 0 ]; then echo "gpu_check: $name ok"
  elif [ $rc = 124 ]; then echo "gpu_check: $name FAIL (timed out, see $OUT/$name.log)"; status=1
  else echo "gpu_check: $name FAIL (see $OUT/$name.log)"; status=1; fi
  echo "gpu_check: seconds $name $((SECONDS - t0))"
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$rc" >>"$OUT/seconds.tsv"
}
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-460}))  # the real run: every section ends by then (8 minutes in all)
limit() {  # limit SECONDS CMD...: the real run bounds each section by SECONDS and by DEADLINE; the dry run does not
  local own="$1"; shift
  if [ "$DRY_RUN" = 1 ]; then "$@"; return; fi
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then echo "no time left in the ${GPU_CHECK_BUDGET_S:-460} s budget: skipped"; return 124; fi
  timeout "$(( own < left ? own : left ))" "$@"
}
# item 2: full fine-tuning with a bf16 reference, on the GPU's bf16 kernels
check item2_full_ft_bf16 limit 90 diffalign -q train tiny/dpo model="$W/sd15" data="$W/pairs" output_dir="$W/dpo_full" \
  max_steps=3 lora.rank=0 mixed_precision=bf16
# item 3: the cache build loads no denoiser and stores bf16 moments
check item3_cache_bf16 limit 60 diffalign -q cache tiny/dpo model="$W/sd3" data="$W/pairs" mixed_precision=bf16 \
  data_opts.cache_dtype=bfloat16 data_opts.cache_dir="$W/cache"
# items 1, 4 and 9: GRPO on PickScore (a reward model that must sit on cuda:0), chunked evaluation,
# and the bf16 log-prob gap between rollout (8 rows) and training (3 rows) forwards, with and without
# loss.recompute_old_logprob
for recompute in false true; do
  check "item1_4_9_grpo_recompute_$recompute" limit 90 diffalign -q train tiny/grpo model="$W/sd3" output_dir="$W/grpo_$recompute" \
    max_steps=3 mixed_precision=bf16 train_batch_size=3 loss.recompute_old_logprob=$recompute \
    "rewards=[{name: pickscore, args: {path: $W/ps}}]" eval.every=1 eval.num_prompts=8 eval.batch_size=3
done

# ---- item 5 of issue #27: measurements on full-size architectures (random weights, bf16)
# the sizes of the real run follow the recipes sd35-flow-grpo-pickscore and flux1-dev-flow-grpo-pickscore
# (LoRA rank, T5 tokens, checkpointing, steps, CFG), with fewer images per step and FLUX at 1024 px
if [ "$DRY_RUN" = 1 ]; then
  PAIR=(--arch tiny-sd15 --resolution 32 --batch 2 --steps 1 --warmup 0)
  SD35=(--arch sd35m --layers 1)
  SD35_SET=(sampler.resolution=64 sampler.num_steps=2 batch_size=4 group_size=2 prompts_per_step=2
            train_batch_size=4 lora.rank=4 model_opts.max_sequence_length=16 model_opts.gradient_checkpointing=true)
  FLUX=(--arch flux --layers 1)
  FLUX_SET=(sampler.resolution=64 sampler.num_steps=2 batch_size=2 group_size=2 prompts_per_step=1
            train_batch_size=2 lora.rank=4 sampler.cfg=false model_opts.max_sequence_length=16
            model_opts.gradient_checkpointing=true)
else
  PAIR=(--arch sd15 --resolution 512 --batch 4 --steps 5 --warmup 2)
  SD35=(--arch sd35m)
  SD35_SET=(sampler.resolution=512 sampler.num_steps=10 batch_size=4 group_size=4 prompts_per_step=2
            train_batch_size=8 lora.rank=32 model_opts.max_sequence_length=128 model_opts.gradient_checkpointing=true)
  FLUX=(--arch flux)
  FLUX_SET=(sampler.resolution=1024 sampler.num_steps=6 batch_size=4 group_size=4 prompts_per_step=1
            train_batch_size=2 lora.rank=64 sampler.cfg=false model_opts.max_sequence_length=512
            model_opts.gradient_checkpointing=true)
fi
ATTENTION=(sdpa)
if [ "$DRY_RUN" = 1 ]; then
  echo "xformers: not run in the dry run (xformers has no CPU kernels): SDPA only" >"$OUT/xformers.txt"
elif python3 -c "import xformers.ops" 2>/dev/null; then
  ATTENTION+=(xformers)
  python3 -c "import xformers; print('xformers', xformers.__version__, 'installed: SDPA and xformers')" >"$OUT/xformers.txt"
else
  echo "xformers: not installed (pip install 'diffalign[xformers]'): SDPA only" >"$OUT/xformers.txt"
fi
echo "gpu_check: $(cat "$OUT/xformers.txt")"
check bench_pair_dpo limit 150 python3 benchmarks/pair_step.py "${PAIR[@]}" --dtype bf16 --methods dpo \
  --attention "${ATTENTION[@]}" --checkpointing off --cache on --json "$OUT/pair_dpo.json"
check bench_pair_vs_example limit 110 python3 benchmarks/pair_step.py "${PAIR[@]}" --dtype bf16 --lora 8 \
  --methods dpo diffusers_example --attention sdpa --checkpointing off --cache off --json "$OUT/pair_vs_example.json"
check bench_grpo_sd35m limit 110 python3 benchmarks/grpo_step.py "${SD35[@]}" --configs grpo --steps 2 \
  --set mixed_precision=bf16 "${SD35_SET[@]}" --json "$OUT/grpo_sd35m.json"
check bench_grpo_flux limit 180 python3 benchmarks/grpo_step.py "${FLUX[@]}" --configs grpo --steps 2 \
  --set mixed_precision=bf16 "${FLUX_SET[@]}" --json "$OUT/grpo_flux.json"

# FSDP on one GPU: the packaged fsdp.yaml with one process (on the CPU: tests/fsdp_on_cpu.py lets
# accelerate take FSDP there, as tests/test_scale_out.py does)
fsdp_smoke() {
  local target=(-m diffalign.cli) mp=bf16
  if [ "$DRY_RUN" = 1 ]; then target=(tests/fsdp_on_cpu.py); mp=no; fi
  python3 - "$W/fsdp1.yaml" "$DRY_RUN" <<'PY' || return 1
import sys
from pathlib import Path

import yaml

import diffalign

cfg = yaml.safe_load((Path(diffalign.__file__).parent / "configs/accelerate/fsdp.yaml").read_text())
cfg["num_processes"] = 1
if sys.argv[2] == "1":
    cfg.update(use_cpu=True, mixed_precision="no")
Path(sys.argv[1]).write_text(yaml.safe_dump(cfg))
PY
  limit 90 python3 -m accelerate.commands.launch --config_file "$W/fsdp1.yaml" --main_process_port 29561 "${target[@]}" \
    train tiny/dpo model="$W/sd3" data="$W/pairs" output_dir="$W/fsdp" max_steps=2 lora.rank=0 batch_size=1 \
    mixed_precision=$mp || return 1
  python3 - "$W/fsdp/final_state.json" <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
print("final_state:", {k: s.get(k) for k in ("distributed_type", "parameters", "sharded_parameters", "fsdp_units")})
assert s["distributed_type"] == "FSDP" and s.get("sharded_parameters") == s["parameters"] > 0, s
PY
}
check fsdp_one_gpu fsdp_smoke
echo "gpu_check: seconds total $((SECONDS - START))"

python3 - "$OUT" "$W" "$DRY_RUN" <<'PY'
import datetime
import json
import sys
from pathlib import Path

out, w, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
res = {}
for on in ("false", "true"):
    f = w / f"grpo_{on}" / "metrics.jsonl"
    if f.is_file():
        rows = [json.loads(l) for l in f.read_text().splitlines()]
        res[f"recompute_{on}"] = {k: [r.get(k) for r in rows] for k in
                                 ("logprob_mismatch", "first_update_max_log_ratio", "clip_fraction", "eval_reward_mean")}


def load(name):
    return json.loads((out / name).read_text()) if (out / name).is_file() else None


res["pair_dpo"], res["pair_vs_example"] = load("pair_dpo.json"), load("pair_vs_example.json")
res["grpo_sd35m"], res["grpo_flux"] = load("grpo_sd35m.json"), load("grpo_flux.json")
res["xformers"] = (out / "xformers.txt").read_text().strip()
vs = {r["method"]: r for r in res["pair_vs_example"] or []}
if "dpo" in vs and "diffusers_example" in vs:
    ours, ex = vs["dpo"], vs["diffusers_example"]
    res["ratio_vs_diffusers_example"] = {"pairs_per_second": round(ours["pairs_per_second"] / ex["pairs_per_second"], 3)}
    if ours.get("peak_memory_gib") and ex.get("peak_memory_gib"):
        res["ratio_vs_diffusers_example"]["peak_memory"] = round(ours["peak_memory_gib"] / ex["peak_memory_gib"], 3)
sections = [line.split("\t") for line in (out / "seconds.tsv").read_text().splitlines() if line]
res["seconds"] = {name: int(sec) for name, sec, _ in sections}
res["dry_run"] = dry
(out / "gpu_check.json").write_text(json.dumps(res, indent=2))


def table(rows, keys):  # a Markdown table of the keys any row has
    rows = [r for r in rows or [] if r]
    if not rows:
        return "(no rows: see the section's log)\n"
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


rows_with_device = (res["pair_dpo"] or []) + (res["grpo_flux"] or [])
device = next((r["device"] for r in rows_with_device if r.get("device")), "?")
pair_keys = ["method", "attention", "lora", "cache", "resolution", "batch_pairs", "step_seconds", "pairs_per_second",
             "peak_memory_gib", "peak_rss_gib", "tflops_per_s", "mfu", "flops_from"]
grpo_keys = ["model", "resolution", "num_steps", "lora_rank", "images_per_step", "rollout_images_per_second",
             "rollout_seconds", "train_seconds", "transitions", "peak_memory_gib", "logprob_mismatch"]
title = "gpu_check (dry run: CPU, tiny shapes, not a measurement)" if dry else "gpu_check"
md = [f"## {title} — {device}, {datetime.date.today().isoformat()}\n",
      "```bash\nbash benchmarks/gpu_check.sh" + (" --dry-run" if dry else "") + "\n```\n",
      "Full-size architectures with random weights, bf16. MFU: FlopCounterMode FLOPs of one step / step "
      "seconds / the card's dense bf16 peak (`pair_step.peak_bf16_tflops`); xformers rows use the SDPA row's FLOPs.",
      f"{res['xformers']}.\n",
      "### SD1.5 UNet DPO step (full fine-tune, latent cache on)\n", table(res["pair_dpo"], pair_keys),
      "### Beside the diffusers DPO example's step (LoRA r8, from pixels; `pair_step.example_dpo_step`)\n",
      table(res["pair_vs_example"], pair_keys),
      f"ours / example: {json.dumps(res.get('ratio_vs_diffusers_example', 'n/a'))}\n",
      "### LoRA Flow-GRPO step (`grpo_step.py`, one warm-up step, then one timed)\n",
      table((res["grpo_sd35m"] or []) + (res["grpo_flux"] or []), grpo_keys),
      "### Seconds per section\n",
      table([{"section": n, "seconds": s, "exit": rc} for n, s, rc in sections], ["section", "seconds", "exit"])]
(out / "gpu_check.md").write_text("\n".join(md))
print("gpu_check:", json.dumps({k: v for k, v in res.items() if k.startswith("recompute")}))
print("gpu_check: wrote", out / "gpu_check.json", "and", out / "gpu_check.md")
PY
exit $status
