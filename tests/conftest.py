"""Shared fixtures: tiny models and toy data built once per session, offline."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import diffalign.trainers  # noqa: F401  registers every trainer config with diffalign.config.load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# The pair trainer's latent cache is on by default: in tests it goes to a temp dir, not ~/.cache.
# Set at import, so the environments test modules copy at import (for subprocesses) carry it.
_LATENT_CACHE = tempfile.mkdtemp(prefix="diffalign-test-latents-")
os.environ["DIFFALIGN_LATENT_CACHE"] = _LATENT_CACHE
atexit.register(shutil.rmtree, _LATENT_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def latent_cache_root() -> Path:
    """Where default-on latent caches of this test session go."""
    return Path(_LATENT_CACHE)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(kind)`` -> path of a tiny diffusers pipeline, built once per kind."""
    from diffalign.models.tiny import BUILDERS

    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            cache[kind] = str(BUILDERS[kind](tmp_path_factory.mktemp(f"tiny_{kind}")))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory) -> str:
    from diffalign.data.toy import write_toy_pickapic

    out = tmp_path_factory.mktemp("toy_pickapic")
    write_toy_pickapic(out, n=48, size=32, seed=0)
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny reward models: one intra-op thread (OpenMP spin-waits cost more than they save)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
