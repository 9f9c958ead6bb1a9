#!/usr/bin/env bash
# The first-GPU-run checks of issue #30, items 1-4 and 9, as one prepared command for a lent GPU
# (`device` tool: run it from the repository root; results land in $OUT, default gpu_check/).
# Tiny models only: no hub, minutes. Each check prints one "gpu_check: <item> ok|FAIL ..." line and
# gpu_check.json collects the numbers. CPU CI covers the same paths with stand-ins (tests/
# test_grpo_multigpu.py, test_bf16_paths.py, test_cache_build.py); this runs them on CUDA kernels.
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
W="$OUT/work"; mkdir -p "$W"
diffalign -q tiny-model sd15 "$W/sd15" && diffalign -q tiny-model sd3 "$W/sd3" && diffalign -q tiny-model pickscore "$W/ps" \
  && diffalign -q toy-data pickapic "$W/pairs" --n 32 || exit 1
status=0
check() {  # check NAME CMD...: one line per check, the command's output kept in $OUT/NAME.log
  local name="$1"; shift
  if "$@" >"$OUT/$name.log" 2>&1; then echo "gpu_check: $name ok"; else echo "gpu_check: $name FAIL (see $OUT/$name.log)"; status=1; fi
}
# item 2: full fine-tuning with a bf16 reference, on the GPU's bf16 kernels
check item2_full_ft_bf16 diffalign -q train tiny/dpo model="$W/sd15" data="$W/pairs" output_dir="$W/dpo_full" \
  max_steps=3 lora.rank=0 mixed_precision=bf16
# item 3: the cache build loads no denoiser and stores bf16 moments
check item3_cache_bf16 diffalign -q cache tiny/dpo model="$W/sd3" data="$W/pairs" mixed_precision=bf16 \
  data_opts.cache_dtype=bfloat16 data_opts.cache_dir="$W/cache"
# items 1, 4 and 9: GRPO on PickScore (a reward model that must sit on cuda:0), chunked evaluation,
# and the bf16 log-prob gap between rollout (8 rows) and training (3 rows) forwards, with and without
# loss.recompute_old_logprob
for recompute in false true; do
  check "item1_4_9_grpo_recompute_$recompute" diffalign -q train tiny/grpo model="$W/sd3" output_dir="$W/grpo_$recompute" \
    max_steps=3 mixed_precision=bf16 train_batch_size=3 loss.recompute_old_logprob=$recompute \
    "rewards=[{name: pickscore, args: {path: $W/ps}}]" eval.every=1 eval.num_prompts=8 eval.batch_size=3
done
python3 - "$OUT" "$W" <<'EOF'
import json, sys
from pathlib import Path
out, w = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for on in ("false", "true"):
    f = w / f"grpo_{on}" / "metrics.jsonl"
    if f.is_file():
        rows = [json.loads(l) for l in f.read_text().splitlines()]
        res[f"recompute_{on}"] = {k: [r.get(k) for r in rows] for k in
                                 ("logprob_mismatch", "first_update_max_log_ratio", "clip_fraction", "eval_reward_mean")}
(out / "gpu_check.json").write_text(json.dumps(res, indent=2))
print("gpu_check:", json.dumps(res))
EOF
exit $status
