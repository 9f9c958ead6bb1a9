#!/usr/bin/env bash
# The wheel job: what `pip install diffalign` gives a user, run outside the clone.
# Builds the wheel, installs it with the CPU torch of the README's main-job command into a fresh
# venv (no --system-site-packages: the clone's venv must not satisfy a missing dependency), then
# runs the packaged recipes, a tiny training run and the main job from an empty directory.
# Usage: .ci/wheel_check.sh  (env: PYTHON=python3, WHEEL_TORCH=torch==2.13.0, KEEP=1 keeps the temp dir,
#   CI_ARTIFACTS=DIR for the report screenshot, default ci-artifacts/ in the clone)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEEL_TORCH="${WHEEL_TORCH:-torch==2.13.0}"  # the local CPU wheel; a CUDA build would pull GBs
WORK="$(mktemp -d)"
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi
t0=$SECONDS
step() { echo "--- wheel check [$((SECONDS - t0))s]: $*"; }

step "build the wheel"
# build from a copy of the sources: setuptools' build/ folder in a used clone keeps files that were
# deleted or moved since, and they would hide a file the package data fails to ship
mkdir "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/diffalign" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/diffalign-*.whl)"

step "install $(basename "$WHEEL") + $WHEEL_TORCH into a clean venv"
"$PYTHON" -m venv "$WORK/venv"
# --no-compile: byte-compiling torch and transformers is most of the install time; imports compile lazily
"$WORK/venv/bin/python" -m pip install -q --no-compile "$WHEEL_TORCH" "$WHEEL"
export PATH="$WORK/venv/bin:$PATH"
unset PYTHONPATH

RUN="$(mktemp -d)"
cd "$RUN"
step "run from $RUN"
where="$(python -c 'import diffalign, os; print(os.path.dirname(diffalign.__file__))')"
case "$where" in
  "$WORK/venv/"*) ;;
  *) echo "wheel check: diffalign imports from $where, not from the wheel's venv" >&2; exit 1 ;;
esac

step "diffalign recipes"
diffalign recipes | tee recipes.txt
grep -q "sd15-dpo-pickapic" recipes.txt && grep -q "tiny/dpo" recipes.txt

step "tiny model + toy data + diffalign train tiny/dpo"
diffalign tiny-model sd15 M && diffalign toy-data pickapic D --n 8 && diffalign train tiny/dpo model=M data=D output_dir=O max_steps=2
test -s O/pytorch_lora_weights.safetensors
# a recipe by name resolves to the wheel's copy (a real recipe needs a GPU and a download to run)
case "$(diffalign recipes --path sd15-dpo)" in
  "$WORK/venv/"*/diffalign/configs/recipes/sd15_dpo_pickapic.yaml) ;;
  *) echo "wheel check: recipe sd15-dpo does not resolve inside the wheel's venv" >&2; exit 1 ;;
esac
step "diffalign train sd15-dpo (the real recipe by name, on the tiny model: one step, 32 px, no bf16)"
diffalign train sd15-dpo model=M data=D output_dir=R max_steps=1 gradient_accumulation_steps=1 \
  mixed_precision=no data_opts.resolution=32 data_opts.streaming=false optim.warmup_steps=0
test -s R/unet/diffusion_pytorch_model.safetensors

step "diffalign testbed-compare --budget quick"
diffalign testbed-compare --budget quick --out T
test -s T/report/report.md
step "render the report in headless Chromium (screenshot: ci-artifacts/testbed_report.png)"
python "$ROOT/.ci/render_report.py" T/report "${CI_ARTIFACTS:-$ROOT/ci-artifacts}"

step "ok ($((SECONDS - t0))s)"
rm -rf "$RUN"
