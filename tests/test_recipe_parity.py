"""Recipe parity (issue 14 item 2): docs/recipe_parity.md is the published-values table (recipe, key,
value, source). Each row must belong to a packaged recipe and equal that recipe's resolved config."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import pytest
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
            "flux1_dev_branchgrpo_hpsv21"} <= set(PACKAGED)
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

