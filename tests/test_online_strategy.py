"""One online loop, two strategies (issue #28): every online method runs :class:`OnlineRecipe` with
the strategy of its family, and both families' advantages fill the one contract the loop reads."""

from __future__ import annotations

import torch

from diffalign.trainers import TRAINERS
from diffalign.trainers.forward_config import FORWARD_METHODS
from diffalign.trainers.forward_process import ForwardProcessStrategy, ImageAdvantages
from diffalign.trainers.online import STRATEGIES, train_online
from diffalign.trainers.strategy import Advantages, OnlineStrategy, StepRewards
from diffalign.trainers.trajectory import TrajectoryStrategy, TransitionAdvantages, Transitions


def test_every_online_method_runs_the_one_loop_with_its_family_strategy():
    assert STRATEGIES["grpo"] is TrajectoryStrategy
    assert all(STRATEGIES[m] is ForwardProcessStrategy for m in FORWARD_METHODS)
    assert all(TRAINERS[m] is train_online for m in STRATEGIES)
    assert all(issubclass(s, OnlineStrategy) for s in STRATEGIES.values())


def test_both_advantage_types_give_the_loop_the_rewards_and_the_trained_rows_advantages():
    rewards = StepRewards({"r": torch.arange(4.0)}, torch.tensor([0, 0, 1, 1]), torch.arange(4.0),
                          [torch.tensor([1.0, -1.0, 2.0, -2.0])])
    n, latent = 5, torch.zeros(5, 1, 2, 2)
    trans = Transitions(x=latent, x_next=latent, log_prob=torch.zeros(n), mean=latent, step=torch.arange(n),
                        timestep=torch.arange(n), prompt=torch.zeros(n, dtype=torch.long), advantage=torch.arange(n) * 1.0)
    by_transition = TransitionAdvantages(rewards, trans, torch.tensor([1, 3]))
    by_image = ImageAdvantages(rewards, torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]), rewards.per_depth[-1])
    for adv in (by_transition, by_image):
        assert isinstance(adv, Advantages) and adv.rewards is rewards
    assert by_transition.trained_advantages.tolist() == [1.0, 3.0]  # the selected transitions only
    assert by_image.trained_advantages.tolist() == [1.0, -1.0, 2.0, -2.0]
