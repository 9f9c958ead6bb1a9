from pathlib import Path

import pytest

from diffalign.config import ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_nest_and_parse_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=true", "d=x", "e=1.0e-4"]) == {"a": {"b": 1, "c": True}, "d": "x", "e": 1e-4}


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: dpo\ndata: d\nlearning_rat: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "learning_rat" in str(e.value) and "max_steps" in str(e.value)


def test_unknown_nested_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"lora\.rnak"):
        load_config(None, ["data=d", "lora.rnak=4"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, ["data=d", "max_steps=lots"])


def test_impossible_values_are_refused():
    with pytest.raises(ConfigError, match="loss.beta"):
        load_config(None, ["data=d", "loss.beta=-1"])
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=ppo", "data=d"])
    with pytest.raises(ConfigError, match="data"):
        load_config(None, ["method=dpo"])


def test_tiny_configs_resolve_with_public_keys():
    for method in ("dpo", "mapo", "sft"):
        cfg = load_config(ROOT / f"diffalign/configs/tiny/{method}.yaml", ["model=M", "data=D", "output_dir=O", "max_steps=3", "seed=7"])
        assert (cfg.method, cfg.model, cfg.data, cfg.output_dir, cfg.max_steps, cfg.seed) == (method, "M", "D", "O", 3, 7)


def test_real_recipes_parse():
    import glob

    paths = glob.glob(str(ROOT / "diffalign/configs/recipes/*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path)
        assert cfg.max_steps > 0


def test_yaml11_words_on_the_command_line():
    """`mixed_precision=no` is the string "no" (YAML 1.1 would make it False); bool fields still read yes/no."""
    from diffalign.config import load_config

    cfg = load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["mixed_precision=no", "model=m", "data=d"])
    assert cfg.mixed_precision == "no"
    cfg = load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["model=m", "data=d", "data_opts.random_flip=no"])
    assert cfg.data_opts.random_flip is False
    cfg = load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["model=m", "data=d", "data_opts.random_flip=on"])
    assert cfg.data_opts.random_flip is True


def test_an_unknown_key_suggests_the_nearest_valid_one():
    """A typo names the key it probably meant (issue #28), besides listing the valid keys."""
    import diffalign.trainers  # noqa: F401 - registers the trainer configs
    from diffalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rte' \(did you mean 'optim.learning_rate'\?\)"):
        load_config("tiny/dpo", ["model=M", "data=D", "optim.learning_rte=1e-4"])
    with pytest.raises(ConfigError) as e:
        load_config("tiny/dpo", ["model=M", "data=D", "zzzz=1"])
    assert "did you mean" not in str(e.value)
