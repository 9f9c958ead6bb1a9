"""The procedural world: scenes of 1-3 flat objects on a plain background.

A :class:`Scene` names everything a caption says: one or two object *groups*, each
with a colour, a shape, a count (1-3 identical objects) and optionally a size, plus
optionally a position when the scene holds exactly one object. ``caption(scene)``
turns it into templated English; :func:`diffalign.testbed.reward.parse_caption`
turns the caption back into the same ``Scene``.

Rendering is deterministic given ``(scene, resolution, style, seed)``: the seed draws
the exact object positions/sizes (small jitter inside the ranges the attributes
allow), the background grey level and tiny colour jitter. Shapes are anti-aliased by
4x supersampling. Only numpy is used here.

Geometry (all relative to the image side, so 32 px and 64 px behave the same):

* half-size of a ``small`` object: 0.10-0.13 (extent 0.20-0.26 of the side);
  ``large``: 0.19-0.21 (extent 0.38-0.42); unnamed size: anywhere in 0.10-0.21.
* objects keep a gap of >= 2 px (and >= 0.06) between their bounding squares, so they
  never touch and segment as separate components.
* ``on the left`` puts the object centre at x <= 0.32, ``on the right`` at x >= 0.68,
  ``at the top`` / ``at the bottom`` at y <= 0.32 / y >= 0.68 (the other coordinate
  within 0.3-0.7).

Styles (``render(..., style=...)``): ``"plain"`` (default: a neutral grey background,
level 65-100 with a little per-channel jitter), ``"warm"`` (the same grey shifted to a
warm brown: +50 red, +15 green, -30 blue), ``"tinted"`` (the grey shifted along that same
cool-warm axis by a random tint ``t`` in [-0.8, 0.8]: from slate blue through grey to
tan, never as warm as ``"warm"``; the testbed base models are trained on it, so their
samples vary in the hidden taste's direction without any caption naming it), and an
optional dark ``outline`` around each object (``"outline"``, ``"warm_outline"`` or
``Style(background=..., outline=True)``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Sequence

import numpy as np

from .. import files

# ----------------------------------------------------------------------------- vocabulary

#: The palette: name -> RGB. Minimum pairwise distance ~118, minimum distance to any
#: background the world draws ~95, so nearest-colour classification is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
#: How a position is said in a caption.
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
#: Caption prefixes (part of the Scene so captions round-trip exactly).
PREFIXES: tuple[str, ...] = ("a photo of", "an image of", "")
MAX_OBJECTS = 3

SMALL_HALF = (0.10, 0.13)
LARGE_HALF = (0.19, 0.21)
ANY_HALF = (0.10, 0.21)
#: Extent (max bbox side / image side) separating small from large; used by the reward.
SIZE_THRESHOLD = 0.30
_MARGIN = 0.02  # min distance of a bounding square to the image border
_SIDE_LIMIT = 0.32  # centre bound for positioned objects
_SUPERSAMPLE = 4

OUTLINE_RGB = (25, 25, 25)


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` identical objects of one ``colour`` and ``shape``; ``size`` None = not named."""

    colour: str
    shape: str
    count: int = 1
    size: str | None = None

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; known: {', '.join(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be 1-3, got {self.count!r}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known: {', '.join(SIZES)} or None")


@dataclass(frozen=True)
class Scene:
    """One or more object groups, an optional position (single object only) and the caption prefix."""

    groups: tuple[ObjectGroup, ...]
    position: str | None = None
    prefix: str = "a photo of"

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("a Scene needs at least one object group")
        if self.n_objects > MAX_OBJECTS:
            raise ValueError(f"a Scene holds at most {MAX_OBJECTS} objects, got {self.n_objects}")
        keys = [(g.colour, g.shape) for g in self.groups]
        if len(set(keys)) != len(keys):
            raise ValueError(f"object groups must differ in colour or shape, got {keys}")
        if self.position is not None:
            if self.position not in POSITIONS:
                raise ValueError(f"unknown position {self.position!r}; known: {', '.join(POSITIONS)}")
            if self.n_objects != 1:
                raise ValueError("a position can only be named for a scene with exactly one object")
        if self.prefix not in PREFIXES:
            raise ValueError(f"unknown caption prefix {self.prefix!r}; known: {PREFIXES}")

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)


def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


def group_phrase(group: ObjectGroup) -> str:
    words = ([group.size] if group.size else []) + [group.colour, group.shape + ("s" if group.count > 1 else "")]
    count = _article(words[0]) if group.count == 1 else COUNT_WORDS[group.count]
    return " ".join([count] + words)


def caption(scene: Scene) -> str:
    """Templated English, e.g. ``"a photo of two small red circles"``, ``"a blue square on the left"``."""
    text = " and ".join(group_phrase(g) for g in scene.groups)
    if scene.position is not None:
        text += " " + POSITION_PHRASES[scene.position]
    return f"{scene.prefix} {text}" if scene.prefix else text


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_scene(
    rng,
    *,
    p_two_groups: float = 0.25,
    p_size: float = 0.5,
    p_position: float = 0.4,
    p_count: Sequence[float] = (0.5, 0.25, 0.25),
    pairs: Iterable[tuple[str, str]] | None = None,
    prefixes: Sequence[str] = PREFIXES,
) -> Scene:
    """Draw a random scene.

    ``rng`` is a ``numpy.random.Generator`` or an int seed. ``pairs`` restricts the
    (colour, shape) combinations every group may use (default: all 18). A single-group
    scene has 1-3 objects (``p_count``); a two-group scene has 2-3 objects in all. Size is
    named per group with ``p_size``; a single-object scene names a position with
    ``p_position``.
    """
    rng = _as_rng(rng)
    allowed = sorted(set(pairs)) if pairs is not None else [(c, s) for c in COLOURS for s in SHAPES]
    if not allowed:
        raise ValueError("sample_scene: no (colour, shape) pairs allowed")
    n_groups = 2 if (len(allowed) > 1 and rng.random() < p_two_groups) else 1
    idx = [int(rng.integers(len(allowed)))]
    if n_groups == 2:  # the second group differs in colour: groups bind to their objects by colour
        rest = [i for i, (c, _) in enumerate(allowed) if c != allowed[idx[0]][0]]
        if rest:
            idx.append(rest[int(rng.integers(len(rest)))])
    if len(idx) == 1:
        counts = [int(rng.choice([1, 2, 3], p=np.asarray(p_count) / np.sum(p_count)))]
    else:
        counts = [1, 1]
        if rng.random() < 0.3:
            counts[int(rng.integers(2))] = 2
    groups = []
    for i, n in zip(idx, counts):
        colour, shape = allowed[int(i)]
        size = str(rng.choice(SIZES)) if rng.random() < p_size else None
        groups.append(ObjectGroup(colour, shape, n, size))
    position = None
    if sum(counts) == 1 and rng.random() < p_position:
        position = str(rng.choice(POSITIONS))
    prefix = str(prefixes[int(rng.integers(len(prefixes)))])
    return Scene(tuple(groups), position, prefix)


def enumerate_scenes(prefixes: Sequence[str] = PREFIXES) -> Iterator[Scene]:
    """Every scene :func:`sample_scene` can produce (single groups of 1-3 objects with any
    size/position naming; two groups of different colours with counts (1,1), (2,1), (1,2))."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    sizes = (None, *SIZES)
    for prefix in prefixes:
        for colour, shape in pairs:
            for count in (1, 2, 3):
                for size in sizes:
                    g = ObjectGroup(colour, shape, count, size)
                    for position in (None, *POSITIONS) if count == 1 else (None,):
                        yield Scene((g,), position, prefix)
        for c1, s1 in pairs:
            for c2, s2 in pairs:
                if c1 == c2:
                    continue
                for n1, n2 in ((1, 1), (2, 1), (1, 2)):
                    for z1 in sizes:
                        for z2 in sizes:
                            yield Scene((ObjectGroup(c1, s1, n1, z1), ObjectGroup(c2, s2, n2, z2)), None, prefix)


def perturb_scene(scene: Scene, rng, attributes: Iterable[str] = ("colour", "shape", "count")) -> Scene:
    """A scene that gets each listed attribute of every group wrong.

    ``attributes`` is a subset of ``colour, shape, count, size, position``. Wrong colours
    and shapes avoid every colour/shape the original names (so two groups cannot swap and
    still satisfy the prompt); wrong size flips small/large (an unnamed size stays
    unnamed); wrong position moves to the opposite side (a scene that no longer has one
    object drops its position).
    """
    rng = _as_rng(rng)
    attributes = set(attributes)
    unknown = attributes - {"colour", "shape", "count", "size", "position"}
    if unknown:
        raise ValueError(f"perturb_scene: unknown attributes {sorted(unknown)}")
    groups = list(scene.groups)
    used_colours = {g.colour for g in groups}
    used_shapes = {g.shape for g in groups}
    free_colours = [c for c in COLOURS if c not in used_colours]
    free_shapes = [s for s in SHAPES if s not in used_shapes] or None
    if "colour" in attributes:
        picks = rng.choice(len(free_colours), size=len(groups), replace=False)
        groups = [replace(g, colour=free_colours[int(i)]) for g, i in zip(groups, picks)]
    if "shape" in attributes:
        new = []
        for g in groups:
            options = free_shapes or [s for s in SHAPES if s != g.shape]
            new.append(replace(g, shape=str(rng.choice(options))))
        groups = new
        if len({(g.colour, g.shape) for g in groups}) != len(groups):  # collision: shift the second
            g = groups[-1]
            others = [s for s in SHAPES if s != g.shape and (g.colour, s) not in {(h.colour, h.shape) for h in groups[:-1]}]
            groups[-1] = replace(g, shape=str(rng.choice(others)))
    if "count" in attributes:
        for _ in range(100):
            counts = [int(rng.choice([c for c in (1, 2, 3) if c != g.count])) for g in groups]
            if sum(counts) <= MAX_OBJECTS:
                break
        else:  # cannot change every count within 3 objects: change the first group only
            counts = [g.count for g in groups]
            counts[0] = 1 if counts[0] != 1 else 2
        groups = [replace(g, count=n) for g, n in zip(groups, counts)]
    if "size" in attributes:
        groups = [replace(g, size=None if g.size is None else ("large" if g.size == "small" else "small")) for g in groups]
    position = scene.position
    if "position" in attributes and position is not None:
        position = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[position]
    if sum(g.count for g in groups) != 1:
        position = None
    return Scene(tuple(groups), position, scene.prefix)


# ----------------------------------------------------------------------------- styles


BACKGROUNDS: tuple[str, ...] = ("plain", "warm", "tinted")
#: ``"tinted"`` backgrounds: ``warm_background`` shift scaled by a tint drawn uniformly from this range.
TINT_RANGE = (-0.8, 0.8)


@dataclass(frozen=True)
class Style:
    """Rendering style: background tone (``"plain"`` grey, ``"warm"``, or ``"tinted"``: a random
    cool-to-warm tint of the grey) and dark outlines."""

    background: str = "plain"
    outline: bool = False

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")


STYLES: dict[str, Style] = {
    "plain": Style(),
    "warm": Style("warm"),
    "outline": Style(outline=True),
    "warm_outline": Style("warm", True),
    "tinted": Style("tinted"),
}
DEFAULT_STYLE = STYLES["plain"]
#: The style the hidden "human" prefers (see :mod:`diffalign.testbed.pairs`).
TARGET_STYLE = STYLES["warm"]


def resolve_style(style: Style | str | None) -> Style:
    if style is None:
        return DEFAULT_STYLE
    if isinstance(style, Style):
        return style
    key = str(style).replace("+", "_").replace("-", "_")
    if key not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return STYLES[key]


#: The cool-warm axis of the world's backgrounds (RGB shift of the full ``"warm"`` tone).
WARM_SHIFT = np.array([50.0, 15.0, -30.0])


def warm_background(level: float, tint: float = 1.0) -> np.ndarray:
    """The background tone for a grey ``level`` shifted by ``tint`` along the warm axis
    (float RGB): ``tint=1`` is the ``"warm"`` style, 0 neutral grey, negative values cool."""
    return np.full(3, float(level)) + float(tint) * WARM_SHIFT


# ----------------------------------------------------------------------------- layout and rendering


@dataclass(frozen=True)
class PlacedObject:
    colour: str
    shape: str
    cx: float  # centre, relative to width
    cy: float  # centre, relative to height
    half: float  # half-size, relative to the side


def _half_range(size: str | None) -> tuple[float, float]:
    return {"small": SMALL_HALF, "large": LARGE_HALF, None: ANY_HALF}[size]


def layout(scene: Scene, resolution: int = 32, seed: int = 0) -> list[PlacedObject]:
    """Deterministic object placement for ``scene`` (relative coordinates)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5CE0E])
    gap = max(0.06, 2.0 / resolution)
    items = []
    for g in scene.groups:
        lo, hi = _half_range(g.size)
        for _ in range(g.count):
            items.append((g.colour, g.shape, float(rng.uniform(lo, hi))))
    for _attempt in range(400):
        placed: list[PlacedObject] = []
        ok = True
        for colour, shape, h in items:
            lo, hi = h + _MARGIN, 1.0 - h - _MARGIN
            if scene.position is not None:
                side_lo, side_hi = {
                    "left": (lo, _SIDE_LIMIT), "right": (1 - _SIDE_LIMIT, hi),
                    "top": (lo, _SIDE_LIMIT), "bottom": (1 - _SIDE_LIMIT, hi),
                }[scene.position]
                along = (float(rng.uniform(side_lo, side_hi)))
                across = float(rng.uniform(0.3, 0.7))
                cx, cy = (along, across) if scene.position in ("left", "right") else (across, along)
            else:
                cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            for p in placed:
                if abs(cx - p.cx) < h + p.half + gap and abs(cy - p.cy) < h + p.half + gap:
                    ok = False
                    break
            if not ok:
                break
            placed.append(PlacedObject(colour, shape, cx, cy, h))
        if ok:
            return placed
    # Fallback (crowded scene, e.g. three large objects): quadrant corners, objects pushed outwards.
    corners = [(0, 0), (1, 0), (0, 1), (1, 1)]
    order = rng.permutation(4)
    placed = []
    for (colour, shape, h), k in zip(items, order):
        ax, ay = corners[int(k)]
        cx = h + _MARGIN if ax == 0 else 1 - h - _MARGIN
        cy = h + _MARGIN if ay == 0 else 1 - h - _MARGIN
        placed.append(PlacedObject(colour, shape, cx, cy, h))
    return placed


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, h: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base = height = 2h
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, resolution: int = 32, style: Style | str | None = None, seed: int = 0) -> np.ndarray:
    """Render ``scene`` to a ``uint8`` array of shape ``(resolution, resolution, 3)``."""
    style = resolve_style(style)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xC0102])
    level = float(rng.uniform(65, 100))
    bg = np.full(3, level) + rng.normal(0, 6, 3)
    if style.background == "warm":
        bg = warm_background(level) + rng.normal(0, 4, 3)
    elif style.background == "tinted":  # drawn after the grey jitter: "plain" draws stay unchanged
        bg = warm_background(level, float(rng.uniform(*TINT_RANGE))) + rng.normal(0, 4, 3)
    n = resolution * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    x, y = coords[None, :], coords[:, None]
    img = np.broadcast_to(bg, (resolution, resolution, 3)).astype(np.float64).copy()

    def coverage(mask: np.ndarray) -> np.ndarray:
        return mask.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]

    outline_w = 1.0 / resolution
    for obj in layout(scene, resolution, seed):
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float64) + rng.normal(0, 5, 3)
        if style.outline:
            ring = _shape_mask(obj.shape, x, y, obj.cx, obj.cy, obj.half + outline_w)
            if obj.shape == "triangle":  # grow the triangle around its centroid, not its box centre
                ring = _shape_mask(obj.shape, x, y, obj.cx, obj.cy - outline_w / 3, obj.half + outline_w)
            cov = coverage(ring)
            img = img * (1 - cov) + np.asarray(OUTLINE_RGB, dtype=np.float64) * cov
        cov = coverage(_shape_mask(obj.shape, x, y, obj.cx, obj.cy, obj.half))
        img = img * (1 - cov) + colour * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- image helpers


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a ``uint8`` HxWx3 array (4:4:4 chroma, so small colour shapes survive)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """``uint8`` HxWx3 array from encoded image bytes (:func:`diffalign.files.decode_image`)."""
    return np.asarray(files.decode_image(data), dtype=np.uint8)


def to_uint8_batch(images) -> np.ndarray:
    """Batch of images -> ``uint8`` array ``[B, H, W, 3]``.

    Accepts a float tensor/array ``[B, 3, H, W]`` in [0, 1] (the reward API), a ``uint8``
    array/tensor ``[B, H, W, 3]``, or a list of PIL images / HxWx3 arrays.
    """
    if isinstance(images, (list, tuple)):
        return np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images])
    if hasattr(images, "detach"):  # torch tensor
        import torch

        t = images.detach()
        if t.dtype.is_floating_point:
            t = t.float().cpu()
            if t.ndim != 4 or t.shape[1] != 3:
                raise ValueError(f"expected float images [B,3,H,W], got shape {tuple(t.shape)}")
            return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images = t.cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise ValueError(f"expected float images [B,3,H,W], got shape {arr.shape}")
        return np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B,H,W,3], got shape {arr.shape}")
    return arr


def to_float_tensor(images: np.ndarray):
    """``uint8`` ``[B,H,W,3]`` (or a single HxWx3) -> float tensor ``[B,3,H,W]`` in [0, 1]."""
    import torch

    arr = np.asarray(images, dtype=np.uint8)
    if arr.ndim == 3:
        arr = arr[None]
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
