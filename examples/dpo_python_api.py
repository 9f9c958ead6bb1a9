"""Diffusion-DPO from Python instead of the CLI, on a tiny offline model.

    python examples/dpo_python_api.py
"""

import tempfile
from pathlib import Path

from diffalign.config import load_config
from diffalign.data.toy import write_toy_pickapic
from diffalign.models.tiny import build_sd15
from diffalign.trainers import train

root = Path(tempfile.mkdtemp())
model = build_sd15(root / "model")  # or "stable-diffusion-v1-5/stable-diffusion-v1-5" on a GPU machine
data = write_toy_pickapic(root / "data", n=32, size=32).parent  # or "yuvalkirstain/pickapic_v2"
cfg = load_config(
    "tiny/dpo.yaml",  # a packaged config (diffalign recipes lists them), or your own YAML file, or a recipe name
    [f"model={model}", f"data={data}", f"output_dir={root / 'run'}", "max_steps=10"],
)
result = train(cfg)
print("final metrics:", result["final"])
print("LoRA written to", root / "run" / "pytorch_lora_weights.safetensors")
