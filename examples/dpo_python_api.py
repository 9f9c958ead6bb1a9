"""Diffusion-DPO from Python instead of the CLI, on a tiny offline model, with the public API.

    python examples/dpo_python_api.py
"""

import tempfile
from pathlib import Path

import diffalign as da

root = Path(tempfile.mkdtemp())
model = da.tiny_model("sd15", root / "model")  # or "stable-diffusion-v1-5/stable-diffusion-v1-5" on a GPU machine
data = da.toy_data(root / "data", n=32, size=32)  # or "yuvalkirstain/pickapic_v2"
# a packaged config (`diffalign recipes` lists them), your own YAML file, or a recipe name
cfg = da.load_config("tiny/dpo", model=model, data=data, output_dir=root / "run", max_steps=10)
result = da.train(cfg)
print("final metrics:", result["final"])
print("LoRA written to", root / "run" / "pytorch_lora_weights.safetensors")
