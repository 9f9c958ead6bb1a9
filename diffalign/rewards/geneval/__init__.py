"""GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) without mmcv/mmdet: evaluator and reward.

* :mod:`.rules`: the official decision rules as pure functions over detections (thresholds, counting,
  colours, relative positions, exclude clauses; GenEval's ``correct``, Flow-GRPO's exact ``strict`` and a
  ``partial`` score) and the per-task / overall aggregation;
* :mod:`.detector`: the detector interface and its default, transformers' Mask2Former (every place it can
  differ from GenEval's mmdet checkpoint is listed there);
* :mod:`.colors`: the colour classifier interface and its default, CLIP ViT-L/14 zero-shot on masked crops;
* :mod:`.reward`: :class:`GenEvalReward` (``--reward geneval``), which takes each image's metadata row with
  the call or looks its prompt up in ``metadata=PATH``.

Importing this package imports neither transformers nor open_clip.
"""

from .rules import (
    CLASSNAMES,
    COLORS,
    RELATIONS,
    TASKS,
    Detections,
    Judgement,
    Rules,
    box_iou,
    evaluate_detections,
    judge,
    relative_position,
    select_detections,
    summarize,
)

_LAZY = {
    "GenEvalReward": "reward", "GenEvalMetadataError": "reward", "read_metadata": "reward",
    "Mask2FormerDetector": "detector", "masks_to_boxes": "detector",
    "CLIPColorClassifier": "colors", "masked_crops": "colors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY, "CLASSNAMES", "COLORS", "RELATIONS", "TASKS", "Detections", "Judgement", "Rules", "box_iou",
           "evaluate_detections", "judge", "relative_position", "select_detections", "summarize"]
