"""The public Python API (issue #28): the README's DPO tour in a few lines, run as the doctests of
``diffalign.api``, and a surface that ``diffalign`` itself exports."""

from __future__ import annotations

import doctest

import diffalign
import diffalign.api


def test_the_api_doctests_run_the_dpo_tour(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_QUIET", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    result = doctest.testmod(diffalign.api, extraglobs={"tmp": tmp_path}, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 12 and result.failed == 0, result
    assert (tmp_path / "O" / "pytorch_lora_weights.safetensors").is_file()


def test_the_package_exports_the_public_surface():
    assert diffalign.__all__ == diffalign.api.__all__
    for name in diffalign.__all__:
        assert getattr(diffalign, name) is getattr(diffalign.api, name)
    assert "train" in dir(diffalign)
    try:
        diffalign.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
