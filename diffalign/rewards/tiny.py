"""Tiny random-init reward models, saved in the *same on-disk format* as the real checkpoints,
so tests and CPU smoke runs exercise the real loading code with no network.

``BUILDERS[kind](out_dir, seed=0) -> Path`` for kind in ``clip``, ``pickscore``, ``hpsv2``,
``aesthetic``, ``imagereward`` (``diffalign tiny-model KIND DIR`` finds them here). Each build
takes well under a few seconds and a few MB. Use the result as ``--reward KIND=DIR``
(``clip`` -> ``clipscore=DIR``).

| kind        | layout (as the real weights)                                                |
|-------------|-----------------------------------------------------------------------------|
| clip        | transformers ``CLIPModel`` + ``CLIPProcessor`` (``save_pretrained``)        |
| pickscore   | same as clip (PickScore_v1 is a CLIPModel; processor saved alongside)       |
| hpsv2       | ``HPS_v2.1_compressed.pt`` = ``{"state_dict": fp16 tensors}`` of an open_clip CLIP, plus ``open_clip_config.json`` for the tiny architecture |
| aesthetic   | ``clip/`` (CLIP dir) + ``aesthetic_head.safetensors`` (``layers.{0,2,4,6,7}``) |
| imagereward | ``ImageReward.pt`` (BLIP + MLP state dict), ``med_config.json``, ``tokenizer/``, ``imagereward_config.json`` |

Also :func:`build_mask2former`: a tiny Mask2Former (transformers layout) for ``geneval=DIR``; :func:`build_ocr`: a tiny TrOCR ``VisionEncoderDecoderModel`` + processor for ``ocr=DIR`` (not in
``BUILDERS``, whose rewards score plain prompts); and :func:`write_toy_pairs`: a Pick-a-Pic-schema
parquet of learnable toy preferences.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import numpy as np
import torch

from ..files import jpeg_bytes

TINY_IMAGE_SIZE = 32
TINY_PROJECTION = 16


def _tiny_clip(out: Path, seed: int, image_size: int = TINY_IMAGE_SIZE, logit_scale: float | None = None) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    from ..models.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    text_cfg = tiny_clip_text_config(projection_dim=TINY_PROJECTION)
    vision_cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=TINY_PROJECTION, hidden_act="quick_gelu",
    )
    kwargs = {} if logit_scale is None else {"logit_scale_init_value": logit_scale}
    cfg = CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(),
                     projection_dim=TINY_PROJECTION, **kwargs)
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    # Saved separately (preprocessor_config.json + tokenizer files), the layout of the hub CLIP
    # repos, rather than transformers 5's combined processor_config.json.
    image_processor.save_pretrained(str(out))
    tiny_clip_tokenizer(out)
    return out


def build_clip(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny CLIP (ViT 32 px, patch 8, width 32, 2 layers; text width 32) for ``clipscore``."""
    return _tiny_clip(Path(out), seed)


def build_pickscore(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny PickScore: a CLIP dir with logit scale ln(100), as PickScore_v1's."""
    return _tiny_clip(Path(out), seed + 1, logit_scale=float(np.log(100.0)))


def build_aesthetic(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny aesthetic predictor: ``clip/`` + ``aesthetic_head.safetensors``."""
    from .clip import AestheticMLP, save_aesthetic_head

    out = Path(out)
    _tiny_clip(out / "clip", seed + 2)
    torch.manual_seed(seed + 3)
    mlp = AestheticMLP(TINY_PROJECTION)
    with torch.no_grad():  # centre the random head near the AVA midpoint so scores look like ratings
        mlp.layers[-1].bias.fill_(5.0)
    save_aesthetic_head(mlp, out / "aesthetic_head.safetensors")
    return out


def build_hpsv2(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny HPSv2: open_clip CLIP (ViT 64 px patch 16 width 32; text width 16 with the real
    49408-token BPE vocabulary) saved as ``{"state_dict": fp16}`` like ``HPS_v2.1_compressed.pt``."""
    from .hps import HPS_FILES, import_open_clip
    from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    open_clip = import_open_clip()
    from open_clip.model import CLIP

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": TINY_PROJECTION,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 8, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    }
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}},
        indent=2))
    torch.manual_seed(seed + 4)
    model = CLIP(**model_cfg)
    del open_clip
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    # The real checkpoint is a torch.save'd {"state_dict": ...}; mirror it so the loader path
    # (torch.load(weights_only=True)) is the one tested.
    torch.save({"state_dict": sd}, out / HPS_FILES["v2.1"])
    return out


def _tiny_bert_tokenizer(save_dir: Path):
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    save_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = save_dir / "vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n")
    try:  # transformers 5: BertTokenizer(vocab=dict); 4.x: BertTokenizer(vocab_file)
        tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    except TypeError:
        tok = BertTokenizer(str(vocab_file), do_lower_case=True)
    tok.model_max_length = 512
    tok.save_pretrained(str(save_dir))
    return tok


def build_imagereward(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny ImageReward: BLIP ViT (32 px, patch 8, width 32, 2 blocks) + 2-layer med-BERT
    (width 32) + MLP, saved as ``ImageReward.pt`` with ``med_config.json`` and a WordPiece
    tokenizer over single characters."""
    from .imagereward import ImageRewardConfig, ImageRewardModel, init_like_blip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tiny_bert_tokenizer(out / "tokenizer")
    vocab = len(tok) + 2  # + BLIP's [DEC] and [ENC]
    med = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab,
        "encoder_width": 32, "add_cross_attention": True,
    }
    (out / "med_config.json").write_text(json.dumps(med, indent=2))
    extra = {"image_size": TINY_IMAGE_SIZE, "patch_size": 8, "vision_width": 32, "vision_depth": 2,
             "vision_heads": 4, "tokenizer": "tokenizer", "max_length": 35}
    (out / "imagereward_config.json").write_text(json.dumps(extra, indent=2))
    cfg = ImageRewardConfig(**extra, vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed + 5)
    model = ImageRewardModel(cfg)
    init_like_blip(model)
    sd = dict(model.state_dict())
    # What the real ImageReward.pt also carries: BLIP's contrastive projections and position_ids.
    sd["blip.vision_proj.weight"] = torch.randn(16, 32) * 0.02
    sd["blip.vision_proj.bias"] = torch.zeros(16)
    sd["blip.text_proj.weight"] = torch.randn(16, 32) * 0.02
    sd["blip.text_proj.bias"] = torch.zeros(16)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    torch.save({k: v.contiguous() for k, v in sd.items()}, out / "ImageReward.pt")
    return out


def build_ocr(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny TrOCR for ``ocr=DIR``: a transformers ``VisionEncoderDecoderModel`` (ViT 32 px, patch 8,
    width 32, 2 layers -> TrOCR decoder width 32, 2 layers), a ViT image processor and a byte-level
    ``RobertaTokenizer`` over letters, digits and space, saved with ``save_pretrained`` in the layout
    of ``microsoft/trocr-*``. The output projection is scaled up and the special
    tokens' rows zeroed, so greedy decoding spells out image-dependent strings instead of stopping
    at once. Not in :data:`BUILDERS`: the OCR reward needs prompts with a quoted text."""
    from transformers import (
        GenerationConfig,
        RobertaTokenizer,
        TrOCRConfig,
        TrOCRForCausalLM,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
        VisionEncoderDecoderModel,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3, as TrOCR's tokenizers
    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits) + ["\u0120"]  # "Ġ": a space
    vocab = {t: i for i, t in enumerate(specials + chars + ["<mask>"])}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[])
    image_processor = ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=TINY_IMAGE_SIZE, patch_size=8)
    decoder = TrOCRConfig(vocab_size=len(vocab), d_model=32, decoder_layers=2, decoder_attention_heads=4,
                          decoder_ffn_dim=64, max_position_embeddings=64, cross_attention_hidden_size=32,
                          pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.2)
    torch.manual_seed(seed + 6)
    model = VisionEncoderDecoderModel(encoder=ViTModel(encoder), decoder=TrOCRForCausalLM(decoder))
    with torch.no_grad():
        w = model.decoder.output_projection.weight
        w.mul_(10.0)
        w[[vocab[t] for t in specials + ["<mask>"]]] = 0.0
    # TrOCR checkpoints start decoding from </s> (id 2) and pad with id 1
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 2, 1, 2
    model.generation_config = GenerationConfig(decoder_start_token_id=2, pad_token_id=1, eos_token_id=2, bos_token_id=0)
    model.save_pretrained(str(out), safe_serialization=True)
    # the hub TrOCR layout (preprocessor_config.json + tokenizer files), not transformers 5's
    # combined processor_config.json (which the loader reads too)
    image_processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def build_mask2former(out: str | os.PathLike, seed: int = 0, confident: dict[int, float] | None = None) -> Path:
    """Tiny Mask2Former for ``geneval=DIR``: ``Mask2FormerForUniversalSegmentation`` over a tiny Swin
    (embed 16, one block per stage, window 4), 80 COCO labels, 10 queries, hidden 32, random init, with
    its ``Mask2FormerImageProcessor`` (shortest edge 64), saved with ``save_pretrained`` in the layout of
    ``facebook/mask2former-swin-small-coco-instance``. ``confident`` (label -> bias, default person 6.0,
    cat 5.0) raises those labels' class-head biases so the random model reports some detections above
    GenEval's 0.3. Not in :data:`BUILDERS`: GenEval needs metadata rows, not plain prompts."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    from .geneval.detector import require_scipy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=80, hidden_dim=32, encoder_feedforward_dim=64,
                            dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            num_queries=10, mask_feature_size=32, feature_size=32, common_stride=4)
    torch.manual_seed(seed + 7)
    require_scipy()
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        for label, bias in (confident if confident is not None else {0: 6.0, 15: 5.0}).items():
            model.class_predictor.bias[label] = bias
    model.save_pretrained(str(out), safe_serialization=True)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32).save_pretrained(str(out))
    return out


BUILDERS = {
    "clip": build_clip,
    "clipscore": build_clip,  # the reward's name (--reward clipscore=DIR); "clip" is kept for old scripts
    "pickscore": build_pickscore,
    "hpsv2": build_hpsv2,
    "aesthetic": build_aesthetic,
    "imagereward": build_imagereward,
}

# The reward spec name for each tiny kind (``clip`` builds a ``clipscore`` model).
REWARD_FOR_KIND = {"clip": "clipscore", "clipscore": "clipscore", "pickscore": "pickscore", "hpsv2": "hpsv2", "aesthetic": "aesthetic",
                   "imagereward": "imagereward"}


# --------------------------------------------------------------------------------------------
# Toy preference data (Pick-a-Pic v2 schema)
# --------------------------------------------------------------------------------------------

TOY_PROMPTS = ["a red apple", "a sunset over the sea", "a fox in the snow", "a bowl of soup", "a city at night",
               "a small boat", "a garden of flowers", "a mountain lake"]


def toy_pair_images(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(redder, bluer) uint8 HWC images sharing a random texture."""
    base = rng.integers(40, 200, size=(size, size, 3)).astype(np.int16)
    shift = int(rng.integers(30, 60))
    red = base.copy()
    red[..., 0] += shift
    red[..., 2] -= shift
    blue = base.copy()
    blue[..., 0] -= shift
    blue[..., 2] += shift
    return np.clip(red, 0, 255).astype(np.uint8), np.clip(blue, 0, 255).astype(np.uint8)


def write_toy_pairs(path: str | os.PathLike, n: int = 64, seed: int = 0, size: int = 32, tie_fraction: float = 0.0,
                    bad_rows: int = 0) -> Path:
    """Pick-a-Pic-v2-schema parquet where humans always prefer the *redder* image.

    The preferred image sits at position 0 or 1 at random; ``tie_fraction`` of rows are ties
    (0.5/0.5); ``bad_rows`` rows get undecodable ``jpg_1`` bytes (to test skipping).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("ranking_id", "caption", "jpg_0", "jpg_1", "label_0", "label_1",
                                              "image_0_uid", "image_1_uid", "best_image_uid", "are_different",
                                              "has_label")}
    for i in range(n):
        red, blue = toy_pair_images(rng, size)
        red_first = bool(rng.integers(0, 2))
        im0, im1 = (red, blue) if red_first else (blue, red)
        tie = rng.random() < tie_fraction
        l0 = 0.5 if tie else (1.0 if red_first else 0.0)
        rows["ranking_id"].append(i)
        rows["caption"].append(TOY_PROMPTS[i % len(TOY_PROMPTS)])
        rows["jpg_0"].append(jpeg_bytes(im0, quality=95))
        rows["jpg_1"].append(b"not a jpeg" if i < bad_rows else jpeg_bytes(im1, quality=95))
        rows["label_0"].append(l0)
        rows["label_1"].append(1.0 - l0)
        rows["image_0_uid"].append(f"{i}-0")
        rows["image_1_uid"].append(f"{i}-1")
        rows["best_image_uid"].append("" if tie else (f"{i}-0" if l0 == 1.0 else f"{i}-1"))
        rows["are_different"].append(True)
        rows["has_label"].append(True)
    table = pa.table({
        "ranking_id": pa.array(rows["ranking_id"], pa.int64()),
        "caption": pa.array(rows["caption"], pa.string()),
        "jpg_0": pa.array(rows["jpg_0"], pa.binary()),
        "jpg_1": pa.array(rows["jpg_1"], pa.binary()),
        "label_0": pa.array(rows["label_0"], pa.float64()),
        "label_1": pa.array(rows["label_1"], pa.float64()),
        "image_0_uid": pa.array(rows["image_0_uid"], pa.string()),
        "image_1_uid": pa.array(rows["image_1_uid"], pa.string()),
        "best_image_uid": pa.array(rows["best_image_uid"], pa.string()),
        "are_different": pa.array(rows["are_different"], pa.bool_()),
        "has_label": pa.array(rows["has_label"], pa.bool_()),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=max(1, n // 4))
    return path
