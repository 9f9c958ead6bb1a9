"""Loading a family's diffusers pipeline, whole or without some components, and the VAE config
alone (what training from the latent cache needs of a VAE it does not load)."""

from __future__ import annotations

import torch

# ``dtype=`` is the keyword of diffusers' ``from_pretrained`` (models and pipelines) from 0.40 on,
# where ``torch_dtype=`` is deprecated (a warning on every load; removed in 1.0). Older releases
# pass an unknown ``dtype=`` on unused and load fp32 without a word, so pyproject requires
# diffusers>=0.40 and every call here says ``dtype=``.


def load_pipeline(model: str, adapter_cls: type, opts, dtype: torch.dtype | dict = torch.float32,
                  skip: tuple[str, ...] = ()):
    """The family's diffusers pipeline of ``model``; the components named in ``skip`` are not
    loaded (None). ``dtype``: one dtype, or a dict by component name with a ``"default"``
    (``{"default": torch.bfloat16, "vae": torch.float32}``)."""
    import diffusers

    kwargs = dict(adapter_cls.pipeline_kwargs)
    # components saved as absent ([null, null], e.g. SD3 without its T5 encoder) load as None
    index = diffusers.DiffusionPipeline.load_config(model, revision=opts.revision)
    kwargs.update({k: None for k, v in index.items() if isinstance(v, list) and v == [None, None] and k not in kwargs})
    kwargs.update({k: None for k in skip if k in index})
    from ..logging import library_call

    vae_dtype = dtype.get("vae", dtype.get("default", torch.float32)) if isinstance(dtype, dict) else dtype
    with library_call():  # the libraries' nested "Loading ..." bars leave ESC[A in logs
        if opts.vae and "vae" not in skip:
            kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(opts.vae, dtype=vae_dtype)
        pipe = getattr(diffusers, adapter_cls.pipeline_class).from_pretrained(
            model, revision=opts.revision, variant=opts.variant, dtype=dtype, **kwargs
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def vae_config(model: str, opts):
    """The VAE config of ``model`` (or of ``opts.vae``) read from disk, defaults filled in as
    the VAE class would: what training from the latent cache needs of a VAE it does not load."""
    import inspect

    import diffusers
    from diffusers.configuration_utils import FrozenDict

    src, sub = (opts.vae, None) if opts.vae else (model, "vae")
    raw = diffusers.AutoencoderKL.load_config(src, subfolder=sub, revision=None if opts.vae else opts.revision)
    cls = getattr(diffusers, raw.get("_class_name", "AutoencoderKL"), diffusers.AutoencoderKL)
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    return FrozenDict({**defaults, **raw})
