"""Recipe parity (issue 14 item 2): docs/recipe_parity.md is the published-values table (recipe, key,
value, source). Each row must belong to a packaged recipe and equal that recipe's resolved config."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from diffalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "recipe_parity.md"
RECIPES = ROOT / "diffalign" / "configs" / "recipes"
HEADER = re.compile(r"^\|\s*recipe\s*\|\s*key\s*\|\s*value\s*\|\s*source\s*\|\s*$")


def _cell(text: str) -> str:
    return text.strip().strip("`").strip()


def published_rows() -> dict[str, list[tuple[str, object, str]]]:
    """recipe -> [(dotted key, YAML value, source)] from every ``| recipe | key | value | source |`` table."""
    rows: dict[str, list] = defaultdict(list)
    in_table = False
    for line in TABLE.read_text().splitlines():
        if HEADER.match(line):
            in_table = True
            continue
        if not in_table or not line.startswith("|"):
            in_table = False
            continue
        cells = line.strip().strip("|").split("|")
        if set(cells[0].strip()) <= {"-"}:
            continue
        recipe, key, value = (_cell(c) for c in cells[:3])
        source = "|".join(cells[3:]).strip()
        rows[recipe].append((key, yaml.safe_load(value), source))
    return rows


ROWS = published_rows()
PACKAGED = sorted(r for r in ROWS if (RECIPES / f"{r}.yaml").is_file())
REFERENCE_ONLY = sorted(r for r in ROWS if r not in PACKAGED)


def _resolved(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _same(resolved, published) -> bool:
    if isinstance(published, list) and published and isinstance(published[0], dict):
        return len(resolved) == len(published) and all(
            all(_same(getattr(r, k), v) for k, v in p.items()) for r, p in zip(resolved, published))
    if isinstance(published, float) or isinstance(resolved, float):
        return resolved is not None and resolved == pytest.approx(published, rel=1e-9)
    return resolved == published


def test_the_table_covers_the_recipes_and_every_row_names_a_source():
    assert {"sd35_flow_grpo_pickscore", "flux1_dev_dancegrpo_hpsv21", "flux1_dev_mixgrpo", "flux1_dev_mixgrpo_flash",
            "flux1_dev_branchgrpo_hpsv21", "sd35_nft_pickscore", "sd35_awm_pickscore"} <= set(PACKAGED)
    assert not REFERENCE_ONLY, f"table rows without a packaged recipe: {REFERENCE_ONLY}"
    for recipe, rows in ROWS.items():
        keys = [k for k, _, _ in rows]
        assert len(keys) == len(set(keys)), f"{recipe}: a key is listed twice"
        assert all(src for _, _, src in rows), f"{recipe}: a row without a source"


@pytest.mark.parametrize("recipe", PACKAGED)
def test_packaged_recipe_equals_the_published_values(recipe):
    cfg = load_config(RECIPES / f"{recipe}.yaml", [])
    wrong = [(key, _resolved(cfg, key), value) for key, value, _ in ROWS[recipe] if not _same(_resolved(cfg, key), value)]
    assert not wrong, f"{recipe}: (key, recipe value, published value) {wrong}"



def test_forward_process_recipes_are_the_releases_issue_25():
    """The keys issue #25 changed, against the releases' values (NVlabs/DiffusionNFT config/base.py,
    config/nft.py, scripts/train_nft_sd3.py; scxue/advantage_weighted_matching config/dgx_awm.py
    `pickscore_sd3_no_cfg_1node`, scripts/train_sd3_awm.py), and the NFT advantages against the
    release's stat-tracker rule written out here: per-prompt mean, np.std of the whole batch + 1e-4."""
    import numpy as np
    import torch

    from diffalign.trainers.advantages import group_advantages

    nft = load_config(RECIPES / "sd35_nft_pickscore.yaml", [])
    assert nft.advantage.std == "global"  # base.py sample.global_std = True, nft.py does not override it
    assert (nft.forward.fraction_mode, nft.forward.timestep_draw, nft.forward.train_timesteps) == ("count", "per_sample", None)
    assert (nft.ema.enabled, nft.ema.decay, nft.ema.update_every, nft.ema.warmup) == (True, 0.9, 1, True)
    awm = load_config(RECIPES / "sd35_awm_pickscore.yaml", [])
    a = awm.awm
    assert (a.loss_type, a.ema_beta, a.kl_ema_decay, a.kl_ema_decay_type, a.kl_ema_decay_rate) == (
        "exp_first", 1.0, 0.3, "linear", 0.001)

    # a synthetic PickScore-like epoch: 48 prompts x 24 images, prompt means spread wider than the groups
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(48), 24)
    rewards = rng.normal(21.0, 1.0, 48)[prompts] + rng.normal(0.0, 0.4, 48 * 24)
    release = np.empty_like(rewards)
    for p in range(48):
        m = prompts == p
        release[m] = (rewards[m] - rewards[m].mean()) / (np.std(rewards) + 1e-4)
    ours = group_advantages(torch.tensor(rewards), torch.tensor(prompts), nft.advantage.std, nft.advantage.eps, None,
                            nft.advantage.std_ddof)
    assert np.allclose(ours.numpy(), release, atol=1e-5)  # diffalign computes in fp32
    per_group = group_advantages(torch.tensor(rewards), torch.tensor(prompts), "group", 1e-4, None, 0)
    assert float(per_group.abs().mean() / ours.abs().mean()) > 2.0  # the old `std: group` was ~2.5x larger


class _ToyFlow:
    calls = rows = 0

    def __call__(self, x, t, prompt_index, net=None):
        return 0.8 * x - torch.tanh(x.flip(-1)) * (1 - t.float().view(-1, 1, 1, 1) / 1000)


def _toy_table(n: int, shift: float = 3.0):
    from diffalign.pipelines import SamplingTable

    t = torch.linspace(1, 0, n + 1)
    s = shift * t / (1 + (shift - 1) * t)
    nxt = torch.where(s[1:] > 0, s[1:] * 1000, torch.full((n,), -1.0))
    return SamplingTable("flow", s[:-1] * 1000, nxt, 1 - s[:-1], s[:-1], 1 - s[1:], s[1:], float(s[1]))


def _trained(recipe: str, iteration: int = 0, rows: int = 1):
    """The transitions one training step of ``recipe`` trains (its plan, selection and pruning: TrajectoryStrategy.advantages),
    on a toy flow model with tiny latents: (rollout transitions, selected indices)."""
    from types import SimpleNamespace

    from diffalign.pipelines import make_step_kind, rollout
    from diffalign.trainers.rollout_schedule import make_plan
    from diffalign.trainers.strategy import StepRollout, step_rewards
    from diffalign.trainers.trajectory import TrajectoryStrategy

    cfg = load_config(RECIPES / f"{recipe}.yaml", [])
    g = torch.Generator().manual_seed(0)
    plan, _ = make_plan(cfg, iteration, g)
    table = _toy_table(cfg.sampler.num_steps)
    ro = rollout(_ToyFlow(), table, plan, make_step_kind(cfg.sampler.step), torch.randn(rows, 1, 2, 2, generator=g),
                 torch.arange(rows), g)
    scores = {r.name: torch.randn(ro.final.shape[0], generator=g) for r in cfg.rewards}
    fake = SimpleNamespace(cfg=cfg, accelerator=SimpleNamespace(num_processes=1, process_index=0), table=table,
                           generator=g, device=torch.device("cpu"))
    rolled = StepRollout(None, ro, scores, {})
    got = TrajectoryStrategy(fake).advantages(rolled, step_rewards(fake.accelerator, cfg, rolled), iteration + 1)
    return ro.transitions, got.selected


@pytest.mark.parametrize("recipe", ["flux1_dev_mixgrpo", "flux1_dev_mixgrpo_flash"])
def test_mixgrpo_recipes_train_every_window_step(recipe):
    """MixGRPO's training_strategy "part" trains train_timesteps = the window's steps, for every image (its
    --timestep_fraction 0.6 is read only by "all"): 12 images x 4 window steps = 48 at the first iteration."""
    for iteration, window in ((0, [0, 1, 2, 3]), (30, [1, 2, 3, 4])):
        tr, selected = _trained(recipe, iteration, rows=12)
        assert sorted(set(tr["step"].tolist())) == window
        assert selected.numel() == tr["step"].numel() == 12 * len(window)


def test_branchgrpo_recipe_trains_every_tree_transition_with_the_last_step():
    """BranchGRPO trains every edge that collect_all_transitions gathers (--timestep_fraction and --ignore_last are
    parsed, never used): per tree, steps 0-2 x 2 nodes, 3-5 x 4, 6-8 x 8, 9-19 x 16 = 218, two prompts = 436,
    the 32 transitions of the last step among them."""
    cfg = load_config(RECIPES / "flux1_dev_branchgrpo_hpsv21.yaml", [])
    n, branch = cfg.sampler.num_steps, cfg.schedule.tree.branch_steps
    per_tree = sum(2 ** sum(b <= s for b in branch) for s in range(n))
    assert per_tree == 218
    tr, selected = _trained("flux1_dev_branchgrpo_hpsv21", rows=2)
    assert selected.numel() == tr["step"].numel() == 2 * per_tree == 436
    assert int((tr["step"][selected] == n - 1).sum()) == 2 * 16


def test_sd15_recipes_name_the_maintained_hub_copy():
    """runwayml/stable-diffusion-v1-5 was removed from the hub in 2024; the maintained copy is
    stable-diffusion-v1-5/stable-diffusion-v1-5 (issue #30, item 5)."""
    from diffalign.config import load_config

    for name in ("sd15_dpo_pickapic", "sd15_ddpo_pickscore"):
        assert load_config(name, []).model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    import diffalign

    root = Path(diffalign.__file__).parent
    offenders = [p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "runwayml/" in p.read_text()]
    assert not offenders, offenders
