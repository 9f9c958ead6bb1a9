"""Config help as data (issue 28): every field carries its help in metadata, and
``diffalign train CONFIG --help-keys`` / ``diffalign recipes --show`` print it with the resolved value."""

from __future__ import annotations

import dataclasses

import pytest

import diffalign.trainers  # noqa: F401  registers every trainer config
from diffalign import recipes
from diffalign.cli import main
from diffalign.config import CONFIG_CLASSES, config_keys, load_config, option, yaml_key_comments
from diffalign.trainers.pair_config import PairLossOptions


def keys_without_help(cls: type) -> list[str]:
    return [row.key for row in config_keys(cls) if not row.help.strip()]


def test_every_field_of_every_config_has_help():
    from diffalign.eval.benchmarks import BenchmarkConfig
    from diffalign.eval.generate import EvalConfig
    from diffalign.trainers.reward_model import RewardTrainConfig

    classes = set(CONFIG_CLASSES.values()) | {EvalConfig, RewardTrainConfig, BenchmarkConfig}
    missing = {cls.__name__: keys_without_help(cls) for cls in classes}
    assert all(not keys for keys in missing.values()), f"config fields without help: {missing}"


@dataclasses.dataclass
class Block:
    documented: int = option(1, help="has help")
    bare: float = 0.5


@dataclasses.dataclass
class Planted:
    block: Block = option(factory=Block, help="a block")
    items: list[Block] = option(factory=list, help="a list of blocks")


def test_a_field_without_help_is_caught():
    assert keys_without_help(Planted) == ["block.bare", "items[].bare"]


def test_config_keys_reads_values_defaults_and_types():
    cfg = load_config("tiny/grpo.yaml", ["model=M", "sampler.noise_level=0.3"])
    rows = {r.key: r for r in config_keys(cfg)}
    row = rows["sampler.noise_level"]
    assert (row.type, row.default, row.value) == ("float | None", None, 0.3)
    assert rows["rewards[].weight"].type == "float"
    assert rows["lora.target_modules"].type == "list[str] | None"


def _help_keys_output(capsys, *argv: str, prefix: str | None = None) -> str:
    assert main(["train", *argv, "--help-keys", *([prefix] if prefix else [])]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(recipes.recipe_names()))
def test_help_keys_prints_every_key_of_every_recipe_with_help(capsys, name):
    out = _help_keys_output(capsys, name)
    cfg = load_config(name)
    lines = out.splitlines()
    for row in config_keys(cfg):
        head = next((i for i, line in enumerate(lines) if line.startswith((f"{row.key} = ", f"{row.key}  ("))), None)
        assert head is not None, f"{name}: {row.key} not printed"
        # the help follows the key's line, indented, wrapped
        body = " ".join(line.strip() for line in lines[head + 1:head + 12] if line.startswith("    "))
        assert " ".join(row.help.split()[:6]) in body, f"{name}: help of {row.key} not printed"


def test_help_keys_says_where_each_value_comes_from(capsys):
    out = _help_keys_output(capsys, "sd15-dpo", "optim.warmup_steps=7", "loss.beta=2500")
    assert "optim.warmup_steps = 7  (int; command line; default 0)" in out
    assert "optim.learning_rate = 1.0e-08  (float; sd15_dpo_pickapic.yaml; default 0.0001)" in out
    assert "optim.adam_beta1 = 0.9  (float; default)" in out
    # the recipe's own comment on a key is printed beside it: the "why" of its value
    assert "sd15_dpo_pickapic.yaml: x 8 GPUs (accelerate/ddp) = 2048 pairs per step" in out


def test_help_keys_prefix_filters_and_a_bad_prefix_is_one_line(capsys):
    out = _help_keys_output(capsys, "tiny/grpo.yaml", "model=M", prefix="sampler")
    assert out.startswith("sampler.") and all(not line or line.startswith(("sampler.", "    ")) for line in out.splitlines())
    assert main(["train", "tiny/grpo.yaml", "model=M", "--help-keys", "samplr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config key starts with 'samplr'" in err[0] and "sampler" in err[0]


def test_recipes_show_prints_the_recipe_and_only_the_keys_it_sets(capsys):
    assert main(["recipes", "--show", "sd35-flow-grpo"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("Flow-GRPO (Liu et al. 2025)")  # the file's description
    assert "sampler.noise_level = 0.7  (float | None; sd35_flow_grpo_pickscore.yaml; default null)" in out
    assert "sd35_flow_grpo_pickscore.yaml: same_latent: False" in out
    assert "sampler.pre_window_solver" not in out  # not set by the recipe: a default
    assert "keep their defaults: diffalign train sd35-flow-grpo --help-keys" in out


def test_yaml_key_comments_reads_line_block_and_flow_comments():
    text = (
        "# the file's description, not a key's\n"
        "method: grpo\n"
        "max_steps: 10   # why ten\n"
        "# above the block\n"
        "optim: {learning_rate: 1.0e-4,\n"
        "        adam_beta1: 0.9}  # the block's reason\n"
        "sampler:\n"
        "  # above a nested key\n"
        "  num_steps: 4\n"
        "  cfg: false  # no guidance\n"
    )
    assert yaml_key_comments(text) == {
        "max_steps": "why ten",
        "optim": "above the block the block's reason",
        "sampler.num_steps": "above a nested key",
        "sampler.cfg": "no guidance",
    }


def test_pair_loss_options_bases_define_disjoint_keys():
    """``PairLossOptions`` inherits every method's options: with no key defined twice, the order of
    its bases cannot change a default (the precedence question has no answer to get wrong)."""
    seen: dict[str, str] = {}
    for base in PairLossOptions.__mro__[1:]:
        if not dataclasses.is_dataclass(base):
            continue
        own = set(base.__dataclass_fields__) - {f for b in base.__mro__[1:] if dataclasses.is_dataclass(b)
                                                 for f in b.__dataclass_fields__}
        for name in own:
            assert name not in seen, f"loss.{name} is defined by {seen[name]} and {base.__name__}"
            seen[name] = base.__name__
    assert {"snr_value", "lambda_d", "tau", "base", "reward_chosen"} <= set(seen)
