"""Rewards by name: ``get_reward("pickscore")``, ``get_reward("pickscore=/my/dir")``.

Other modules add their own with :func:`register_reward`::

    register_reward("geneval_toy", lambda path=None, **kw: MyReward(**kw))

A factory is called as ``factory(path=PATH, **kwargs)`` when the spec has ``=PATH`` and as
``factory(**kwargs)`` otherwise, and returns a :class:`~diffalign.rewards.base.Reward` (or any
callable with the reward signature and a ``name``).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UserError
from .base import Reward

RewardFactory = Callable[..., Reward]

_REGISTRY: dict[str, RewardFactory] = {}
_DESCRIPTIONS: dict[str, str] = {}
_LOCK = threading.Lock()


def register_reward(name: str, factory: RewardFactory, *, description: str = "", overwrite: bool = False) -> None:
    """Make ``get_reward(name)`` / ``get_reward(f"{name}=PATH")`` build ``factory``."""
    if not name or "=" in name or "," in name or name != name.strip():
        raise ValueError(f"invalid reward name {name!r} (no '=', ',' or surrounding spaces)")
    with _LOCK:
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
            raise ValueError(f"reward '{name}' is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = factory
        _DESCRIPTIONS[name] = description or (inspect.getdoc(factory) or "").split("\n")[0]


# Rewards of this layer that register when imported, and the entry-point group through which
# other packages, and higher layers of this one, register theirs: each entry point names a
# callable that calls register_reward (pyproject.toml: ``testbed`` ->
# ``diffalign.testbed.registry:auto_register``, so the rewards layer never imports the testbed).
# Both are loaded on demand (an unknown name, or list_rewards()), so ``import diffalign.rewards``
# stays light.
PLUGIN_MODULES = ("diffalign.rewards.simple",)
ENTRY_POINT_GROUP = "diffalign.rewards"
_plugins_loaded = False


def load_plugins() -> None:
    """Import the plugin modules and run the ``diffalign.rewards`` entry points, once (they also
    register what higher layers of this package add by name, e.g. the testbed's prompt sets)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    from importlib.metadata import entry_points

    for mod in PLUGIN_MODULES:
        importlib.import_module(mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register = ep.load()
        except ImportError:  # optional: that part of the package (or its dependencies) is absent
            continue
        register()


def list_rewards() -> dict[str, str]:
    """Registered names -> one-line descriptions."""
    load_plugins()
    return dict(sorted(_DESCRIPTIONS.items()))


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"name=PATH"`` -> ``("name", "PATH")``; ``"name"`` -> ``("name", None)``."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not name:
        raise UserError(f"reward spec '{spec}' has no name; use NAME or NAME=PATH")
    if sep and not path.strip():
        raise UserError(f"reward spec '{spec}' has an empty path after '='")
    return name, (path.strip() if sep else None)


def get_reward(spec: str | Reward | Mapping[str, float], **kwargs: Any) -> Reward:
    """Build a reward from ``"name"``, ``"name=PATH"``, an existing reward (returned as is), or
    a mapping ``{spec: weight}`` (a :class:`~diffalign.rewards.compose.WeightedSum`).

    ``kwargs`` (``device``, ``batch_size``, ...) go to the factory. Unknown names raise a
    :class:`UserError` listing the registered ones.
    """
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, Mapping):
        from .compose import WeightedSum

        return WeightedSum([(get_reward(s, **kwargs), float(w)) for s, w in spec.items()])
    if not isinstance(spec, str):
        if callable(spec) and hasattr(spec, "name"):
            return spec  # a duck-typed reward (e.g. RemoteReward)
        raise TypeError(f"reward spec must be a string, a Reward or a mapping, not {type(spec).__name__}")
    name, path = parse_spec(spec)
    with _LOCK:
        factory = _REGISTRY.get(name)
    if factory is None:
        load_plugins()
        with _LOCK:
            factory = _REGISTRY.get(name)
    if factory is None:
        raise UserError(f"unknown reward '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    if path is not None:
        return factory(path=path, **kwargs)
    return factory(**kwargs)


# --------------------------------------------------------------------------------------------
# Built-ins (modules imported lazily: nothing heavy happens at import time)
# --------------------------------------------------------------------------------------------


def _clipscore(path: str | None = None, **kw) -> Reward:
    """CLIPScore (Hessel et al. 2021): 2.5*max(cos,0) on CLIP ViT-B/32."""
    from .clip import CLIPScore

    return CLIPScore(path, convention="hessel", **kw)


def _clipscore_l14(path: str | None = None, **kw) -> Reward:
    """CLIP score 100*cos on CLIP ViT-L/14."""
    from .clip import CLIPScore

    return CLIPScore(path, convention="x100", **kw)


def _pickscore(path: str | None = None, **kw) -> Reward:
    """PickScore v1 (Kirstain et al. 2023): logit_scale*cos."""
    from .clip import PickScore

    return PickScore(path, **kw)


def _aesthetic(path: str | None = None, **kw) -> Reward:
    """LAION aesthetic predictor v2: MLP on normalised CLIP ViT-L/14 image embeds (1-10)."""
    from .clip import LAIONAesthetic

    return LAIONAesthetic(path, **kw)


def _hpsv2(path: str | None = None, **kw) -> Reward:
    """HPSv2.1 (Wu et al. 2023): cos on open_clip ViT-H/14 with HPS weights."""
    from .hps import HPSv2

    return HPSv2(path, version=kw.pop("version", "v2.1"), **kw)


def _hpsv20(path: str | None = None, **kw) -> Reward:
    """HPSv2.0 (Wu et al. 2023): cos on open_clip ViT-H/14 with HPS v2.0 weights."""
    from .hps import HPSv2

    return HPSv2(path, version="v2.0", **kw)


def _imagereward(path: str | None = None, **kw) -> Reward:
    """ImageReward v1.0 (Xu et al. 2023): BLIP + MLP, normalised by published mean/std."""
    from .imagereward import ImageReward

    return ImageReward(path, **kw)


def _jpeg_compressibility(path: str | None = None, **kw) -> Reward:
    """DDPO JPEG compressibility: -kB of JPEG q95."""
    from .jpeg import JPEGReward

    return JPEGReward(compressible=True, **kw)


def _jpeg_incompressibility(path: str | None = None, **kw) -> Reward:
    """DDPO JPEG incompressibility: kB of JPEG q95."""
    from .jpeg import JPEGReward

    return JPEGReward(compressible=False, **kw)


def _remote(path: str | None = None, **kw) -> Reward:
    """A reward served by `diffalign serve-reward` (remote=http://host:port)."""
    from .server import RemoteReward

    if not path:
        raise UserError("reward 'remote' needs a URL: remote=http://127.0.0.1:8000")
    kw.pop("device", None)
    kw.pop("batch_size", None)
    return RemoteReward(path, **kw)


def _ocr(path: str | None = None, **kw) -> Reward:
    """OCR (Flow-GRPO's task): 1 - normalised edit distance of the prompt's quoted text to the recognised text."""
    from .ocr import OCRReward

    return OCRReward(path, **kw)


def _vlm_judge(path: str | None = None, **kw) -> Reward:
    """VLM judge (UnifiedReward pointwise 1-5, / 5) over an OpenAI-compatible endpoint: vlm_judge=http://host:port/v1."""
    if not path:
        raise UserError("reward 'vlm_judge' needs an OpenAI-compatible endpoint: vlm_judge=http://127.0.0.1:8000/v1 "
                        "(e.g. `vllm serve CodeGoat24/UnifiedReward-qwen-7b --port 8000`)")
    if not path.startswith(("http://", "https://")):
        raise UserError(f"reward 'vlm_judge': '{path}' is not an http(s) URL; local inference through transformers "
                        "is not implemented yet: serve the model with vLLM or SGLang (`vllm serve DIR --port 8000`) "
                        "and pass vlm_judge=http://127.0.0.1:8000/v1")
    from .vlm_judge import VLMJudge

    return VLMJudge(path, **kw)


def _geneval(path: str | None = None, **kw) -> Reward:
    """GenEval (Ghosh et al. 2023): Mask2Former detections + CLIP colours judged against the prompt's metadata row."""
    from .geneval import GenEvalReward

    return GenEvalReward(path, **kw)


#: other spellings of a registered reward -> its canonical name (the reward's ``name``, and the
#: column name in both ``score`` and ``eval`` CSVs)
ALIASES = {"jpeg_compressibility": "jpeg", "clip": "clipscore", "hpsv2.1": "hpsv2"}


def canonical_name(name: str) -> str:
    """``jpeg_compressibility`` -> ``jpeg``, ``clip`` -> ``clipscore``; other names unchanged."""
    return ALIASES.get(name.strip(), name.strip())


for _name, _factory in {
    "clip": _clipscore,
    "clipscore": _clipscore,
    "clipscore_l14": _clipscore_l14,
    "pickscore": _pickscore,
    "aesthetic": _aesthetic,
    "hpsv2": _hpsv2,
    "hpsv2.1": _hpsv2,
    "hpsv2.0": _hpsv20,
    "imagereward": _imagereward,
    "jpeg": _jpeg_compressibility,
    "jpeg_compressibility": _jpeg_compressibility,
    "jpeg_incompressibility": _jpeg_incompressibility,
    "remote": _remote,
    "ocr": _ocr,
    "vlm_judge": _vlm_judge,
    "geneval": _geneval,
}.items():
    register_reward(_name, _factory)
