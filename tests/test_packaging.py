"""The packaged product: the wheel carries every config and the testbed base; configs resolve by
file, packaged path or recipe name the same way from any directory (a wheel and a clone alike)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from diffalign import recipes
from diffalign.cli import main
from diffalign.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffalign"


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """File names inside a wheel built from a copy of the sources (a used clone's build/ folder
    keeps stale files that could hide a file the package data no longer ships)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(PKG, src / "diffalign", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (work / "dist").glob("diffalign-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def _data_files(folder: Path) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.mark.slow
def test_wheel_ships_recipes_tiny_configs_and_the_testbed(wheel_names):
    must = {
        "diffalign/configs/recipes/sd15_dpo_pickapic.yaml",
        "diffalign/configs/tiny/dpo.yaml",
        "diffalign/configs/tiny/grpo.yaml",
        "diffalign/configs/reward/tiny_pickscore.yaml",
        "diffalign/configs/accelerate/ddp.yaml",
        "diffalign/testbed/configs/job.yaml",
        "diffalign/testbed/assets/base/model_index.json",
    }
    if (PKG / "testbed/assets/base_flow/model_index.json").is_file():
        must.add("diffalign/testbed/assets/base_flow/model_index.json")
    assert not must - wheel_names, f"missing from the wheel: {sorted(must - wheel_names)}"
    # every file of the data folders, not only the named ones (weights, tokenizer, new recipes)
    shipped = _data_files(PKG / "configs") | _data_files(PKG / "testbed" / "configs") | _data_files(PKG / "testbed" / "assets")
    assert not shipped - wheel_names, f"missing from the wheel: {sorted(shipped - wheel_names)[:10]}"
    assert any(n.endswith(".safetensors") for n in wheel_names if n.startswith("diffalign/testbed/assets/base/"))
    # nothing outside the package (a top-level configs/ would collide in site-packages)
    assert {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")} == {"diffalign"}
    entry_points = next(n for n in wheel_names if n.endswith(".dist-info/entry_points.txt"))
    assert entry_points


def test_old_clone_paths_short_paths_and_files_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the clone: only the package can answer
    tiny_dpo = PKG / "configs/tiny/dpo.yaml"
    for spec in ("configs/tiny/dpo.yaml", "tiny/dpo.yaml", "tiny/dpo", "./tiny/dpo.yaml"):
        assert Path(recipes.resolve_config(spec)).resolve() == tiny_dpo, spec
    assert Path(recipes.resolve_config("configs/sd15_dpo_pickapic.yaml")).resolve() == PKG / "configs/recipes/sd15_dpo_pickapic.yaml"
    assert Path(recipes.resolve_config("configs/testbed/job.yaml")).resolve() == PKG / "testbed/configs/job.yaml"
    assert Path(recipes.resolve_config("configs/reward/tiny_pickscore.yaml")).resolve() == PKG / "configs/reward/tiny_pickscore.yaml"
    # a user's own file wins over the packaged one of the same relative path
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny/dpo.yaml").write_text("method: mapo\n")
    assert recipes.resolve_config("tiny/dpo.yaml") == Path("tiny/dpo.yaml")
    assert load_config("tiny/dpo.yaml", ["data=D"]).method == "mapo"
    assert load_config("tiny/dpo", ["model=M", "data=D"]).method == "dpo"  # no file tiny/dpo: the packaged one


def test_recipe_names_and_aliases_resolve():
    names = recipes.recipe_names()
    stems = sorted(p.stem for p in (PKG / "configs/recipes").glob("*.yaml"))
    assert sorted(names) == sorted(s.replace("_", "-") for s in stems) and len(names) >= 4
    for spec in ("sd15-dpo-pickapic", "sd15_dpo_pickapic", "sd15-dpo", "SD15-DPO", "sd15-dpo-pickapic.yaml"):
        assert Path(recipes.resolve_config(spec)).name == "sd15_dpo_pickapic.yaml", spec
    cfg = load_config("sd15-dpo", ["model=M", "data=D"])
    assert (cfg.method, cfg.model, cfg.loss.beta) == ("dpo", "M", 5000.0)
    assert load_config("sd35-flow-grpo", []).method == "grpo"
    # a prefix two recipes share is no alias; a unique one is
    assert recipes.recipe_aliases(["a-b-c", "a-b-d", "a-x-y"]) == {"a-x": "a-x-y"}
    assert "sd15" not in recipes.recipe_aliases() and "sd15-dpo" in recipes.recipe_aliases()


@pytest.mark.parametrize("spec", ["sd15-dop", "tiny/nope", "configs/tiny/nope.yaml", "../configs/tiny/dpo.yaml"])
def test_unknown_config_is_one_line_listing_what_exists(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", spec, "model=M", "data=D"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"config '{spec}'" in err and "sd15-dpo-pickapic" in err and "tiny/dpo" in err


def test_absolute_missing_path_is_not_redirected_to_a_packaged_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        recipes.resolve_config(tmp_path / "configs/tiny/dpo.yaml")


def test_recipes_command_lists_every_packaged_config_with_a_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    expected = [n for n in recipes.recipe_names()]
    expected += [f"{kind}/{p.stem}" for kind in ("tiny", "reward", "accelerate") for p in (PKG / "configs" / kind).glob("*.yaml")]
    for name in expected:
        assert name in rows, name
        assert len(rows[name].split(None, 1)[1].strip()) > 10, f"{name}: no description"
    assert "(sd15-dpo)" in rows["sd15-dpo-pickapic"]
    assert main(["recipes", "--path", "accelerate/ddp"]) == 0
    assert Path(capsys.readouterr().out.strip()).resolve() == PKG / "configs/accelerate/ddp.yaml"


def test_demo_refuses_a_missing_packaged_config_before_any_work(tmp_path, monkeypatch, capsys):
    # an install without its configs once made demo silently train with other hyper-parameters
    empty = tmp_path / "no_configs"
    empty.mkdir()
    monkeypatch.setattr(recipes, "configs_root", lambda: empty)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "tiny/dpo.yaml" in err and "missing" in err
    assert not (tmp_path / "demo" / "base_model").exists()

