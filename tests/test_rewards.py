"""Reward modules: every built-in on its tiny model through the real loaders, checked against
independent computations (transformers' CLIPProcessor/CLIPModel, PIL letterboxing, open_clip
directly, transformers' BLIP classes, PIL JPEG sizes). No network: tiny weights go to tmp dirs.

Tolerances (measured on this CPU build):
* identical pixels (no resize): scores agree to 1e-4 (float32 reassociation only);
* with a resize, PIL/torchvision resample uint8 images (rounding and clipping between the two
  separable passes) while we resample floats: on smooth images the pixel difference after
  normalisation is <= ~0.016 (about 1/255 / std), PickScore differs by <= ~0.065 logits
  (cosine 6.5e-4); we assert 0.025 and 0.15.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import UserError
from diffalign.rewards import (
    Affine,
    FunctionReward,
    RunningZScore,
    WeightedSum,
    get_reward,
    list_rewards,
    register_reward,
    to_image_tensor,
)
from diffalign.rewards import tiny
from diffalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Letterbox

PROMPTS = ["a red apple", "a cat on a mat", "a red apple", "the sea at night", "a red apple"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rewards")
    built = {}
    for kind, build in tiny.BUILDERS.items():
        try:
            built[kind] = build(root / kind)
        except UserError:  # hpsv2 without open_clip (the optional "rewards" extra)
            built[kind] = None
    return built


def spec(models, kind: str) -> str:
    if models[kind] is None:
        pytest.skip(f"tiny {kind} model unavailable (open_clip not installed)")
    return f"{tiny.REWARD_FOR_KIND[kind]}={models[kind]}"


def smooth_image(h: int, w: int, phase: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(x / 7.0 + c + phase) * np.cos(y / 5.0 - phase) for c in range(3)], -1)
    return np.clip(a, 0, 255).astype(np.uint8)


def signal(out):
    # clipscore = 2.5*max(cos, 0) is often 0 for a random tiny CLIP: look at the cosine then
    return out.details.get("clip_cosine", out.scores)


def rand_images(n: int, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    # uint8-valued floats: PNG/JPEG round trips and PIL references see exactly these pixels
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255.0


# --------------------------------------------------------------------------------------------
# API basics
# --------------------------------------------------------------------------------------------


def test_import_does_not_load_heavy_libraries():
    code = ("import sys, diffalign.rewards as r; r.get_reward('pickscore'); r.get_reward('hpsv2'); "
            "bad = [m for m in ('transformers', 'open_clip') if m in sys.modules]; "
            "assert not bad, bad")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_to_image_tensor_conversions(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    for value in (Image.fromarray(arr), arr, str(tmp_path / "a.png"), tmp_path / "a.png",
                  torch.from_numpy(arr).permute(2, 0, 1).contiguous(), expected):
        out = to_image_tensor(value)
        assert out.shape == (1, 3, 12, 10) and out.dtype == torch.float32
        torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-7)
    batch = to_image_tensor(np.stack([arr, arr]))
    assert batch.shape == (2, 3, 12, 10)
    mixed = to_image_tensor([arr, arr[:5]])
    assert isinstance(mixed, list) and mixed[1].shape == (3, 5, 10)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        to_image_tensor(torch.rand(1, 3, 4, 4) * 2 - 1.0 - 0.6)  # [-1,1]-style input is refused


def test_plugin_rewards_register_through_entry_points(monkeypatch):
    """The rewards layer names no higher module: the testbed registers its rewards through the
    ``diffalign.rewards`` entry point declared in pyproject.toml, loaded on the first lookup."""
    import tomllib
    from importlib import metadata
    from pathlib import Path

    from diffalign.rewards import registry

    assert not [m for m in registry.PLUGIN_MODULES if not m.startswith("diffalign.rewards.")]
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"][registry.ENTRY_POINT_GROUP]
    assert declared == {"testbed": "diffalign.testbed.registry:auto_register"}

    calls = []
    fake = metadata.EntryPoint("fake", f"{__name__}:_fake_plugin", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata, "entry_points", lambda group: [fake] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setitem(globals(), "_fake_plugin", lambda: calls.append("registered"))
    registry.list_rewards()
    registry.list_rewards()
    assert calls == ["registered"]  # loaded once, on demand


def test_registry_custom_reward_and_errors():
    def factory(path=None, **kw):
        return FunctionReward(lambda im, p, m: im.mean(dim=(1, 2, 3)) * (2.0 if path else 1.0), "test_brightness", **kw)

    register_reward("test_brightness", factory, description="mean pixel", overwrite=True)
    assert "test_brightness" in list_rewards()
    imgs = rand_images(3)
    plain = get_reward("test_brightness")(imgs)
    doubled = get_reward("test_brightness=/anything")(imgs)
    torch.testing.assert_close(plain.scores, imgs.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(doubled.scores, 2 * plain.scores)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_brightness", lambda **kw: None)
    with pytest.raises(UserError, match="unknown reward 'nope'.*pickscore"):
        get_reward("nope")
    with pytest.raises(ValueError, match="needs prompts"):
        get_reward("pickscore")(imgs)  # checked before any weights are touched


def test_offline_missing_weights_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"diffalign-test/not-cached.*HF_HUB_OFFLINE=1.*pickscore=/path/to/dir"):
        get_reward("pickscore=diffalign-test/not-cached", device="cpu")(rand_images(1), ["x"])
    with pytest.raises(UserError, match=r"xswu/HPSv2/HPS_v2\.1_compressed\.pt.*hpsv2=/path/to/"):
        get_reward("hpsv2", device="cpu")(rand_images(1), ["x"])
    with pytest.raises(UserError, match=r"path '/does/not/exist' does not exist"):
        get_reward("pickscore=/does/not/exist", device="cpu")(rand_images(1), ["x"])


# --------------------------------------------------------------------------------------------
# Every built-in on its tiny model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(tiny.BUILDERS))
def test_builtin_reward_runs_batches_and_caches(models, kind):
    imgs = rand_images(len(PROMPTS))
    small = get_reward(spec(models, kind), device="cpu", batch_size=2)
    big = get_reward(spec(models, kind), device="cpu", batch_size=16)
    assert not small.loaded  # lazy: nothing loaded before the first call
    a = small(imgs, PROMPTS)
    b = big(imgs, PROMPTS)
    assert a.scores.shape == (len(PROMPTS),) and a.scores.dtype == torch.float32
    assert torch.isfinite(a.scores).all()
    assert small.name in a.details
    assert signal(a).std() > 0  # the score depends on the input
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)  # micro-batching changes nothing
    again = small(imgs, PROMPTS)
    assert torch.equal(again.scores, a.scores)  # cache hits are bit-identical
    if hasattr(small, "text_cache"):
        assert len(small.text_cache) == len(set(PROMPTS))  # one entry per unique prompt
        fresh = get_reward(spec(models, kind), device="cpu", batch_size=2, cache_text=False)
        torch.testing.assert_close(fresh(imgs, PROMPTS).scores, a.scores, rtol=1e-5, atol=1e-5)
    # mixed sizes and PIL input go through the same path
    pil = [Image.fromarray(smooth_image(40, 48)), Image.fromarray(smooth_image(64, 30))]
    out = small(pil, PROMPTS[:2])
    assert torch.isfinite(out.scores).all() and out.scores.shape == (2,)
    if small.needs_prompt:
        other = small(imgs, ["something else entirely"] * len(PROMPTS))
        assert not torch.allclose(signal(other), signal(a))  # the prompt matters


def test_differentiable_and_plain_tensors(models):
    reward = get_reward(spec(models, "pickscore"), device="cpu")
    imgs = rand_images(2).requires_grad_(True)
    out = reward(imgs, PROMPTS[:2])
    out.scores.sum().backward()
    assert imgs.grad is not None and torch.isfinite(imgs.grad).all() and imgs.grad.abs().sum() > 0
    # without grad the call runs in inference mode but hands back ordinary tensors
    with torch.no_grad():
        plain = reward(imgs.detach(), PROMPTS[:2]).scores
    w = torch.ones(2, requires_grad=True)
    (plain * w).sum().backward()  # would raise for an inference tensor
    torch.testing.assert_close(w.grad, plain)


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def _reference_clip(model_dir, pil_images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    proc = CLIPProcessor.from_pretrained(str(model_dir))
    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        inp = proc(text=prompts, images=pil_images, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inp["pixel_values"])
        txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        cos = ((img / img.norm(dim=-1, keepdim=True)) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    return cos, model.logit_scale.exp().item(), inp["pixel_values"]


@pytest.mark.parametrize("name,kind", [("pickscore", "pickscore"), ("clipscore", "clip"), ("clipscore_l14", "clip")])
def test_clip_rewards_match_transformers_processor_and_model(models, name, kind):
    reward = get_reward(f"{name}={models[kind]}", device="cpu")
    assert reward.name == name
    # 1) native size (32 px): no resampling, only float reassociation differs
    arrs = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    pil = [Image.fromarray(a) for a in arrs]
    cos, scale, _ = _reference_clip(models[kind], pil, PROMPTS[:3])
    out = reward(pil, PROMPTS[:3])
    torch.testing.assert_close(out.details["clip_cosine"], cos, rtol=0, atol=1e-5)
    expected = {"pickscore": scale * cos, "clipscore": 2.5 * cos.clamp_min(0), "clipscore_l14": 100 * cos}[name]
    torch.testing.assert_close(out.scores, expected, rtol=0, atol=1e-4)
    # 2) resized (shortest side -> 32, centre crop): PIL/uint8 vs float resampling
    pil = [Image.fromarray(smooth_image(48, 40, p)) for p in (0.0, 0.7, 1.9)] + [Image.fromarray(smooth_image(50, 90, 0.3))]
    cos, scale, ref_pixels = _reference_clip(models[kind], pil, PROMPTS[:4])
    reward.ensure_loaded()
    ours = torch.cat([reward.embedder.pixel_values(to_image_tensor(im)) for im in pil])
    assert (ours - ref_pixels).abs().max() < 0.025
    out = reward(pil, PROMPTS[:4])
    assert (out.details["clip_cosine"] - cos).abs().max() < 1.5e-3
    if name == "pickscore":
        assert (out.scores - scale * cos).abs().max() < 0.15


def pil_letterbox(img: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's ResizeMaxSize + ToTensor + Normalize, written with PIL."""
    w, h = img.size
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    canvas = Image.new("RGB", (size, size))  # black
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]


@pytest.mark.parametrize("hw", [(50, 30), (30, 50), (300, 200), (17, 40), (64, 64)])
def test_hps_letterbox_matches_pil(hw):
    img = Image.fromarray(smooth_image(*hw))
    ref = pil_letterbox(img, 64)
    ours = Letterbox(64)(to_image_tensor(img))[0]
    assert ours.shape == ref.shape == (3, 64, 64)
    assert (ours - ref).abs().max() < 0.025
    assert (ours - ref).abs().mean() < 0.005
    # the bars are exactly black (zero before normalisation), on the same rows/columns
    black = ((0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD))[:, None, None]
    bar = (ref == black).all(0)
    assert torch.equal((ours == black).all(0) & bar, bar)
    if hw == (64, 64):
        assert torch.equal(ours, ref)


def test_hpsv2_matches_open_clip_directly(models):
    open_clip = pytest.importorskip("open_clip")
    import json

    spec(models, "hpsv2")
    d = models["hpsv2"]
    cfg = json.loads((d / "open_clip_config.json").read_text())["model_cfg"]
    from open_clip.model import CLIP

    model = CLIP(**cfg).eval()
    sd = torch.load(d / "HPS_v2.1_compressed.pt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    tok = open_clip.get_tokenizer("ViT-H-14")
    pil = [Image.fromarray(smooth_image(50, 30, p)) for p in (0.0, 1.0)] + [Image.fromarray(smooth_image(64, 64))]
    with torch.no_grad():
        img = model.encode_image(torch.stack([pil_letterbox(im, 64) for im in pil]), normalize=True)
        txt = model.encode_text(tok(PROMPTS[:3]), normalize=True)
        ref = (img * txt).sum(-1)
    out = get_reward(spec(models, "hpsv2"), device="cpu")(pil, PROMPTS[:3])
    assert (out.scores - ref).abs().max() < 2e-3
    torch.testing.assert_close(out.scores[2], ref[2], rtol=0, atol=1e-5)  # 64x64: no resampling


def test_imagereward_matches_transformers_blip(models):
    """Our BLIP ViT + med-BERT against transformers' BlipVisionModel/BlipTextModel with the
    same tiny weights (renamed), on the same pixels and tokens."""
    import json

    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from diffalign.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

    d = models["imagereward"]
    reward = get_reward(spec(models, "imagereward"), device="cpu")
    pil = [Image.fromarray(smooth_image(40, 48, p)) for p in (0.0, 1.3, 2.0)]
    prompts = ["a red apple", "a much longer prompt about a cat sitting on a mat", "x"]
    out = reward(pil, prompts)
    torch.testing.assert_close(out.scores, (out.details["imagereward_raw"] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)

    med = json.loads((d / "med_config.json").read_text())
    extra = json.loads((d / "imagereward_config.json").read_text())
    sd = torch.load(d / "ImageReward.pt", map_location="cpu", weights_only=True)
    vis = BlipVisionModel(BlipVisionConfig(
        hidden_size=extra["vision_width"], intermediate_size=4 * extra["vision_width"],
        num_hidden_layers=extra["vision_depth"], num_attention_heads=extra["vision_heads"],
        image_size=extra["image_size"], patch_size=extra["patch_size"], layer_norm_eps=1e-6, hidden_act="gelu")).eval()
    vsd = {"embeddings.class_embedding": sd["blip.visual_encoder.cls_token"],
           "embeddings.position_embedding": sd["blip.visual_encoder.pos_embed"],
           "embeddings.patch_embedding.weight": sd["blip.visual_encoder.patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": sd["blip.visual_encoder.patch_embed.proj.bias"],
           "post_layernorm.weight": sd["blip.visual_encoder.norm.weight"],
           "post_layernorm.bias": sd["blip.visual_encoder.norm.bias"]}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(extra["vision_depth"]):
        for ours_name, hf_name in names.items():
            for p in ("weight", "bias"):
                vsd[f"encoder.layers.{i}.{hf_name}.{p}"] = sd[f"blip.visual_encoder.blocks.{i}.{ours_name}.{p}"]
    vis.load_state_dict(vsd, strict=True)
    txt = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=extra["vision_width"],
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        is_decoder=True, layer_norm_eps=med["layer_norm_eps"]), add_pooling_layer=False).eval()
    prefix = "blip.text_encoder."
    tsd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith("position_ids")}
    txt.load_state_dict(tsd, strict=False)
    missing = set(txt.state_dict()) - set(tsd) - {"embeddings.position_ids"}
    assert not missing, missing
    reward.ensure_loaded()
    pixels = reward.preprocess(to_image_tensor(pil), device="cpu")
    tok = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = vis(pixel_values=pixels).last_hidden_state
        hidden = txt(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                     encoder_hidden_states=image_tokens, is_decoder=False).last_hidden_state
        raw = reward.model.mlp(hidden[:, 0]).squeeze(-1)
    torch.testing.assert_close(out.details["imagereward_raw"], raw, rtol=0, atol=1e-5)


def test_jpeg_rewards_equal_pil_sizes():
    imgs = rand_images(2, 40, 48)
    flat = torch.full((1, 3, 40, 48), 0.5)
    batch = torch.cat([imgs, flat])
    inc = get_reward("jpeg_incompressibility")(batch)
    comp = get_reward("jpeg")(batch)
    for i in range(3):
        arr = (batch[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        assert inc.scores[i].item() == pytest.approx(len(buf.getvalue()) / 1000, abs=1e-6)
    torch.testing.assert_close(comp.scores, -inc.scores)
    assert inc.scores[2] < inc.scores[0]  # a flat image compresses far better than noise


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def test_weighted_sum_affine_and_running_zscore(models):
    pick = get_reward(spec(models, "pickscore"), device="cpu")
    jpeg = get_reward("jpeg_incompressibility")
    imgs = rand_images(4)
    p, j = pick(imgs, PROMPTS[:4]).scores, jpeg(imgs).scores
    combo = WeightedSum([(pick, 0.5), (jpeg, -2.0)])
    out = combo(imgs, PROMPTS[:4])
    torch.testing.assert_close(out.scores, 0.5 * p - 2.0 * j)
    torch.testing.assert_close(out.details["pickscore"], p)
    torch.testing.assert_close(out.details["jpeg_incompressibility"], j)
    assert "pickscore.clip_cosine" in out.details
    via_mapping = get_reward({spec(models, "pickscore"): 0.5, "jpeg_incompressibility": -2.0}, device="cpu")
    torch.testing.assert_close(via_mapping(imgs, PROMPTS[:4]).scores, out.scores, rtol=1e-5, atol=1e-5)

    aff = Affine.from_range(jpeg, 10.0, 20.0)
    torch.testing.assert_close(aff(imgs).scores, (j - 10.0) / 10.0)

    z = RunningZScore(jpeg)
    seen = []
    for seed in range(3):
        batch = rand_images(3, seed=seed) * (0.3 + 0.3 * seed)
        raw = jpeg(batch).scores
        seen.append(raw.double())
        zs = z(batch).scores
        allv = torch.cat(seen)
        std = allv.std(unbiased=True).item() if len(allv) > 1 else 1.0
        torch.testing.assert_close(zs.double(), (raw.double() - allv.mean()) / (std + 1e-6), rtol=1e-5, atol=1e-5)
    assert z.count == 9


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _write_images(d, sizes):
    d.mkdir()
    names = []
    for i, (h, w) in enumerate(sizes):
        name = f"img_{i:02d}.png"
        Image.fromarray(smooth_image(h, w, i * 0.5)).save(d / name)
        names.append(name)
    return names


def test_cli_score_writes_csv(models, tmp_path, capsys):
    from diffalign.cli import main

    names = _write_images(tmp_path / "imgs", [(40, 48), (32, 32), (64, 30)])
    (tmp_path / "prompts.txt").write_text("a red apple\na cat\nthe sea\n")
    out = tmp_path / "scores.csv"
    rc = main(["score", "--reward", spec(models, "pickscore"), "--reward", "jpeg", "--images", str(tmp_path / "imgs"),
               "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["image", "prompt", "pickscore", "jpeg"]  # the eval CSV's name too
    assert [r["image"] for r in rows] == names and [r["prompt"] for r in rows] == ["a red apple", "a cat", "the sea"]
    direct = get_reward(spec(models, "pickscore"), device="cpu")(
        [tmp_path / "imgs" / n for n in names], ["a red apple", "a cat", "the sea"]).scores
    np.testing.assert_allclose([float(r["pickscore"]) for r in rows], direct.numpy(), atol=1e-5)
    assert "images/s" in capsys.readouterr().out

    # CSV prompts: subset and order given by the file
    (tmp_path / "p.csv").write_text("image,prompt\nimg_02.png,the sea\nimg_00.png,a red apple\n")
    rc = main(["score", "--reward", "jpeg", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.csv"),
               "--out", str(out)])
    assert rc == 0 and [r["image"] for r in csv.DictReader(out.open())] == ["img_02.png", "img_00.png"]

    # bad input: one clear line naming the file
    (tmp_path / "short.txt").write_text("only one\n")
    rc = main(["score", "--reward", "jpeg", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "short.txt"),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "short.txt" in err and "1 lines" in err and "3 images" in err
    (tmp_path / "bad.csv").write_text("file,text\na,b\n")
    rc = main(["score", "--reward", "jpeg", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "bad.csv"),
               "--out", str(out)])
    assert rc == 2 and "lacks column(s) image, prompt" in capsys.readouterr().err


def test_pairwise_accuracy_tie_convention():
    from diffalign.rewards.pairs import pairwise_accuracy

    s0 = np.array([2.0, 1.0, 1.0, 1.0, 5.0])
    s1 = np.array([1.0, 2.0, 1.0, 1.05, 5.0])
    l0 = np.array([1.0, 1.0, 0.5, 0.5, 1.0])  # win, loss, tie/tie, tie/near-tie, strict/equal
    l1 = 1.0 - l0
    m = pairwise_accuracy(s0, s1, l0, l1)
    assert m["accuracy"] == pytest.approx((1 + 0 + 1 + 0.5 + 0.5) / 5)
    assert m["accuracy_strict"] == pytest.approx(1 / 3)
    m = pairwise_accuracy(s0, s1, l0, l1, tie_tol=0.1)
    assert m["accuracy"] == pytest.approx((1 + 0 + 1 + 1 + 0.5) / 5)
    assert pairwise_accuracy(-s0, -s1, l0, l1, higher_is_better=False)["accuracy"] == pytest.approx(0.6)


def test_cli_pairs_relabel_and_filter(models, tmp_path, capsys):
    import pyarrow.parquet as pq

    from diffalign.cli import main
    from diffalign.rewards.pairs import iter_pair_batches

    src = tiny.write_toy_pairs(tmp_path / "pairs.parquet", n=20, seed=3, tie_fraction=0.2, bad_rows=2)
    reward = "jpeg_incompressibility"
    rc = main(["score", "--reward", reward, "--reward", spec(models, "pickscore"), "--pairs", str(src),
               "--out", str(tmp_path / "pairs.csv"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "18 pairs" in out and "skipped 2 row(s)" in out and "row 0" in out and "row 1" in out
    assert "jpeg_incompressibility: pairwise accuracy" in out and "images/s" in out

    dst = tmp_path / "relabelled.parquet"
    assert main(["relabel", "--reward", reward, "--pairs", str(src), "--out", str(dst)]) == 0
    assert "skipped 2 row(s)" in capsys.readouterr().out
    new = pq.read_table(dst).to_pydict()
    orig = pq.read_table(src).to_pydict()
    assert len(new["caption"]) == 18
    assert new["human_label_0"] == orig["label_0"][2:] and new["human_label_1"] == orig["label_1"][2:]
    assert new["ranking_id"] == orig["ranking_id"][2:]
    j = get_reward(reward)
    for pb in iter_pair_batches(src):
        s0 = j(pb.images_0).scores.numpy()
        s1 = j(pb.images_1).scores.numpy()
        for k, row in enumerate(pb.rows):
            i = new["ranking_id"].index(int(row))
            want = 1.0 if s0[k] > s1[k] else (0.0 if s0[k] < s1[k] else 0.5)
            assert new["label_0"][i] == want and new["label_1"][i] == 1.0 - want
            best = {1.0: orig["image_0_uid"][row], 0.0: orig["image_1_uid"][row], 0.5: ""}[want]
            assert new["best_image_uid"][i] == best and new["human_best_image_uid"][i] == orig["best_image_uid"][row]

    kept = tmp_path / "kept.parquet"
    assert main(["filter-pairs", "--reward", reward, "--pairs", str(src), "--out", str(kept), "--keep-fraction", "0.5"]) == 0
    assert "kept 9 of 18" in capsys.readouterr().out
    k = pq.read_table(kept).to_pydict()
    margins = np.abs(np.array(new["reward_0"]) - np.array(new["reward_1"]))
    assert len(k["caption"]) == 9
    assert min(k["reward_margin"]) >= np.sort(margins)[-9] - 1e-9
    assert k["ranking_id"] == sorted(k["ranking_id"])  # input order kept


def test_cli_missing_column_is_named(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.cli import main

    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "label_0": [1.0]}), tmp_path / "p.parquet")
    rc = main(["relabel", "--reward", "jpeg", "--pairs", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "p.parquet" in err and "'jpg_1'" in err and "'label_1'" in err
