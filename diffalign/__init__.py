"""diffalign: align text-to-image diffusion and flow-matching models with human preferences.

The public Python API lives in :mod:`diffalign.api` and is re-exported here, loaded on first use
(``import diffalign`` stays cheap for the command line)::

    import diffalign as da
    cfg = da.load_config("tiny/dpo", model="M", data="D", output_dir="O", max_steps=3)
    da.train(cfg)

What ``__all__`` names is the stable surface; other modules are internal.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError", "EvalConfig", "ForwardRLConfig", "GRPOConfig", "PairTrainConfig", "Reward", "UserError",
    "compare", "config_dict", "evaluate", "get_reward", "load_config", "load_pipeline", "score", "tiny_model",
    "toy_data", "train",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
