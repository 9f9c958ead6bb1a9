"""Registration of the testbed rewards in the package reward registry.

``register_testbed_rewards()`` registers ``"testbed"`` (verifiable faithfulness,
:class:`~diffalign.testbed.reward.TestbedReward`), ``"testbed_soft"`` (its graded version) and ``"testbed_style"`` (the hidden
utility, :class:`~diffalign.testbed.pairs.StyleReward`) with
``diffalign.rewards.register_reward``. Imports are lazy, so ``diffalign.rewards`` may
itself call this function without an import cycle.
"""

from __future__ import annotations

from typing import Any

TESTBED_REWARD_NAMES = ("testbed", "testbed_soft", "testbed_style")


def _wrap(fn, name: str, batch_size: int):
    """Wrap a plain reward callable in the package's ``FunctionReward``."""
    from diffalign.rewards.base import FunctionReward

    return FunctionReward(fn, name, needs_prompt=True, batch_size=batch_size, device="cpu")


def make_testbed_reward(batch_size: int = 256, min_area_frac: float = 0.006, max_colour_dist: float = 80.0, **_: Any):
    """Factory for ``"testbed"`` (extra options such as ``device`` are ignored: CPU, numpy)."""
    from .reward import TestbedReward

    return _wrap(TestbedReward(min_area_frac=min_area_frac, max_colour_dist=max_colour_dist), "testbed", batch_size)


def make_testbed_soft_reward(batch_size: int = 256, min_area_frac: float = 0.006, max_colour_dist: float = 80.0, **_: Any):
    """Factory for ``"testbed_soft"``: the same checks, shape/size/position graded by margins."""
    from .reward import TestbedReward

    reward = TestbedReward(min_area_frac=min_area_frac, max_colour_dist=max_colour_dist, soft=True)
    return _wrap(reward, "testbed_soft", batch_size)


def make_testbed_style_reward(batch_size: int = 256, faithfulness_weight: float = 1.0, aesthetic_weight: float = 0.5, **_: Any):
    """Factory for ``"testbed_style"`` (the hidden utility)."""
    from .pairs import StyleReward

    return _wrap(StyleReward(faithfulness_weight, aesthetic_weight), "testbed_style", batch_size)


def register_testbed_rewards(overwrite: bool = False) -> tuple[str, ...]:
    """Register ``testbed``, ``testbed_soft`` and ``testbed_style`` with ``diffalign.rewards.register_reward``.

    Called on ``import diffalign.testbed``; calling it again is harmless. Afterwards
    ``diffalign.rewards.get_reward("testbed")`` builds the reward.
    """
    from diffalign.rewards import register_reward

    register_reward(
        "testbed",
        make_testbed_reward,
        description="Testbed world: GenEval-style verifiable prompt faithfulness from pixels (fraction of attributes met)",
        overwrite=overwrite,
    )
    register_reward(
        "testbed_soft",
        make_testbed_soft_reward,
        description="Testbed world: the testbed checks with shape/size/position graded by logistic margins "
        "(a shaped training reward for online RL)",
        overwrite=overwrite,
    )
    register_reward(
        "testbed_style",
        make_testbed_style_reward,
        description="Testbed world: hidden human utility = faithfulness + 0.5 * warm-background taste",
        overwrite=overwrite,
    )
    return TESTBED_REWARD_NAMES


def register_testbed_prompt_sets() -> None:
    """``diffalign eval --prompts testbed_heldout[:N]`` / ``testbed_train[:N]``: the held-out and the
    training caption sets of the world."""
    from ..eval.generate import register_prompt_set
    from .prompts import heldout_prompts, train_prompts

    register_prompt_set("testbed_heldout", heldout_prompts)
    register_prompt_set("testbed_train", train_prompts)


def auto_register() -> None:
    """:func:`register_testbed_rewards` (unless another module already owns the names) and the
    testbed's prompt sets."""
    try:
        register_testbed_rewards()
    except ValueError:  # the names are taken by another module's factories
        pass
    register_testbed_prompt_sets()
