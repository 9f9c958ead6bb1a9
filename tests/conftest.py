"""Shared fixtures: tiny models and toy data built once per session, offline."""

from __future__ import annotations

import os

import pytest
import torch

import diffalign.trainers  # noqa: F401  registers every trainer config with diffalign.config.load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def latent_cache_root(tmp_path_factory):
    """The pair trainer's default latent cache (on by default) goes to a session temp dir, not ~/.cache."""
    root = tmp_path_factory.mktemp("latent_cache")
    old = os.environ.get("DIFFALIGN_LATENT_CACHE")
    os.environ["DIFFALIGN_LATENT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DIFFALIGN_LATENT_CACHE", None)
    else:
        os.environ["DIFFALIGN_LATENT_CACHE"] = old


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
