"""Model adapters, one per family, chosen from the checkpoint's ``model_index.json``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..hub import check_hub_name
from .base import AttentionError, Cond, DiffusionAdapter, SamplingSchedule, cat_cond, index_cond, repeat_cond
from .flow import FlowMatchAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .qwenimage import QwenImageAdapter
from .loading import load_pipeline, vae_config
from .sd3 import SD3Adapter
from .unet import SDXLAdapter, UNetAdapter

# Every supported family, by name (``adapter.family``, also the name of its tiny builder in
# ``models.tiny.BUILDERS``). A new family is one adapter module here plus one line in this table
# (and its tiny builder): the adapter carries its pipeline class, load kwargs, training noise,
# sampling schedule and inversion, so nothing outside ``models/`` branches on the family.
FAMILIES: dict[str, type[DiffusionAdapter]] = {cls.family: cls for cls in (
    UNetAdapter, SDXLAdapter, SD3Adapter, FluxAdapter, Flux2Adapter, Flux2KleinAdapter, QwenImageAdapter)}
# pipeline class name in model_index.json -> adapter class
PIPELINES: dict[str, type[DiffusionAdapter]] = {cls.pipeline_class: cls for cls in FAMILIES.values()}


class UnsupportedModelError(UserError, ValueError):
    pass


def looks_like_a_path(model: str) -> bool:
    """``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c`` or a Windows path: never a hub id (``ORG/NAME``),
    so a missing one is a missing directory, not a hub look-up that retries for half a minute."""
    return model.startswith((".", "/", "~", "\\")) or model.count("/") > 1 or "\\" in model or ":" in model


def detect_family(model: str, revision: str | None = None) -> str:
    """The family (a key of :data:`FAMILIES`) of the pipeline class recorded in ``model_index.json``
    (local dir or hub id)."""
    from diffusers import DiffusionPipeline

    if looks_like_a_path(model) and not Path(model).expanduser().exists():
        raise UnsupportedModelError(f"model={model!r}: no such directory (a hub id is ORG/NAME; a local model is a "
                                    "diffusers pipeline directory)")
    check_hub_name(model, "model")
    try:
        index = DiffusionPipeline.load_config(model, revision=revision)
    except Exception as e:
        raise UnsupportedModelError(
            f"model={model!r}: cannot read model_index.json ({type(e).__name__}: {e}). "
            "Give a diffusers pipeline directory or a hub id (needs network), e.g. a dir written by `diffalign tiny-model sd15 DIR`."
        ) from None
    name = index.get("_class_name", "")
    if name not in PIPELINES:
        raise UnsupportedModelError(f"model={model!r} is a {name or 'unknown'} pipeline; supported: {', '.join(PIPELINES)}")
    return PIPELINES[name].family


def load_adapter(model: str, opts=None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 encoders: bool = True) -> DiffusionAdapter:
    """Load a diffusers pipeline and wrap it in its family's adapter.

    ``dtype`` is the weight dtype of the frozen parts and of the denoiser at load; trainers keep
    trainable parameters in fp32 themselves. ``encoders=False``: the VAE and text encoders are
    not loaded (training from the latent cache); :meth:`DiffusionAdapter.restore_encoders`
    loads them when they are needed after all.
    """
    from ..config import ModelOptions

    opts = opts or ModelOptions()
    adapter_cls = FAMILIES[detect_family(model, opts.revision)]
    skip = () if encoders else (*(() if adapter_cls.latent_stats_in_vae_weights else ("vae",)), *adapter_cls.TEXT_ENCODER_NAMES)
    pipe = load_pipeline(model, adapter_cls, opts, dtype, skip)
    adapter = adapter_cls(pipe, model, opts)
    if not encoders:
        adapter.release_encoders(vae_config(model, opts), torch.device(device), dtype)
    adapter.to(device, dtype)
    return adapter


def load_encoders(model: str, opts=None, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu", denoiser: bool = False) -> DiffusionAdapter:
    """The family's adapter with the VAE and text encoders only: what a latent-cache build runs.

    The denoiser (FLUX.1's 12B transformer: 48 GB in fp32) is not loaded unless ``denoiser``
    (the cached-reference estimator runs it once per pair). The text encoders (and a loaded
    denoiser) come in ``dtype``, the VAE in ``vae_dtype`` (default ``dtype``): diffusers reads a
    per-component dtype, so nothing is loaded in one dtype and cast to another.
    """
    from ..config import ModelOptions

    opts = opts or ModelOptions()
    adapter_cls = FAMILIES[detect_family(model, opts.revision)]
    skip = () if denoiser else (adapter_cls.denoiser_name,)
    pipe = load_pipeline(model, adapter_cls, opts, {"default": dtype, "vae": vae_dtype or dtype}, skip)
    adapter = adapter_cls(pipe, model, opts)
    for module in (*adapter.frozen_modules(), adapter.denoiser):
        if module is not None:
            module.to(device)
    return adapter


__all__ = [
    "AttentionError", "Cond", "DiffusionAdapter", "FAMILIES", "FlowMatchAdapter", "Flux2Adapter", "Flux2KleinAdapter", "FluxAdapter",
    "PIPELINES", "QwenImageAdapter", "SD3Adapter", "SDXLAdapter", "SamplingSchedule", "UNetAdapter", "UnsupportedModelError", "cat_cond",
    "detect_family", "index_cond", "load_adapter", "load_encoders", "load_pipeline", "repeat_cond", "vae_config",
]
