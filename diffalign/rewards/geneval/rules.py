"""GenEval's decision rules over detections, written from the official evaluator's rules.

Sources (facts and thresholds; the code here is our own):

* GenEval, ``evaluation/evaluate_images.py`` and ``evaluation/summary_scores.py`` in
  github.com/djghosh13/geneval (Ghosh et al. 2023);
* Flow-GRPO's GenEval reward server, ``reward_server/gen_eval.py`` in github.com/yifan123/reward-server
  (``evaluate_reward``: the exact-count ``strict_correct`` and the partial ``score`` Flow-GRPO trains on).

**Selecting detections** (per image, per class; :func:`select_detections`): sort by score, highest
first; keep scores strictly above the threshold (``0.3``; ``0.9`` for images whose metadata ``tag`` is
``counting``); keep at most ``max_objects = 16``; then greedy suppression of boxes overlapping a kept one
with IoU >= ``max_overlap`` -- off by default (``max_overlap = 1.0``, as GenEval's; IoU with the ``+1``
pixel convention when on). Classes left empty are dropped.

**Judging** an image against its metadata row (``{"tag", "include": [...], "exclude"?: [...], "prompt"}``;
:func:`judge`), ``include`` clauses are ANDed, ``exclude`` clauses ORed:

* ``correct`` (GenEval's benchmark rule): for each include clause ``{"class": c, "count": n}``, at least
  ``n`` objects of ``c``; the first ``n`` (most confident) are the clause's group. With ``"color": k``, at
  least ``n`` of that group classified ``k``. With ``"position": [rel, j]``, every object of the group must
  stand in relation ``rel`` to every object of include clause ``j``'s group (a clause that failed has no
  group: the position clause fails). An exclude clause ``{"class": c, "count": m}`` fails when ``m`` or more
  ``c`` were kept (counting prompts exclude ``n + 1``: no more than ``n``).
* ``strict`` (Flow-GRPO's ``strict_correct``): as ``correct`` but counts must be *exact* (``== n``, so two
  cats fail "a photo of a cat"), all ``n`` objects must have the colour, and exclude clauses are not read
  (the exact count already bounds them for GenEval's prompts).
* ``partial`` in [0, 1] (after Flow-GRPO's ``score``): the mean over the requirements of an image of one
  term each: per include clause a count term ``max(0, 1 - |found - n| / n)``; a colour clause adds
  ``max(0, 1 - |n_colour - n| / n)`` when the count is exact, else 0; a position clause adds 1 when the count
  is exact and every pair is in relation, else 0. Two deliberate departures from Flow-GRPO, undone by
  ``flow_grpo_partial=True``: Flow-GRPO does not clip the count terms (``found > 2n`` gives negative terms),
  and after a failed position check it appends a ``1.0`` besides the ``0.0``.

**Relative position** (:func:`relative_position`, A relative to B, boxes ``x0, y0, x1, y1``): offset of the
box centres ``o = c_A - c_B``; each axis is shrunk towards 0 by the margin ``0.1 * (size_A + size_B)`` along
that axis (clipped at 0, sign kept); when both shrunk components are below ``1e-3`` there is no relation;
otherwise, divided by ``|o|`` (the *unshrunk* offset's length), ``x < -0.5`` is "left of", ``x > 0.5``
"right of", ``y < -0.5`` "above", ``y > 0.5`` "below" (image y grows downwards). Objects within the margin
are in no relation: "inside the margin" is wrong.

**Aggregation** (:func:`summarize`): per task (the metadata ``tag``) the mean of ``correct`` over its images;
``overall`` the mean of the task accuracies over the tasks present (GenEval's ``summary_scores.py``; with
all six present: ``single_object, two_object, counting, colors, position, color_attr``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: GenEval's colour names, in its order (ties in the classifier's argmax go to the earlier one)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: GenEval's six tasks (metadata ``tag``)
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
#: the relations a ``position`` clause can ask for
RELATIONS = ("left of", "right of", "above", "below")
#: GenEval's ``object_names.txt``: the 80 COCO thing classes in COCO/mmdet label order, with GenEval's
#: spellings (``computer mouse``, ``tv remote``, ``computer keyboard``, ...); label ``i`` of a COCO detector is
#: ``CLASSNAMES[i]``
CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class Rules:
    """GenEval's thresholds (``evaluate_images.py`` defaults; its ``--options`` names in brackets)."""

    threshold: float = 0.3            # keep scores > this [threshold]
    counting_threshold: float = 0.9   # ... for images tagged "counting" [counting_threshold]
    max_objects: int = 16             # per class, most confident first [max_objects]
    max_overlap: float = 1.0          # suppress IoU >= this; 1.0 = no suppression [max_overlap]
    position_threshold: float = 0.1   # margin factor of relative positions [position_threshold]

    def threshold_for(self, tag: str | None) -> float:
        return self.counting_threshold if tag == "counting" else self.threshold


@dataclass
class Detections:
    """One class's detections in one image: ``boxes [N,4]`` (x0, y0, x1, y1, pixels), ``scores [N]``,
    ``masks [N,H,W]`` bool (or None) and, once classified, ``colors`` (one name per detection, or None)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    masks: torch.Tensor | None = None
    colors: list[str] | None = None

    def __post_init__(self):
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).reshape(-1)
        if self.boxes.shape[0] != self.scores.shape[0]:
            raise ValueError(f"{self.boxes.shape[0]} boxes but {self.scores.shape[0]} scores")
        if self.masks is not None and self.masks.shape[0] != self.scores.shape[0]:
            raise ValueError(f"{self.masks.shape[0]} masks but {self.scores.shape[0]} scores")
        if self.colors is not None and len(self.colors) != self.scores.shape[0]:
            raise ValueError(f"{len(self.colors)} colours but {self.scores.shape[0]} detections")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, index: torch.Tensor | Sequence[int] | slice) -> Detections:
        if isinstance(index, slice):
            idx = list(range(len(self)))[index]
        else:
            idx = [int(i) for i in index]
        t = torch.as_tensor(idx, dtype=torch.long)
        return Detections(self.boxes[t], self.scores[t], None if self.masks is None else self.masks[t],
                          None if self.colors is None else [self.colors[i] for i in idx])


ImageDetections = dict[str, Detections]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two ``x0, y0, x1, y1`` boxes with GenEval's inclusive-pixel (``+1``) areas."""
    def area(x0, y0, x1, y1):
        return max(float(x1 - x0 + 1), 0.0) * max(float(y1 - y0 + 1), 0.0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def select_detections(detections: Mapping[str, Detections], tag: str | None = None,
                      rules: Rules = Rules()) -> ImageDetections:
    """Threshold (strictly above; the counting threshold for ``tag == "counting"``), keep the
    ``max_objects`` most confident per class, optional greedy suppression; classes left empty are dropped.
    Each kept :class:`Detections` is sorted by score, highest first (ties keep the detector's order)."""
    thr = rules.threshold_for(tag)
    out: ImageDetections = {}
    for cls, det in detections.items():
        if len(det) == 0:
            continue
        order = torch.sort(det.scores, descending=True, stable=True).indices
        order = order[det.scores[order] > thr][: rules.max_objects].tolist()
        kept: list[int] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if rules.max_overlap < 1:
                order = [i for i in order if box_iou(det.boxes[best], det.boxes[i]) < rules.max_overlap]
        if kept:
            out[cls] = det.take(kept)
    return out


def relative_position(box_a: Sequence[float] | torch.Tensor, box_b: Sequence[float] | torch.Tensor,
                      position_threshold: float = 0.1) -> set[str]:
    """The relations of box A to box B (see the module docstring): a subset of :data:`RELATIONS`."""
    a = torch.as_tensor(box_a, dtype=torch.float64)[:4]
    b = torch.as_tensor(box_b, dtype=torch.float64)[:4]
    center_a, center_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    size_a, size_b = (a[2:] - a[:2]).abs(), (b[2:] - b[:2]).abs()
    offset = center_a - center_b
    shrunk = (offset.abs() - position_threshold * (size_a + size_b)).clamp(min=0) * offset.sign()
    if bool((shrunk.abs() < 1e-3).all()):
        return set()
    dx, dy = (shrunk / offset.norm()).tolist()
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


@dataclass
class Judgement:
    """The verdicts on one image: GenEval's ``correct``, Flow-GRPO's exact-count ``strict``, the
    ``partial`` fraction of requirements met, and the failed requirements (``reason``, one per line)."""

    correct: bool
    strict: bool
    partial: float
    reason: str = ""
    tag: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


ColorFn = Callable[[str, Detections], Sequence[str]]


def _colors_of(cls: str, group: Detections, color_fn: ColorFn | None) -> list[str]:
    if group.colors is not None:
        return list(group.colors)
    if color_fn is None:
        raise ValueError(f"a colour clause on '{cls}' needs colours: classify them (Detections.colors) or pass color_fn")
    colors = list(color_fn(cls, group))
    if len(colors) != len(group):
        raise ValueError(f"color_fn returned {len(colors)} colours for {len(group)} '{cls}' objects")
    return colors


def check_metadata(metadata: Mapping[str, Any]) -> None:
    includes = metadata.get("include")
    if not isinstance(includes, list) or not includes:
        raise ValueError("GenEval metadata needs a non-empty 'include' list of {'class', 'count'} clauses")
    for i, req in enumerate([*includes, *metadata.get("exclude", [])]):
        if not isinstance(req, Mapping) or "class" not in req or "count" not in req:
            raise ValueError(f"GenEval metadata clause {req!r} needs 'class' and 'count'")
        if int(req["count"]) < 1:
            raise ValueError(f"GenEval metadata clause {req!r}: 'count' must be >= 1")
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"GenEval metadata clause {req!r}: unknown colour (GenEval's: {', '.join(COLORS)})")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                raise ValueError(f"GenEval metadata clause {req!r}: 'position' must be [relation, index of an "
                                 f"earlier include clause] with relation one of {', '.join(RELATIONS)}")


def _position_failure(cls: str, rel: str, group: Detections, target: Detections,
                      position_threshold: float) -> tuple[bool, str]:
    """(failed, reason): every object of ``group`` must be ``rel`` every object of ``target``."""
    for a in range(len(group)):
        for t in range(len(target)):
            found = relative_position(group.boxes[a], target.boxes[t], position_threshold)
            if rel not in found:
                return True, f"expected {cls} {rel} target, found {' and '.join(sorted(found)) or 'no relation to'} target"
    return False, ""


def judge(objects: Mapping[str, Detections], metadata: Mapping[str, Any], color_fn: ColorFn | None = None,
          rules: Rules = Rules(), *, flow_grpo_partial: bool = False) -> Judgement:
    """Judge one image: ``objects`` are the *selected* detections (:func:`select_detections`), each class
    sorted most confident first; colours come from ``Detections.colors`` or ``color_fn(class, group)``
    (called on the ``count`` most confident objects of a colour clause's class, only when needed)."""
    check_metadata(metadata)
    reasons: list[str] = []
    terms: list[float] = []
    # per include clause, the group a later position clause refers to: under GenEval's rule (None when
    # the clause failed) and under the strict rule (None when it failed the exact rule)
    groups_ok: list[Detections | None] = []
    groups_ex: list[Detections | None] = []

    def clip(term: float) -> float:
        return term if flow_grpo_partial else max(0.0, term)

    for req in metadata["include"]:
        cls, n = req["class"], int(req["count"])
        found = objects.get(cls)
        n_found = 0 if found is None else len(found)
        group = None if found is None or n_found < n else found.take(slice(0, n))
        ok, ex = group is not None, n_found == n
        terms.append(clip(1 - abs(n_found - n) / n))
        if not ok:
            reasons.append(f"expected {cls}>={n}, found {n_found}")
        elif not ex:
            reasons.append(f"expected {cls}=={n} (strict), found {n_found}")
        if ("color" in req or "position" in req) and not ex:
            terms.append(0.0)  # the attribute cannot be met without the exact count (strict, partial)
        if "color" in req and group is not None:
            want = req["color"]
            colors = _colors_of(cls, group, color_fn)
            k = colors.count(want)
            if ex:
                terms.append(clip(1 - abs(n - k) / n))
            if k < n:
                ok = ex = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                reasons.append(f"expected {want} {cls}>={n}, found {k} {want}; and {seen}")
        if "position" in req and group is not None and (ok or ex):
            rel, j = req["position"]
            for rule, target in (("ok", groups_ok[j] if ok else None), ("ex", groups_ex[j] if ex else None)):
                if (rule == "ok" and not ok) or (rule == "ex" and not ex):
                    continue
                if target is None:
                    bad, why = True, f"no target for {cls} to be {rel}"
                else:
                    bad, why = _position_failure(cls, rel, group, target, rules.position_threshold)
                if rule == "ok":
                    ok = not bad
                else:
                    ex = not bad
                    terms.append(0.0 if bad else 1.0)
                    if bad and flow_grpo_partial and target is not None:
                        terms.append(1.0)  # Flow-GRPO appends 1.0 after a failed pair check too
                if bad and why not in reasons:
                    reasons.append(why)
        groups_ok.append(group if ok else None)
        groups_ex.append(group if ex else None)
    correct = all(g is not None for g in groups_ok)
    strict = all(g is not None for g in groups_ex)
    for req in metadata.get("exclude", []):
        cls, m = req["class"], int(req["count"])
        n_found = len(objects[cls]) if cls in objects else 0
        if n_found >= m:
            correct = False
            reasons.append(f"expected {cls}<{m}, found {n_found}")
    partial = sum(terms) / len(terms) if terms else 0.0
    if not flow_grpo_partial:
        partial = min(1.0, max(0.0, partial))
    return Judgement(bool(correct), bool(strict), float(partial), "\n".join(reasons), metadata.get("tag"),
                     {"counts": {c: len(d) for c, d in objects.items()}})


def evaluate_detections(detections: Mapping[str, Detections], metadata: Mapping[str, Any],
                        color_fn: ColorFn | None = None, rules: Rules = Rules(), **kw) -> Judgement:
    """:func:`select_detections` (threshold by the metadata's tag) then :func:`judge`."""
    return judge(select_detections(detections, metadata.get("tag"), rules), metadata, color_fn, rules, **kw)


def summarize(results: Sequence[Mapping[str, Any] | Judgement]) -> dict[str, Any]:
    """Per-task accuracy and ``overall`` (mean of the task accuracies over the tasks present), as
    GenEval's ``summary_scores.py``; also the fraction of correct images, and the same for ``strict`` and
    the mean ``partial``. ``results``: :class:`Judgement` objects or dicts with ``tag`` and ``correct``
    (and optionally ``strict``/``partial``)."""
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    rows = [r if isinstance(r, Mapping) else {"tag": r.tag, "correct": r.correct, "strict": r.strict,
                                               "partial": r.partial} for r in results]
    for r in rows:
        by_task.setdefault(str(r.get("tag")), []).append(r)

    def mean(values):
        values = [float(v) for v in values]
        return sum(values) / len(values) if values else float("nan")

    tasks = {t: mean(r["correct"] for r in rs) for t, rs in by_task.items()}
    out: dict[str, Any] = {
        "overall": mean(tasks.values()),
        "tasks": tasks,
        "counts": {t: len(rs) for t, rs in by_task.items()},
        "images": len(rows),
        "correct_images": mean(r["correct"] for r in rows),
        "missing_tasks": [t for t in TASKS if t not in tasks],
    }
    if rows and all("strict" in r for r in rows):
        strict_tasks = {t: mean(r["strict"] for r in rs) for t, rs in by_task.items()}
        out["strict_tasks"] = strict_tasks
        out["strict_overall"] = mean(strict_tasks.values())
    if rows and all("partial" in r for r in rows):
        out["partial"] = mean(r["partial"] for r in rows)
    return out


__all__ = ["CLASSNAMES", "COLORS", "RELATIONS", "TASKS", "Detections", "Judgement", "Rules", "box_iou", "evaluate_detections",
           "judge", "relative_position", "select_detections", "summarize"]
