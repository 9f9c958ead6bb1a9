"""Weight dtypes at load (issue #30 item 7): diffusers reads ``dtype=`` in ``from_pretrained``
only from 0.40; older releases read ``torch_dtype=`` and pass an unknown ``dtype=`` on unused,
so a LoRA base asked for in bf16 stayed fp32 without a word. pyproject allows diffusers>=0.35."""

import warnings

import diffusers
import pytest
import torch

from diffalign.models import load_adapter
from diffalign.models.loading import dtype_kwarg


def _dtypes(adapter) -> set:
    return {p.dtype for m in (adapter.denoiser, adapter.vae, *adapter.text_encoders()) for p in m.parameters()}


def test_bf16_load_gives_bf16_parameters_without_deprecation_warnings(tiny_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_adapter(tiny_model("sd15"), dtype=torch.bfloat16)
    assert _dtypes(adapter) == {torch.bfloat16}
    assert not [w for w in caught if "torch_dtype" in str(w.message)]  # the installed diffusers' own keyword


@pytest.mark.parametrize("version, keyword", [("0.35.0", "torch_dtype"), ("0.39.0", "torch_dtype"),
                                              ("0.40.0.dev0", "torch_dtype"), ("0.40.0", "dtype"), ("0.42.1", "dtype")])
def test_dtype_keyword_follows_the_diffusers_release(monkeypatch, version, keyword):
    monkeypatch.setattr(diffusers, "__version__", version)
    assert dtype_kwarg(torch.bfloat16) == {keyword: torch.bfloat16}


def test_bf16_load_on_a_diffusers_without_the_dtype_keyword(tiny_model, monkeypatch):
    """diffusers 0.39 as it behaves: ``dtype=`` is not read (the weights stay fp32)."""
    pipeline_cls = diffusers.StableDiffusionPipeline
    real = pipeline_cls.from_pretrained

    def from_pretrained_0_39(model, **kwargs):
        kwargs.pop("dtype", None)  # not a keyword of 0.39: passed on unused, the weights load in fp32
        return real(model, **kwargs)

    monkeypatch.setattr(diffusers, "__version__", "0.39.0")
    monkeypatch.setattr(pipeline_cls, "from_pretrained", from_pretrained_0_39)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the installed release deprecates torch_dtype
        adapter = load_adapter(tiny_model("sd15"), dtype=torch.bfloat16)
    assert _dtypes(adapter) == {torch.bfloat16}
