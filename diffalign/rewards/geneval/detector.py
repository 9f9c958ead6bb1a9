"""GenEval's object detector without mmcv/mmdet: transformers' ``Mask2FormerForUniversalSegmentation``.

A detector is any callable ``detector(images) -> list[dict[str, Detections]]`` (one dict per image,
class name -> :class:`~.rules.Detections` with boxes, scores and masks at the image's own size, sorted by
score). :class:`Mask2FormerDetector` is the default, loading a transformers Mask2Former checkpoint
(``from_pretrained``; default ``facebook/mask2former-swin-small-coco-instance``, or a local directory).

**How it can differ from GenEval's detector** (mmdet 2.x, ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``):

* **Weights.** The transformers hub checkpoints are conversions of the *original* Mask2Former (Detectron2)
  model zoo, not of mmdetection's checkpoint, which mmdet trained itself (LSJ, 50 epochs). Same
  architecture (Swin-S, 100 queries, 80 COCO classes), different weights: detections, hence GenEval numbers,
  differ somewhat. For the official numbers convert mmdet's ``.pth`` into this layout (not done here) or
  serve the official evaluator and use ``--reward remote=URL``.
* **Preprocessing.** ``pipeline="mmdet"`` (default) does mmdet's test pipeline in torch: the image quantised
  to uint8 (GenEval reads PNGs), resized keeping its aspect ratio to fit 1333x800 (scale
  ``min(1333/long, 800/short)``, size rounded to nearest, bilinear, rounded back to uint8 values),
  normalised with the checkpoint's ``image_mean``/``image_std`` (ImageNet's in both), zero-padded
  bottom/right to a multiple of 32 (and to the largest image of the batch). mmcv resizes with OpenCV's
  bilinear and torch's bilinear (no antialias) is used here: pixel values can differ by rounding.
  ``pipeline="transformers"`` uses the checkpoint's image processor as it is (read its
  ``preprocessor_config.json``: the hub checkpoints' size is, as far as we know, a 384 shortest edge, far
  from mmdet's 800 -- not verified offline), and that processor rounds the size *up* to a multiple of 32
  by resizing, not by padding.
* **Post-processing / scores.** Both pipelines score a (query, class) pair as mmdet does:
  ``softmax(class logits)[class] * mean(sigmoid(mask logits) over the mask's pixels)``, the mask being
  ``logit > 0``, over the top 100 (query, class) pairs. ``pipeline="mmdet"`` computes masks as mmdet: mask
  logits upsampled (bilinear) to the padded input, cropped to the resized image, upsampled to the original
  size, then thresholded and scored there. ``pipeline="transformers"`` calls the processor's
  ``post_process_instance_segmentation`` (``return_binary_maps=True``): it upsamples the logits to a fixed
  384x384 (ignoring padding), thresholds and scores at 384x384, and resizes the binary masks to the image
  size by nearest neighbour; it keeps ``score >= threshold`` and rounds scores to 6 decimals.
* **Boxes** are the masks' extents as mmdet's ``mask2bbox``: ``x0, y0`` the first pixel, ``x1, y1`` the
  last pixel + 1; an empty mask gets a zero box (its score is 0).
* **Thresholds** are not applied here beyond ``min_score`` (detections with score <= ``min_score`` are
  dropped to save memory; keep it at or below the smallest GenEval threshold, 0.3); GenEval's rules are
  :func:`~.rules.select_detections`.
* **Class names**: an 80-label checkpoint's label ``i`` is GenEval's ``CLASSNAMES[i]`` (COCO order; the hub
  checkpoints' ``id2label`` spells a few differently, e.g. ``mouse`` for ``computer mouse``); other
  checkpoints use their ``id2label``.

transformers builds Mask2Former's training loss (Hungarian matching, which needs scipy) in the model's
constructor, so scipy (in the ``rewards`` extra) is needed even for inference: without it, one clear error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...errors import UserError
from ..base import resolve_device
from .rules import CLASSNAMES, Detections

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
PIPELINES = ("mmdet", "transformers")
MMDET_SCALE = (1333, 800)  # mmdet test pipeline: Resize(img_scale=(1333, 800), keep_ratio=True)
SIZE_DIVISOR = 32
MAX_PER_IMAGE = 100        # mmdet test_cfg.max_per_image

def require_scipy() -> None:
    """transformers builds Mask2Former's training loss (scipy's Hungarian matching) in its
    constructor, so even inference needs scipy: one clear line when it is missing."""
    if importlib.util.find_spec("scipy") is None:
        raise UserError("the GenEval detector (transformers' Mask2Former) needs scipy: pip install 'diffalign[rewards]' "
                        "(or: pip install scipy)")


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's ``mask2bbox``: ``[N,H,W]`` bool -> ``[N,4]`` (x0, y0, last x + 1, last y + 1); empty -> zeros."""
    n = masks.shape[0]
    boxes = torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    xs, ys = masks.any(dim=1), masks.any(dim=2)  # [N,W], [N,H]
    w, h = xs.shape[1], ys.shape[1]
    ar_w = torch.arange(w, device=masks.device)
    ar_h = torch.arange(h, device=masks.device)
    x0 = torch.where(xs, ar_w, w).min(dim=1).values
    x1 = torch.where(xs, ar_w, -1).max(dim=1).values + 1
    y0 = torch.where(ys, ar_h, h).min(dim=1).values
    y1 = torch.where(ys, ar_h, -1).max(dim=1).values + 1
    boxes[:] = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~xs.any(dim=1)] = 0
    return boxes


def _to_uint8_batch(images) -> list[torch.Tensor]:
    """``[B,3,H,W]`` in [0,1] (or a list of ``[3,H,W]``) -> list of ``[3,H,W]`` uint8 (rounded)."""
    return [(img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8) for img in images]


def _group(labels: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, names: Sequence[str]) -> dict[str, Detections]:
    """Per-candidate labels/scores/masks -> class name -> Detections sorted by score (stable)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    labels, scores, masks = labels[order], scores[order], masks[order]
    boxes = masks_to_boxes(masks)
    out: dict[str, Detections] = {}
    for lab in dict.fromkeys(labels.tolist()):
        sel = (labels == lab).nonzero().flatten()
        out[names[lab]] = Detections(boxes[sel].cpu(), scores[sel].float().cpu(), masks[sel].cpu())
    return out


class Mask2FormerDetector:
    """A transformers Mask2Former instance-segmentation checkpoint as a GenEval detector:
    ``detector(images) -> list[dict[str, Detections]]`` (images ``[B,3,H,W]`` in [0,1], a list of
    ``[3,H,W]``, or PIL images), batched by ``batch_size``. See the module docstring for ``pipeline``."""

    def __init__(self, model: str = DEFAULT_DETECTOR, *, device=None, dtype: str | torch.dtype | None = None,
                 batch_size: int = 8, pipeline: str = "mmdet", min_score: float = 0.3,
                 classnames: Sequence[str] | None = None):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from ..clip import resolve_dtype
        from ..weights import load_pretrained

        if pipeline not in PIPELINES:
            raise UserError(f"geneval: pipeline must be one of {', '.join(PIPELINES)}, not {pipeline!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = max(1, int(batch_size))
        self.pipeline = pipeline
        self.min_score = float(min_score)
        hint = "--reward geneval=/path/to/mask2former_dir"
        require_scipy()
        model_obj = load_pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, model, "geneval", hint)
        self.model = model_obj.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, model, "geneval", hint)
        num_labels = int(self.model.config.num_labels)
        if classnames is not None:
            names = list(classnames)
        elif num_labels == len(CLASSNAMES):
            names = list(CLASSNAMES)
        else:
            names = [self.model.config.id2label[i] for i in range(num_labels)]
        if len(names) != num_labels:
            raise UserError(f"geneval: {len(names)} class names for a detector with {num_labels} labels")
        self.classnames = names
        scale = getattr(self.processor, "rescale_factor", 1 / 255)
        mean = torch.tensor(self.processor.image_mean, dtype=torch.float32) / (255 * scale)
        std = torch.tensor(self.processor.image_std, dtype=torch.float32) / (255 * scale)
        # mean/std on the 0..255 scale (mmdet's Normalize works on 0..255 pixels)
        self._mean = (mean * 255).view(3, 1, 1).to(self.device)
        self._std = (std * 255).view(3, 1, 1).to(self.device)

    # -- preprocessing -----------------------------------------------------------------------
    def _mmdet_inputs(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        long_max, short_max = MMDET_SCALE
        resized, sizes = [], []
        for img in images:
            h, w = img.shape[-2:]
            s = min(long_max / max(h, w), short_max / min(h, w))
            nh, nw = int(h * s + 0.5), int(w * s + 0.5)
            x = img.to(self.device, torch.float32).unsqueeze(0)
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False).round().clamp(0, 255)
            resized.append(((x[0] - self._mean) / self._std))
            sizes.append((nh, nw))
        ph = max(-(-h // SIZE_DIVISOR) * SIZE_DIVISOR for h, _ in sizes)
        pw = max(-(-w // SIZE_DIVISOR) * SIZE_DIVISOR for _, w in sizes)
        batch = torch.zeros(len(images), 3, ph, pw, device=self.device)
        mask = torch.zeros(len(images), ph, pw, dtype=torch.long, device=self.device)
        for i, (x, (h, w)) in enumerate(zip(resized, sizes)):
            batch[i, :, :h, :w] = x
            mask[i, :h, :w] = 1
        return batch.to(self.dtype), mask, sizes

    # -- post-processing (mmdet's order) --------------------------------------------------------
    def _mmdet_postprocess(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                           size: tuple[int, int], original: tuple[int, int]) -> dict[str, Detections]:
        num_classes = class_logits.shape[-1] - 1
        probs = class_logits.float().softmax(-1)[:, :-1]
        k = min(MAX_PER_IMAGE, probs.numel())
        top, idx = probs.flatten().topk(k, sorted=False)
        queries, labels = idx // num_classes, idx % num_classes
        # det score = class prob * mask score <= class prob: candidates at or under min_score cannot pass
        keep = top > self.min_score
        top, queries, labels = top[keep], queries[keep], labels[keep]
        h0, w0 = original
        if top.numel() == 0:
            return {}
        uq, inverse = torch.unique(queries, return_inverse=True)
        logits = mask_logits[uq].float().unsqueeze(0)
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        logits = logits[:, :, : size[0], : size[1]]
        logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False)[0]
        binary = logits > 0
        mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = top * mask_scores[inverse]
        masks = binary[inverse]
        keep = scores > self.min_score
        return _group(labels[keep], scores[keep], masks[keep], self.classnames)

    def _transformers_postprocess(self, outputs, sizes: list[tuple[int, int]]) -> list[dict[str, Detections]]:
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.min_score, return_binary_maps=True, target_sizes=sizes)
        out = []
        for res in results:
            segs = res["segments_info"]
            keep = [i for i, s in enumerate(segs) if s["score"] > self.min_score]
            if not keep:  # (with no segment at all, "segmentation" is a -1 map, not binary maps)
                out.append({})
                continue
            masks = res["segmentation"][keep].bool()
            labels = torch.tensor([segs[i]["label_id"] for i in keep], dtype=torch.long)
            scores = torch.tensor([segs[i]["score"] for i in keep], dtype=torch.float32)
            out.append(_group(labels, scores, masks.cpu(), self.classnames))
        return out

    @torch.inference_mode()
    def __call__(self, images) -> list[dict[str, Detections]]:
        if not isinstance(images, torch.Tensor) and images and not isinstance(images[0], torch.Tensor):
            from ..base import to_image_tensor
            images = to_image_tensor(list(images))
        u8 = _to_uint8_batch(images)
        out: list[dict[str, Detections]] = []
        for start in range(0, len(u8), self.batch_size):
            chunk = u8[start:start + self.batch_size]
            originals = [tuple(x.shape[-2:]) for x in chunk]
            if self.pipeline == "mmdet":
                pixels, pixel_mask, sizes = self._mmdet_inputs(chunk)
                outputs = self.model(pixel_values=pixels, pixel_mask=pixel_mask)
                for i in range(len(chunk)):
                    out.append(self._mmdet_postprocess(outputs.class_queries_logits[i], outputs.masks_queries_logits[i],
                                                       tuple(pixels.shape[-2:]), sizes[i], originals[i]))
            else:
                arrays = [x.permute(1, 2, 0).cpu().numpy() for x in chunk]
                inputs = self.processor(images=arrays, return_tensors="pt")
                outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                                     pixel_mask=inputs["pixel_mask"].to(self.device))
                outputs.class_queries_logits = outputs.class_queries_logits.float()
                outputs.masks_queries_logits = outputs.masks_queries_logits.float()
                out.extend(self._transformers_postprocess(outputs, originals))
        return out
