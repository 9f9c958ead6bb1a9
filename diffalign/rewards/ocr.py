"""OCR reward (``--reward ocr`` / ``ocr=PATH``): does the image show the text the prompt asks for?

The convention is Flow-GRPO's OCR task (``flow_grpo/ocr.py``, ``OcrScorer``, in
github.com/yifan123/flow_grpo):

* **target**: the text between the first pair of ASCII double quotes in the prompt
  (``'a shop sign that says "Open 24 Hours"'`` -> ``Open 24 Hours``). Flow-GRPO takes
  ``prompt.split('"')[1]``; we require a closing quote (with a single ``"`` Flow-GRPO would take the
  rest of the prompt, we treat it as no target). Curly quotes are not quotes here, as there.
* **normalisation** (both target and recognised text, as Flow-GRPO): every space character ``' '``
  is removed and the text is lowercased (``str.lower``). Punctuation, digits and other whitespace
  are kept.
* **score**: ``1`` when the normalised target occurs in the normalised recognised text (extra text
  around it is not penalised, as in Flow-GRPO); otherwise
  ``1 - min(d, n) / n`` with ``d`` the Levenshtein distance (unit-cost insert/delete/substitute)
  between recognised text and target and ``n = max(len(target), 1)``: in ``[0, 1]``, 0 once the
  distance reaches the target's length. An empty target (``""`` in the prompt) is scored by the
  same formula without the substring rule: 1 when nothing is recognised, else 0.
* **no target** (a prompt without a quoted text): Flow-GRPO crashes (``IndexError``). Here
  ``missing_text="error"`` (default) raises a :class:`~diffalign.errors.UserError` naming the
  prompt -- an OCR prompt set without the text to render is a data bug, and a silent 0 would drag
  mean rewards and evaluation numbers down without anyone noticing. ``missing_text="zero"`` scores
  such images 0 (skipping recognition) and warns once per distinct prompt with the running count;
  use it for mixed prompt sets where only some prompts ask for text (GRPO's per-prompt advantage
  normalisation makes a constant 0 within a group a no-op there).

Edit distance comes from ``rapidfuzz`` (in the ``rewards`` extra: ``pip install 'diffalign[rewards]'``);
Flow-GRPO uses ``Levenshtein.distance``, which is the same distance (python-Levenshtein is built on
rapidfuzz).

The recogniser is pluggable: anything callable as ``recognizer(images: list[PIL.Image.Image]) ->
list[str]`` (RGB images, one string per image). The default, :class:`TransformersOCR`, is a
transformers ``VisionEncoderDecoderModel`` + processor (TrOCR and checkpoints of the same layout),
loaded with ``from_pretrained`` from ``ocr=PATH`` (a directory or a hub id; default
``microsoft/trocr-base-printed``) and run batched with greedy decoding. TrOCR recognises *one text
line*: it fits images whose text is a single line filling much of the frame. For scenes with text
anywhere (Flow-GRPO's task), plug a detector+recogniser engine (PaddleOCR, as Flow-GRPO does),
e.g. ``OCRReward(recognizer=my_engine)`` or, from a config, ``recognizer: "mypkg.ocr:engine"``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import UserError
from ..logging import warn
from .base import Reward, RewardOutput, resolve_callable, resolve_device

Recognizer = Callable[[list], list]

#: the default recogniser checkpoint (printed text, one line per image)
DEFAULT_OCR_MODEL = "microsoft/trocr-base-printed"
#: the target text: the first pair of ASCII double quotes (Flow-GRPO: ``prompt.split('"')[1]``)
QUOTED = re.compile(r'"([^"]*)"')
MISSING_TEXT = ("error", "zero")
OCR_EXTRA_HINT = "pip install 'diffalign[rewards]'  (or: pip install rapidfuzz)"


class OCRTargetError(UserError, ValueError):
    """A prompt without a quoted target text: bad input (the reward server answers it with 400)."""


def target_text(prompt: str) -> str | None:
    """The text inside the first pair of ``"`` in ``prompt``, or None when there is none."""
    m = QUOTED.search(prompt)
    return None if m is None else m.group(1)


def normalize_text(text: str, *, lowercase: bool = True, strip_spaces: bool = True) -> str:
    """Flow-GRPO's normalisation: drop every ``' '`` and lowercase (each switchable)."""
    if strip_spaces:
        text = text.replace(" ", "")
    if lowercase:
        text = text.lower()
    return text


def _levenshtein():
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError:
        raise UserError(f"reward 'ocr' needs the rapidfuzz package for edit distances: {OCR_EXTRA_HINT}") from None
    return Levenshtein


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit costs) between ``a`` and ``b`` (rapidfuzz)."""
    return int(_levenshtein().distance(a, b))


def ocr_score(recognized: str, target: str, *, lowercase: bool = True, strip_spaces: bool = True,
              substring_match: bool = True) -> tuple[float, int]:
    """``(score, distance)`` of recognised text against the target (see the module docstring):
    ``score = 1 - min(d, n) / n`` with ``n = max(len(target), 1)`` after normalisation, and ``d = 0``
    when ``substring_match`` and the (non-empty) target occurs in the recognised text."""
    rec = normalize_text(recognized, lowercase=lowercase, strip_spaces=strip_spaces)
    tgt = normalize_text(target, lowercase=lowercase, strip_spaces=strip_spaces)
    n = max(len(tgt), 1)
    if substring_match and tgt and tgt in rec:
        d = 0
    else:
        d = min(edit_distance(rec, tgt), n)
    return 1.0 - d / n, d


def to_pil_images(images) -> list:
    """``[B,3,H,W]`` (or a list of ``[3,H,W]``) in [0,1] -> RGB PIL images (uint8 after rounding)."""
    import numpy as np
    from PIL import Image

    out = []
    for img in images:
        arr = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        out.append(Image.fromarray(np.ascontiguousarray(arr)))
    return out


class TransformersOCR:
    """A transformers ``VisionEncoderDecoderModel`` (TrOCR layout) + its processor as a recogniser:
    ``ocr(images) -> list[str]``, batched, greedy (or ``num_beams``) decoding.

    ``model`` is a local directory or a hub id holding ``config.json``, the weights, the image
    processor (``preprocessor_config.json``, or a combined ``processor_config.json``) and the
    tokenizer, as the TrOCR checkpoints ship them; ``processor`` overrides where those two are read from.
    """

    def __init__(self, model: str = DEFAULT_OCR_MODEL, processor: str | None = None, *, device=None,
                 dtype: str | torch.dtype | None = None, max_new_tokens: int = 64, num_beams: int = 1,
                 batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

        from .clip import resolve_dtype
        from .weights import load_pretrained

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = int(max_new_tokens)
        self.num_beams = int(num_beams)
        self.batch_size = max(1, int(batch_size))
        hint = "--reward ocr=/path/to/trocr_dir"
        self.model = load_pretrained(VisionEncoderDecoderModel.from_pretrained, model, "ocr", hint)
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        # image processor and tokenizer separately: hub TrOCR repos ship preprocessor_config.json +
        # tokenizer files, transformers 5's processor.save_pretrained one processor_config.json; both load
        self.image_processor = load_pretrained(AutoImageProcessor.from_pretrained, processor or model, "ocr", hint)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, processor or model, "ocr", hint)
        # the length limit is max_new_tokens; a checkpoint's max_length would make transformers warn on every call
        self.model.generation_config.max_length = None
        if self.model.generation_config.decoder_start_token_id is None and \
                self.model.config.decoder_start_token_id is None:
            raise UserError(f"ocr: model '{model}' sets no decoder_start_token_id in its config or "
                            "generation_config.json, so it cannot generate text")

    @torch.inference_mode()
    def __call__(self, images: Sequence) -> list[str]:
        texts: list[str] = []
        images = list(images)
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            pixels = self.image_processor(images=chunk, return_tensors="pt").pixel_values
            ids = self.model.generate(pixel_values=pixels.to(self.device, self.dtype),
                                      max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                      do_sample=False)
            texts.extend(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        return [t.strip() for t in texts]


def resolve_recognizer(spec: Any) -> Recognizer:
    """A recogniser: a callable images -> list[str], or ``"module:attr"`` naming one."""
    return resolve_callable(spec, "ocr", "recognizer")


class OCRReward(Reward):
    """``1 - normalised edit distance`` between the prompt's quoted text and the text recognised
    in the image, in ``[0, 1]`` (Flow-GRPO's OCR reward; conventions in the module docstring).

    ``model``/``processor``: the default recogniser's checkpoint (:class:`TransformersOCR`);
    ``recognizer``: any other engine (a callable or ``"module:attr"``), which replaces it.
    ``lowercase``/``strip_spaces``/``substring_match``: the Flow-GRPO conventions, each on by default.
    ``missing_text``: ``"error"`` (default) or ``"zero"`` for prompts without a quoted text.
    :meth:`recognize` returns the recognised strings, for inspecting what the engine reads.
    """

    name = "ocr"
    needs_prompt = True
    differentiable = False
    units = "1 - edit distance / target length"

    def __init__(self, model: str | None = DEFAULT_OCR_MODEL, processor: str | None = None, *,
                 recognizer: Recognizer | str | None = None, batch_size: int = 16, device=None,
                 dtype: str | torch.dtype | None = None, max_new_tokens: int = 64, num_beams: int = 1,
                 lowercase: bool = True, strip_spaces: bool = True, substring_match: bool = True,
                 missing_text: str = "error"):
        super().__init__(batch_size=batch_size, device=device)
        if missing_text not in MISSING_TEXT:
            raise UserError(f"reward 'ocr': missing_text must be one of {', '.join(MISSING_TEXT)}, "
                            f"not {missing_text!r}")
        self.model_name = model or DEFAULT_OCR_MODEL
        self.processor_name = processor
        self.recognizer: Recognizer | None = None if recognizer is None else resolve_recognizer(recognizer)
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.lowercase = lowercase
        self.strip_spaces = strip_spaces
        self.substring_match = substring_match
        self.missing_text = missing_text
        self._missing_seen: set[str] = set()
        self._missing_count = 0
        self._warn_lock = threading.Lock()

    def load(self) -> None:
        _levenshtein()  # fail at load (before a server binds its port), not on the first request
        if self.recognizer is None:
            self.recognizer = TransformersOCR(self.model_name, self.processor_name, device=self.device,
                                              dtype=self.dtype, max_new_tokens=self.max_new_tokens,
                                              num_beams=self.num_beams, batch_size=self.batch_size)

    def recognize(self, images) -> list[str]:
        """The recogniser's text for each image (``[B,3,H,W]`` in [0,1], or a list of ``[3,H,W]``)."""
        self.ensure_loaded()
        assert self.recognizer is not None
        pil = to_pil_images(images)
        texts = self.recognizer(pil) if pil else []
        if not isinstance(texts, (list, tuple)) or len(texts) != len(pil) or \
                not all(isinstance(t, str) for t in texts):
            got = type(texts).__name__ + (f" of {len(texts)}" if isinstance(texts, (list, tuple)) else "")
            raise UserError(f"reward 'ocr': the recognizer must return one string per image; got {got} "
                            f"for {len(pil)} images")
        return list(texts)

    def _note_missing(self, prompts: list[str]) -> None:
        with self._warn_lock:
            self._missing_count += len(prompts)
            new = [p for p in dict.fromkeys(prompts) if p not in self._missing_seen]
            self._missing_seen.update(new)
            total = self._missing_count
        for p in new:
            warn(f"reward 'ocr': prompt {p[:80]!r} has no text in double quotes; scored 0 "
                 f"(missing_text=zero; {total} such images so far)")

    def score_batch(self, images, prompts, metadata):
        assert prompts is not None
        targets = [target_text(p) for p in prompts]
        missing = [p for p, t in zip(prompts, targets) if t is None]
        if missing:
            if self.missing_text == "error":
                raise OCRTargetError(
                    f"reward 'ocr': prompt {missing[0][:120]!r} has no text in double quotes "
                    f"({len(missing)} of {len(prompts)} prompts in this batch); OCR prompts name the text to "
                    'render between double quotes, e.g. \'a sign that says "OPEN"\' (Flow-GRPO\'s convention); '
                    "pass missing_text=zero to score such images 0")
            self._note_missing(missing)
        keep = [i for i, t in enumerate(targets) if t is not None]
        texts = self.recognize([images[i] for i in keep]) if keep else []
        scores = torch.zeros(len(prompts), dtype=torch.float32)  # 0 for prompts without a target
        for i, text in zip(keep, texts):
            tgt = targets[i]
            assert tgt is not None
            scores[i] = ocr_score(text, tgt, lowercase=self.lowercase, strip_spaces=self.strip_spaces,
                                  substring_match=self.substring_match)[0]
        return RewardOutput(scores, {self.name: scores})
