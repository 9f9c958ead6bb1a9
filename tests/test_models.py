"""Adapters on tiny models loaded through the same from_pretrained path as real checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from diffalign.config import LoraOptions, ModelOptions
from diffalign.models import FAMILIES, AttentionError, UnsupportedModelError, detect_family, load_adapter
from diffalign.models.tiny import BUILDERS

# every family by its own tiny model, plus the tiny variants of a family (sd21: sd15 with v-prediction)
KINDS = [*((name, cls) for name, cls in FAMILIES.items()), ("sd21", FAMILIES["sd15"]), ("flux-schnell", FAMILIES["flux"])]


def test_every_family_has_a_tiny_builder_and_its_pipeline_class():
    for name, cls in FAMILIES.items():
        assert cls.family == name and name in BUILDERS and cls.pipeline_class
    assert len({cls.pipeline_class for cls in FAMILIES.values()}) == len(FAMILIES)


@pytest.mark.parametrize("kind,cls", KINDS)
def test_tiny_models_load_offline_and_detect_family(tiny_model, kind, cls):
    from diffusers import DiffusionPipeline

    path = tiny_model(kind)
    size_mb = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
    assert size_mb < 20
    pipe = DiffusionPipeline.from_pretrained(path)  # no network, no extra kwargs
    assert pipe.tokenizer is not None
    adapter = load_adapter(path)
    assert type(adapter) is cls
    assert detect_family(path) == cls.family
    cond = adapter.encode_prompt(["a red cat", ""])
    assert all(v.shape[0] == 2 for v in cond.values())
    # different prompts give different conditioning (the tokenizer is real)
    assert not torch.allclose(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])


def test_unknown_model_dir_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WuerstchenPipeline"}))
    with pytest.raises(UnsupportedModelError, match="WuerstchenPipeline"):
        load_adapter(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="missing': no such directory"):  # a path: never a hub look-up
        load_adapter(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError, match="model_index.json"):  # a directory that is no pipeline
        load_adapter(str(tmp_path / "empty"))


def test_epsilon_and_v_prediction_targets(tiny_model):
    for kind, ptype in (("sd15", "epsilon"), ("sd21", "v_prediction")):
        a = load_adapter(tiny_model(kind))
        assert a.prediction_type == ptype
        x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        t = torch.tensor([10, 500, 990])
        ac = a.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t, target = a.noisy_input_and_target(x0, eps, t)
        torch.testing.assert_close(x_t, ac.sqrt() * x0 + (1 - ac).sqrt() * eps)
        expected = eps if ptype == "epsilon" else ac.sqrt() * eps - (1 - ac).sqrt() * x0
        torch.testing.assert_close(target, expected)


def test_flow_matching_interpolation_and_velocity(tiny_model):
    a = load_adapter(tiny_model("sd3"))
    t = a.sample_timesteps(64, torch.Generator().manual_seed(0))
    assert ((t > 0) & (t <= 1000)).all()
    # timesteps come from the shifted sigma table (shift=3 puts more mass at high noise)
    assert (t / 1000).mean() > 0.6
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    tt = torch.tensor([250.0, 750.0])
    x_t, v = a.noisy_input_and_target(x0, eps, tt)
    s = torch.tensor([0.25, 0.75]).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(v, eps - x0)
    ln = load_adapter(tiny_model("sd3"), ModelOptions(timestep_sampling="logit_normal"))
    t1 = ln.sample_timesteps(8, torch.Generator().manual_seed(5))
    t2 = ln.sample_timesteps(8, torch.Generator().manual_seed(5))
    torch.testing.assert_close(t1, t2)  # the generator alone decides


def test_vae_roundtrip_shapes_and_scaling(tiny_model):
    a = load_adapter(tiny_model("sd3"))
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = a.encode_images(px, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (2, *a.latent_shape(32, 32))
    img = a.decode_latents(lat)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1


def test_lora_targets_reference_switch_and_sdpa_kernels(tiny_model):
    a = load_adapter(tiny_model("sd15"), ModelOptions(attention="sdpa_math"))
    a.add_lora(LoraOptions(rank=4, init="gaussian"))
    names = [n for n, p in a.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any("to_q" in n for n in names)
    with torch.no_grad():
        for n, p in a.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = a.encode_prompt(["x"])
    with torch.no_grad():
        out = a.predict(x, t, cond)
        with a.adapters_disabled():
            ref = a.predict(x, t, cond)
        again = a.predict(x, t, cond)
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(out, again)  # adapters are back on
    from diffalign.models.base import pin_sdpa_kernel

    assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    pin_sdpa_kernel(None)  # process-wide: restore for the other tests
    assert torch.backends.cuda.flash_sdp_enabled()


def test_xformers_request_fails_clearly_without_it(tiny_model):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None and torch.cuda.is_available():
        pytest.skip("xformers usable here")
    with pytest.raises(AttentionError, match="xformers"):
        load_adapter(tiny_model("sd15"), ModelOptions(attention="xformers"))
    with pytest.raises(AttentionError, match="attention"):
        load_adapter(tiny_model("sd15"), ModelOptions(attention="bogus"))


def test_dit_attention_backend_gives_same_output(tiny_model):
    math_backend = load_adapter(tiny_model("sd3"), ModelOptions(attention="diffusers:_native_math"))
    default = load_adapter(tiny_model("sd3"))
    cond = default.encode_prompt(["x"])
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(math_backend.predict(x, t, cond), default.predict(x, t, cond), rtol=1e-4, atol=1e-5)
    with pytest.raises(AttentionError, match="not_a_backend"):
        load_adapter(tiny_model("sd3"), ModelOptions(attention="diffusers:not_a_backend"))


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_default_lora_targets_each_match_a_linear_layer(tiny_model, kind):
    """A default target that names no module would silently train less than the family's scripts do."""
    a = load_adapter(tiny_model(kind))
    names = [n for n, m in a.denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in a.default_lora_targets:
        assert any(n == target or n.endswith("." + target) for n in names), target


def test_flux_guidance_input_and_packing(tiny_model):
    """FLUX.1-dev: the guidance value is a network input (model_opts.guidance without a sampler,
    the sampler's value via with_guidance); schnell has none. Packing is FluxPipeline's 2x2 layout."""
    from diffalign.models.flux import pack_patches, patch_position_ids, unpack_patches

    x = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).view(2, 4, 4, 6)
    tokens = pack_patches(x)
    assert tokens.shape == (2, 6, 16)
    # token (row 0, col 1) holds channel 0's 2x2 patch at rows 0-1, cols 2-3 first
    assert tokens[0, 1, :4].tolist() == [x[0, 0, 0, 2], x[0, 0, 0, 3], x[0, 0, 1, 2], x[0, 0, 1, 3]]
    assert torch.equal(unpack_patches(tokens, 4, 6), x)
    assert patch_position_ids(4, 6)[4].tolist() == [0.0, 1.0, 1.0]
    dev = load_adapter(tiny_model("flux"), ModelOptions(guidance=2.0))
    cond = dev.encode_prompt(["a cat"])
    xt, t = torch.randn(1, *dev.latent_shape(32, 32)), torch.tensor([500.0])
    with torch.no_grad():
        default = dev.predict(xt, t, cond)
        torch.testing.assert_close(dev.predict(xt, t, dev.with_guidance(cond, 2.0)), default)
        assert not torch.allclose(dev.predict(xt, t, dev.with_guidance(cond, 5.0)), default)
    schnell = load_adapter(tiny_model("flux-schnell"))
    assert schnell.distilled_guidance and schnell.with_guidance(cond, 5.0) is cond


def test_vae_decode_batch_bounds_the_images_per_decode_call(tiny_model):
    """``model_opts.vae_decode_batch`` splits a decode into VAE calls of at most that many images
    (issue #30: a whole rollout group decoded at once did not fit beside the training state); the
    images are the same as one call's."""
    from diffalign.config import ModelOptions
    from diffalign.models import load_adapter

    adapter = load_adapter(str(tiny_model("sd15")), ModelOptions(vae_decode_batch=2))
    sizes = []
    decode = adapter.vae.decode
    adapter.vae.decode = lambda x, **k: (sizes.append(x.shape[0]), decode(x, **k))[1]
    latents = torch.randn(5, adapter.vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    chunked = adapter.decode_latents(latents)
    assert sizes == [2, 2, 1]
    adapter.opts.vae_decode_batch = 0
    whole = adapter.decode_latents(latents)
    assert sizes[3:] == [5]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_a_force_upcast_vae_stays_fp32_under_fp16(tiny_model):
    """diffusers' ``force_upcast`` VAEs (SD1.5, SDXL) overflow in fp16: the pipelines keep them in
    fp32 under fp16, and so must the trainers' cast of the frozen parts (issue #30, item 11)."""
    from diffalign.models import load_adapter

    adapter = load_adapter(str(tiny_model("sd15")))
    adapter.vae.register_to_config(force_upcast=True)
    adapter.cast_frozen(torch.float16)
    assert adapter.vae.dtype == torch.float32 and adapter.pipe.text_encoder.dtype == torch.float16
    adapter.cast_frozen(torch.bfloat16)
    assert adapter.vae.dtype == torch.bfloat16
