"""Weight dtypes at load (issue #30 item 7): diffusers reads ``dtype=`` in ``from_pretrained``
only from 0.40; older releases pass an unknown ``dtype=`` on unused, so a LoRA base asked for in
bf16 stayed fp32 without a word, and ``torch_dtype=`` is deprecated from 0.40 on. pyproject now
requires diffusers>=0.40 and our calls say ``dtype=``."""

import warnings

import diffusers
import torch

from diffalign.models import load_adapter


def _dtypes(adapter) -> set:
    return {p.dtype for m in (adapter.denoiser, adapter.vae, *adapter.text_encoders()) for p in m.parameters()}


def test_bf16_load_gives_bf16_parameters_without_deprecation_warnings(tiny_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_adapter(tiny_model("sd15"), dtype=torch.bfloat16)
    assert _dtypes(adapter) == {torch.bfloat16}
    assert not [w for w in caught if "torch_dtype" in str(w.message)]  # the installed diffusers' own keyword


def test_the_diffusers_floor_reads_the_dtype_keyword():
    """The floor pyproject declares is the first release whose from_pretrained reads ``dtype=``."""
    import re
    from pathlib import Path

    from packaging.version import Version

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"diffusers>=([0-9.]+)"', pyproject).group(1)
    assert Version(floor) >= Version("0.40.0")
    assert Version(diffusers.__version__) >= Version(floor)
