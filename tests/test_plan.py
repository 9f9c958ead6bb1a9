"""``diffalign plan`` (issue #30): memory plans as numbers, from packaged model shape configs."""

from __future__ import annotations

import math

import pytest

from diffalign.plan import shapes
from diffalign.plan.estimate import GiB, plan_recipe, recipe_launch
from diffalign.recipes import recipe_names

SD15_UNET_PARAMS = 859_520_964  # stable-diffusion-v1-5's UNet, the known count


def test_sd15_unet_from_its_shape_config_has_the_known_parameter_count():
    module = shapes.build_meta("sd15/unet.json")
    assert next(module.parameters()).is_meta  # no storage, no weights
    assert shapes.count_params(module) == (SD15_UNET_PARAMS, 0)
    assert shapes.counts_for("sd15/unet.json")["params"] == SD15_UNET_PARAMS


@pytest.mark.parametrize("rel", ["sd15/unet.json", "sd15/vae.json", "encoders/clip_l.json"])
def test_packaged_counts_match_a_fresh_meta_build(rel):
    """counts.json is what scripts/model_shape_counts.py computes from the shape configs now
    (a shape config edited without rerunning the script fails here)."""
    fresh = shapes.count_entry(rel)
    packaged = shapes.counts_for(rel)
    assert {k: v for k, v in fresh.items() if k not in ("activations", "peak_bytes_per_pixel")} == \
           {k: v for k, v in packaged.items() if k not in ("activations", "peak_bytes_per_pixel")}
    if "activations" in fresh:
        for key, coeffs in fresh["activations"]["fit"].items():
            assert coeffs == pytest.approx(packaged["activations"]["fit"][key], rel=1e-9, abs=1.0), key
    if "peak_bytes_per_pixel" in fresh:
        assert fresh["peak_bytes_per_pixel"] == pytest.approx(packaged["peak_bytes_per_pixel"])


def test_every_shape_config_is_counted():
    assert sorted(shapes.load_counts()["models"]) == shapes.shape_configs()


def _lora_params(module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("kind,targets,rank", [
    ("sd15", None, 4),  # the family's default attention projections
    ("sd15", ["to_q", "conv1", "time_emb_proj"], 3),  # a Conv2d target: A is a kxk conv to r channels
    ("flux", None, 8),  # attention, feed-forward and single-block MLP projections
])
def test_lora_formula_equals_peft(tiny_model, kind, targets, rank):
    """r x (in + out) per adapted Linear (and the conv form) equals what peft adds through the
    adapter's own add_lora path."""
    from diffalign.config import LoraOptions
    from diffalign.models import load_adapter

    adapter = load_adapter(tiny_model(kind))
    expected, layers = shapes.lora_param_count(adapter.denoiser, targets or adapter.default_lora_targets, rank)
    assert layers > 0
    adapter.add_lora(LoraOptions(rank=rank, target_modules=targets))
    assert _lora_params(adapter.denoiser) == expected


def test_qwen_image_lora_matches_the_issue():
    """12 projections x 60 blocks at r64: ~425M parameters, ~6.8 GB with AdamW (4 + 4 + 8 B)."""
    plan = plan_recipe("qwenimage-flow-grpo", gpus=1)
    assert plan.trainable_params == 424_673_280
    assert plan.lora_layers == 12 * 60
    adamw = sum(p.bytes for p in plan.parts if p.column in ("grads", "optimizer") or "master" in p.what)
    assert adamw == pytest.approx(6.8e9, rel=0.01)


def test_mapo_sdxl_and_flux_fp32_match_the_issue():
    """MaPO SDXL ~ 26 GB before activations (the fp32 UNet, its fp32 gradients, 8-bit Adam: 10 B a
    parameter; the bf16 encoders add 1.8 GB); FLUX.1 ~ 67 GB of fp32 weights with T5."""
    plan = plan_recipe("sdxl-mapo-pickapic", gpus=1)
    core = sum(p.bytes for p in plan.parts if p.column in ("grads", "optimizer") or "master" in p.what)
    assert core == pytest.approx(26e9, rel=0.02)
    assert plan.column("weights") == pytest.approx(1.8e9, rel=0.05)  # CLIP-L + bigG + VAE in bf16
    flux = sum(shapes.counts_for(r)["params"] for r in ("flux1_dev/transformer.json", "flux1_dev/vae.json",
                                                        "encoders/clip_l.json", "encoders/t5_xxl.json"))
    assert flux * 4 == pytest.approx(67e9, rel=0.02)


@pytest.mark.parametrize("name", list(recipe_names()))
def test_every_packaged_recipe_gets_a_plan(name):
    plan = plan_recipe(name)
    assert plan.label == name
    for column in ("weights", "trainable", "grads", "optimizer", "activations"):
        assert math.isfinite(plan.column(column)) and plan.column(column) > 0, column
    assert plan.total > 2 * GiB
    assert plan.fits == (plan.total / GiB <= 80)


def test_sharding_follows_the_launch_line_and_the_flag():
    def read(stem):
        from diffalign.recipes import resolve_config

        return resolve_config(stem).read_text()

    assert recipe_launch(read("flux1-dev-dancegrpo-hpsv21"))[:2] == ("fsdp", 8)
    assert recipe_launch(read("flux1-dev-mixgrpo-flash"), read)[:2] == ("fsdp", 8)  # "Built on mixgrpo's memory plan"
    assert recipe_launch(read("flux1-dev-dpo-lora"))[0] == "ddp"
    fsdp = plan_recipe("flux1-dev-dancegrpo-hpsv21")
    ddp = plan_recipe("flux1-dev-dancegrpo-hpsv21", sharded=False)
    assert (fsdp.sharding, ddp.sharding) == ("fsdp", "ddp")
    # sharded optimizer states: 1/8 of the replicated ones
    assert fsdp.column("optimizer") * 8 == pytest.approx(ddp.column("optimizer"))
    assert not ddp.fits and fsdp.fits  # a 12B full fine-tune does not fit one 80 GiB GPU unsharded
    sharded = plan_recipe("sd15-dpo-pickapic", sharded=True, gpus=4)
    assert sharded.column("grads") * 8 == pytest.approx(plan_recipe("sd15-dpo-pickapic", gpus=4).column("grads"))


def test_full_fine_tuning_with_a_reference_keeps_a_second_copy_lora_does_not():
    full = plan_recipe("sd15-dpo-pickapic", ["lora.rank=0"])
    lora = plan_recipe("sd15-dpo-pickapic", ["lora.rank=64"])
    assert any("reference copy" in p.what for p in full.parts)
    assert not any("reference copy" in p.what for p in lora.parts)
    mapo = plan_recipe("sdxl-mapo-pickapic", ["lora.rank=0"])  # reference-free
    assert not any("reference copy" in p.what for p in mapo.parts)


def test_gradient_checkpointing_shrinks_the_training_activations():
    on = plan_recipe("sd35-dpo-pickapic", ["model_opts.gradient_checkpointing=true"])
    off = plan_recipe("sd35-dpo-pickapic", ["model_opts.gradient_checkpointing=false"])
    assert off.column("activations") > 3 * on.column("activations")


def test_cli_prints_one_plan_and_a_one_line_error_for_an_unknown_recipe(capsys):
    from diffalign.cli import main

    assert main(["plan", "sdxl-dpo", "lora.rank=8", "--gpus", "2", "--gpu-mem", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sdxl-dpo-pickapic: dpo on stabilityai/stable-diffusion-xl-base-1.0, LoRA")
    assert "GiB per GPU: fits 200 GiB with" in out
    assert main(["plan", "sdxl-dpo", "--gpu-mem", "1"]) == 0
    assert "GiB per GPU: does NOT fit 1 GiB" in capsys.readouterr().out
    assert main(["plan", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffalign plan: error: config 'no-such-recipe' does not exist")
    assert len(err.strip().splitlines()) == 1


def test_cli_all_prints_the_table_of_every_recipe(capsys):
    from diffalign.cli import main

    assert main(["plan", "--all", "--gpu-mem", "141"]) == 0
    out = capsys.readouterr().out
    assert "| recipe | GPUs | weights | trainable | grads | optimizer | activations | total per GPU | fits 141 GiB? |" in out
    for name in recipe_names():
        assert f"| `{name}` |" in out


def test_the_memory_plans_page_is_current():
    """docs/memory_plans.md is generated: a recipe change that moves a plan must regenerate it
    (`python scripts/memory_plans.py`), and recipe comments quote those numbers."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "scripts/memory_plans.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
