"""``GenEvalReward`` (``--reward geneval`` / ``geneval=DETECTOR_DIR``): GenEval's verdict per image.

**Metadata.** Each image is judged against a GenEval metadata row (``{"tag", "include", "exclude"?,
"prompt"}``, the rows of GenEval's ``prompts/evaluation_metadata.jsonl``). A row reaches the reward in one
of two ways, tried in this order:

1. per-image ``metadata`` passed with the call (``reward(images, prompts, metadata=[row, ...])``): a dict
   with an ``include`` list is used as the row. The GRPO trainers pass the rows of a ``.jsonl`` prompt file
   this way, so ``data: evaluation_metadata.jsonl`` works as it is; so does the reward server's
   ``"metadata"`` field;
2. else the prompt is looked up in the table given as ``metadata=PATH`` (a ``.jsonl`` of rows, e.g.
   GenEval's own file) or ``metadata=[row, ...]`` at construction.

A prompt found in neither raises :class:`GenEvalMetadataError` (a ``UserError`` and ``ValueError``: the
reward server answers it with 400), naming the prompt: a reward that silently scored 0 would drag means down
unnoticed.

**Scores.** ``score="correct"`` (default): GenEval's all-or-nothing benchmark verdict, 1.0 or 0.0.
``score="strict"``: Flow-GRPO's exact-count verdict. ``score="partial"``: the fraction of requirements met
(Flow-GRPO trains on its unclipped version; see :mod:`.rules`). All three are in the details
(``geneval_correct``, ``geneval_strict``, ``geneval_partial``) whatever ``score`` is. :meth:`judge` returns
the full :class:`~.rules.Judgement` per image (with the reasons), and :meth:`evaluate` GenEval's summary
(per-task accuracy and overall).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from ..base import Reward, RewardOutput, resolve_callable, to_image_tensor
from .colors import CLIPColorClassifier, to_pil
from .detector import DEFAULT_DETECTOR, Mask2FormerDetector
from .rules import Detections, Judgement, Rules, judge, select_detections, summarize

SCORES = ("correct", "strict", "partial")


class GenEvalMetadataError(UserError, ValueError):
    """An image without a GenEval metadata row (bad input: the reward server answers it with 400)."""


def read_metadata(source: str | os.PathLike | Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """prompt -> metadata row, from a ``.jsonl`` file (GenEval's ``evaluation_metadata.jsonl``; a ``.json``
    list also works) or a list of rows. Rows need ``prompt`` and ``include``; a prompt given twice with
    different rows is an error."""
    where = "metadata"
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(source)))
        where = f"metadata file '{source}'"
        if not path.is_file():
            raise UserError(f"reward 'geneval': {where} does not exist (GenEval's prompts/evaluation_metadata.jsonl)")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"reward 'geneval': {where} line {i} is not JSON: {e}") from None
    else:
        rows = list(source)
    table: dict[str, dict] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "prompt" not in row or "include" not in row:
            raise UserError(f"reward 'geneval': {where} row {i + 1} needs 'prompt' and 'include' (GenEval's schema)")
        prompt = str(row["prompt"])
        if prompt in table and table[prompt] != dict(row):
            raise UserError(f"reward 'geneval': {where} gives prompt {prompt!r} two different rows")
        table[prompt] = dict(row)
    return table


class GenEvalReward(Reward):
    """GenEval (Ghosh et al. 2023) as a reward: detect objects (Mask2Former), classify colours (CLIP),
    judge against the prompt's metadata row. Conventions in :mod:`.rules`, :mod:`.detector`, :mod:`.colors`
    and this module's docstring.

    ``model``: the detector checkpoint (``geneval=DIR``; default ``facebook/mask2former-swin-small-coco-instance``);
    ``metadata``: a ``.jsonl`` path or rows (prompt lookup); ``score``: ``correct``/``strict``/``partial``;
    ``color_model``/``color_backend``/``color_pretrained``: the CLIP colour classifier;
    ``detector``/``color_classifier``: other engines (callables or ``"module:attr"``) replacing the defaults;
    ``pipeline``: ``mmdet`` (default) or ``transformers`` pre/post-processing; ``threshold``,
    ``counting_threshold``, ``max_objects``, ``max_overlap``, ``position_threshold``: GenEval's options;
    ``flow_grpo_partial``: Flow-GRPO's unclipped partial score.
    """

    name = "geneval"
    needs_prompt = True
    differentiable = False
    units = "GenEval verdict (1 correct, 0 not)"

    def __init__(self, model: str | None = None, *, metadata: str | os.PathLike | Sequence[Mapping] | None = None,
                 score: str = "correct", detector: Any = None, color_classifier: Any = None,
                 color_model: str | None = None, color_backend: str = "transformers", color_pretrained: str | None = None,
                 pipeline: str = "mmdet", batch_size: int = 8, device=None, dtype: str | torch.dtype | None = None,
                 threshold: float = 0.3, counting_threshold: float = 0.9, max_objects: int = 16,
                 max_overlap: float = 1.0, position_threshold: float = 0.1, bgcolor: str = "#999",
                 flow_grpo_partial: bool = False):
        super().__init__(batch_size=batch_size, device=device)
        if score not in SCORES:
            raise UserError(f"reward 'geneval': score must be one of {', '.join(SCORES)}, not {score!r}")
        self.score_kind = score
        if score == "partial":
            self.units = "fraction of GenEval requirements met"
        self.model_name = model or DEFAULT_DETECTOR
        self.metadata_source = metadata
        self.table: dict[str, dict] = {} if metadata is None else read_metadata(metadata)
        self.detector = resolve_callable(detector, "geneval", "detector")
        self.color_classifier = resolve_callable(color_classifier, "geneval", "color_classifier")
        self.color_model, self.color_backend, self.color_pretrained = color_model, color_backend, color_pretrained
        self.pipeline, self.dtype, self.bgcolor = pipeline, dtype, bgcolor
        self.rules = Rules(float(threshold), float(counting_threshold), int(max_objects), float(max_overlap),
                           float(position_threshold))
        self.flow_grpo_partial = bool(flow_grpo_partial)

    def load(self) -> None:
        if self.detector is None:
            self.detector = Mask2FormerDetector(
                self.model_name, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                pipeline=self.pipeline, min_score=min(self.rules.threshold, self.rules.counting_threshold))
        if self.color_classifier is None:
            self.color_classifier = CLIPColorClassifier(
                self.color_model, backend=self.color_backend, pretrained=self.color_pretrained,
                device=self.device, dtype=self.dtype, bgcolor=self.bgcolor)

    # -- metadata ---------------------------------------------------------------------------------
    def rows_for(self, prompts: Sequence[str], metadata: Sequence[Any] | None = None) -> list[dict]:
        """The metadata row of each image (see the module docstring); raises :class:`GenEvalMetadataError`."""
        rows = []
        for i, prompt in enumerate(prompts):
            given = None if metadata is None else metadata[i]
            if isinstance(given, Mapping) and "include" in given:
                rows.append(dict(given))
                continue
            row = self.table.get(prompt)
            if row is None:
                if not self.table:
                    raise GenEvalMetadataError(
                        f"reward 'geneval': no GenEval metadata for prompt {prompt[:120]!r}: pass metadata rows with "
                        "the images (a .jsonl prompt file's rows, as GenEval's evaluation_metadata.jsonl) or build the "
                        "reward with metadata=PATH to look prompts up")
                src = self.metadata_source if isinstance(self.metadata_source, (str, os.PathLike)) else "the rows given"
                raise GenEvalMetadataError(
                    f"reward 'geneval': prompt {prompt[:120]!r} is not in {src} ({len(self.table)} prompts); "
                    "GenEval judges only prompts with a metadata row")
            rows.append(row)
        return rows

    # -- judging ----------------------------------------------------------------------------------
    def _detect(self, images) -> list[dict[str, Detections]]:
        assert self.detector is not None
        found = self.detector(images)
        if not isinstance(found, (list, tuple)) or len(found) != len(images):
            raise UserError(f"reward 'geneval': the detector must return one dict per image; got "
                            f"{type(found).__name__} for {len(images)} images")
        return list(found)

    def _judge_batch(self, images, rows: list[dict]) -> list[Judgement]:
        detections = self._detect(images)
        out = []
        for img, dets, row in zip(images, detections, rows):
            pil = []

            def color_fn(cls: str, group: Detections, img=img, pil=pil) -> list[str]:
                if not pil:
                    pil.append(to_pil(img))
                assert self.color_classifier is not None
                return list(self.color_classifier(pil[0], group, cls))

            selected = select_detections(dets, row.get("tag"), self.rules)
            out.append(judge(selected, row, color_fn, self.rules, flow_grpo_partial=self.flow_grpo_partial))
        return out

    def judge(self, images, prompts: Sequence[str] | str, metadata: Any = None) -> list[Judgement]:
        """The :class:`~.rules.Judgement` of each image (verdicts, partial score, reasons)."""
        images = to_image_tensor(images)
        n = len(images)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if isinstance(metadata, Mapping):
            metadata = [metadata] * n
        self.ensure_loaded()
        rows = self.rows_for(prompts, metadata)
        with torch.inference_mode():
            return [j for s in range(0, n, self.batch_size)
                    for j in self._judge_batch(images[s:s + self.batch_size], rows[s:s + self.batch_size])]

    def evaluate(self, images, prompts: Sequence[str] | str, metadata: Any = None) -> dict[str, Any]:
        """GenEval's summary (:func:`~.rules.summarize`) of these images: per-task accuracy and overall."""
        return summarize(self.judge(images, prompts, metadata))

    def score_batch(self, images, prompts, metadata):
        assert prompts is not None
        rows = self.rows_for(prompts, metadata)
        judgements = self._judge_batch(images, rows)
        details = {
            "geneval_correct": torch.tensor([float(j.correct) for j in judgements]),
            "geneval_strict": torch.tensor([float(j.strict) for j in judgements]),
            "geneval_partial": torch.tensor([j.partial for j in judgements], dtype=torch.float32),
        }
        scores = details[f"geneval_{self.score_kind}"].clone()
        return RewardOutput(scores, {self.name: scores, **details})
