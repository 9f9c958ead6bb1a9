"""Procedural testbed world: a CPU-sized text-to-image world where alignment measurably works.

* :mod:`.world` - scenes, captions, deterministic rendering, styles;
* :mod:`.reward` - caption parser and the GenEval-style verifiable reward (``"testbed"``);
* :mod:`.pairs` - hidden human utility (faithfulness + warm-background taste,
  ``"testbed_style"``), a model-free :class:`WorldSampler`, Pick-a-Pic-schema pairs;
* :mod:`.prompts` - deterministic train / held-out prompt sets;
* :mod:`.training` - base-model training data;
* :mod:`.registry` - :func:`register_testbed_rewards`.
"""

from .pairs import (
    PICKAPIC_COLUMNS,
    HiddenUtility,
    StyleReward,
    WorldSampler,
    apply_target_style,
    background_warmth,
    decode_pairs,
    is_target_style,
    make_pairs,
    pickapic_schema,
    read_pairs,
    world_sampler,
    write_pairs,
)
from .prompts import (
    HELDOUT_PAIRS,
    TRAIN_PAIRS,
    heldout_prompts,
    is_heldout,
    prompt_split,
    read_prompts,
    train_prompts,
    write_prompt_splits,
    write_prompts,
)
from .registry import make_testbed_reward, make_testbed_style_reward, register_testbed_rewards
from .reward import (
    ATTRIBUTES,
    Component,
    PromptParseError,
    TestbedReward,
    check_scene,
    parse_caption,
    segment,
    testbed_reward,
)
from .training import load_training_set, make_training_set, write_training_set
from .world import (
    COLOURS,
    POSITIONS,
    PREFIXES,
    SHAPES,
    SIZES,
    STYLES,
    ObjectGroup,
    Scene,
    Style,
    caption,
    enumerate_scenes,
    layout,
    perturb_scene,
    render,
    sample_scene,
)

from .registry import auto_register

auto_register()  # get_reward("testbed") / ("testbed_style") work once diffalign.testbed is imported

__all__ = [name for name in dir() if not name.startswith("_")]
