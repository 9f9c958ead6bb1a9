"""Weight-free image statistics as rewards: smoke tests and tiny-model GRPO runs.

Each is a plain function ``reward(images, prompts=None, metadata=None) -> scores [B]`` (float32),
with ``images`` a ``[B, 3, H, W]`` tensor in ``[0, 1]``; prompts are ignored. A random tiny
model can move these within a few GRPO steps, which is what the tests need. Importing this
module registers them with :func:`diffalign.rewards.register_reward` (as
:class:`~diffalign.rewards.FunctionReward`), so ``get_reward("redness")`` works.
"""

from __future__ import annotations

import torch


def _check(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {getattr(images, 'shape', type(images))}")
    return images.float()


def brightness(images, prompts=None, metadata=None) -> torch.Tensor:
    """Mean pixel value over channels and pixels, in [0, 1]."""
    return _check(images).mean(dim=(1, 2, 3))


def darkness(images, prompts=None, metadata=None) -> torch.Tensor:
    """``1 - brightness``."""
    return 1.0 - brightness(images)


def _channel_excess(images, c: int) -> torch.Tensor:
    x = _check(images)
    means = x.mean(dim=(2, 3))  # [B, 3]
    others = [i for i in range(3) if i != c]
    return means[:, c] - means[:, others].mean(dim=1)


def redness(images, prompts=None, metadata=None) -> torch.Tensor:
    """Mean of R minus the mean of G and B, in [-1, 1]."""
    return _channel_excess(images, 0)


def greenness(images, prompts=None, metadata=None) -> torch.Tensor:
    """Mean of G minus the mean of R and B, in [-1, 1]."""
    return _channel_excess(images, 1)


def blueness(images, prompts=None, metadata=None) -> torch.Tensor:
    """Mean of B minus the mean of R and G, in [-1, 1]."""
    return _channel_excess(images, 2)


def contrast(images, prompts=None, metadata=None) -> torch.Tensor:
    """Standard deviation of the grey-level image (mean over channels), in [0, 0.5]."""
    return _check(images).mean(dim=1).flatten(1).std(dim=1, unbiased=False)


SIMPLE_REWARDS = {
    "brightness": brightness,
    "darkness": darkness,
    "redness": redness,
    "greenness": greenness,
    "blueness": blueness,
    "contrast": contrast,
}


def _register() -> None:
    from .base import FunctionReward
    from .registry import register_reward

    for name, fn in SIMPLE_REWARDS.items():
        def factory(path=None, _fn=fn, _name=name, **kw):
            kw.setdefault("device", "cpu")
            return FunctionReward(_fn, _name, needs_prompt=False, **kw)

        factory.__doc__ = (fn.__doc__ or name).split("\n")[0] + " (weight-free)"
        try:
            register_reward(name, factory)
        except ValueError:  # already registered (module re-imported, or another module owns the name)
            pass


_register()
