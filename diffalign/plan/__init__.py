"""Memory plans as numbers (``diffalign plan``): the GPU memory per training process of a config.

* :mod:`.shapes` -- packaged model shape configs built on the meta device: exact parameter counts,
  LoRA counts from the layers' shapes, the activation probe;
* :mod:`.estimate` -- what each trainer keeps on the GPU, term by term (:func:`plan_recipe`);
* :mod:`.render` -- a plan's breakdown, the Markdown page of every recipe.

This layer reads trainer configs generically (``cfg.needs_reference``, ``cfg.ema``, ...); it never
imports a trainer: the caller imports ``diffalign.trainers`` so ``load_config`` knows every method.
"""

from .estimate import MODEL_SHAPES, MemoryPlan, Part, plan_config, plan_recipe, recipe_launch
from .render import all_recipe_plans, describe, memory_plans_markdown, table
from .shapes import build_meta, count_params, lora_param_count, probe_activations

__all__ = [
    "MODEL_SHAPES", "MemoryPlan", "Part", "all_recipe_plans", "build_meta", "count_params", "describe",
    "lora_param_count", "memory_plans_markdown", "plan_config", "plan_recipe", "probe_activations", "recipe_launch", "table",
]
