"""The documentation site (mkdocs.yml, docs/): it builds with no warning, its generated config
reference lists the real keys, every nav page exists, the getting-started page carries README's
set-up commands verbatim, and the hand-written pages name only code that exists."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GETTING_STARTED = DOCS / "getting-started.md"
# pages generated or checked elsewhere (scripts/memory_plans.py, tests/test_recipe_parity.py, the testbed)
NOT_HAND_WRITTEN = {"memory_plans.md", "recipe_parity.md", "testbed_results.md", "testbed_experiments.md"}
# what the how-to guides add as an example: named there as new, so it does not exist
EXAMPLE_PATHS = {"diffalign/configs/tiny/hinge.yaml"}


def _load_mkdocs_yml() -> dict:
    """mkdocs.yml as data; its ``!!python/...`` and ``!relative`` tags load as None."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _generated_pages() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)  # imports neither mkdocs nor diffalign at module level
    return hooks.GENERATED_PAGES


def _fenced_blocks(markdown: str, section: str) -> list[str]:
    """The bash code blocks of the ``## section`` of a Markdown file, stripped."""
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert m, f"no '## {section}' section"
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", m.group(1), re.S | re.M)]


def test_nav_pages_exist_and_getting_started_has_readme_setup_commands():
    cfg = _load_mkdocs_yml()
    generated = _generated_pages()
    pages = _nav_pages(cfg["nav"])
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"
    missing = [p for p in pages if not (DOCS / p).is_file() and p not in generated]
    assert not missing, f"mkdocs.yml nav lists pages that do not exist: {missing}"
    for page, source in generated.items():
        assert page in pages and (ROOT / source).is_file(), (page, source)
    for page in ("recipe_parity.md", "reference/config.md", "reference/api.md", "getting-started.md"):
        assert page in pages

    readme = _fenced_blocks((ROOT / "README.md").read_text(encoding="utf-8"), "Set up")
    assert len(readme) == 2, f"README's 'Set up' has {len(readme)} bash blocks, the docs copy two"
    page = GETTING_STARTED.read_text(encoding="utf-8")
    for command in readme:
        assert f"```bash\n{command}\n```" in page, f"docs/getting-started.md lacks README's set-up command:\n{command}"


def test_mkdocs_build_strict_and_generated_config_reference(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr

    config_page = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    assert "diffalign:config-reference" not in config_page, "the marker was not replaced"
    for key in ("sampler.num_steps", "loss.beta", "optim.learning_rate", "schedule.kind", "forward.train_timesteps"):
        assert f"<code>{key}</code>" in config_page, key
    for cls in ("PairTrainConfig", "GRPOConfig", "ForwardRLConfig"):
        assert f'id="{cls.lower()}"' in config_page, cls

    api_page = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="diffalign.api.load_config"' in api_page and 'id="diffalign.config.config_keys"' in api_page
    # the docstrings' reST went through docs/griffe_rst.py: doctests are code, roles are plain code
    assert "<blockquote>" not in api_page and ":class:" not in api_page and ":func:" not in api_page

    design = (site / "testbed_design" / "index.html").read_text(encoding="utf-8")
    assert "The testbed: a text-to-image world" in design


def _inline_code(markdown: str) -> list[str]:
    """The inline code spans of a page, fenced blocks left out (the how-tos' examples add new names)."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return [c.strip() for c in re.findall(r"`([^`\n]+)`", text)]


def _resolve(dotted: str) -> bool:
    """``diffalign.a.b.C``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_hand_written_pages_name_only_existing_code():
    """Every repository path (``diffalign/...``, ``tests/...``, ``scripts/...``) and every dotted
    ``diffalign.x.y`` name in the pages' inline code exists: a rename that strands a page fails here."""
    pages = [p for p in DOCS.rglob("*.md") if p.name not in NOT_HAND_WRITTEN]
    assert len(pages) >= 10, pages
    missing = []
    for page in pages:
        for code in _inline_code(page.read_text(encoding="utf-8")):
            for token in re.findall(r"(?<![\w/.])((?:diffalign|tests|scripts|benchmarks)/[\w./-]*|diffalign(?:\.\w+)+)", code):
                token = token.rstrip("./")
                if "/" in token:
                    ok = token in EXAMPLE_PATHS or (ROOT / token).exists()
                else:
                    ok = _resolve(token)
                if not ok:
                    missing.append(f"{page.relative_to(DOCS)}: {token}")
    assert not missing, "docs name code that does not exist:\n" + "\n".join(missing)
