"""Hugging Face Hub look-ups that fail fast when they cannot succeed.

Offline, ``huggingface_hub`` retries a name it cannot resolve for about half a minute (five
back-offs, a dozen log lines) before the library says it could not connect. A mistyped model or
dataset name on a laptop without network should be one line at once: :func:`check_hub_name`
asks whether the hub host is reachable (one DNS look-up and TCP connect, a few seconds at most)
and whether the repository is in the local hub cache, before any library call is made.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

_TRUE = ("1", "true", "yes", "on")


def hub_offline_by_setting() -> bool:
    """``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) set: the libraries only read their caches."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_endpoint() -> str:
    """The hub URL the libraries use (``HF_ENDPOINT``, default https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds (cached per
    process: one probe, not one per file)."""
    url = urlparse(endpoint or hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_cache_dir() -> Path:
    """The local hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the hub cache holds a snapshot of ``repo_id`` (its ``models--ORG--NAME`` folder)."""
    folder = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if (folder / "snapshots").is_dir():
        return True
    if repo_type == "dataset":  # datasets' own cache of prepared splits (HF_DATASETS_CACHE)
        root = os.environ.get("HF_DATASETS_CACHE") or hub_cache_dir().parent / "datasets"
        return (Path(root).expanduser() / repo_id.replace("/", "___")).is_dir()
    return False


def check_hub_name(name: str, key: str, repo_type: str = "model") -> None:
    """Raise one :class:`UserError` at once when ``name`` (config key ``key``), not a local path,
    can only come from the hub and the hub cannot be reached and the cache does not have it."""
    if Path(name).expanduser().exists() or in_hub_cache(name, repo_type):
        return
    if hub_offline_by_setting():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = f"{urlparse(hub_endpoint()).hostname} cannot be reached"
    else:
        return  # online: the hub answers a wrong name with a quick "not found"
    kind = "dataset" if repo_type == "dataset" else "model"
    raise UserError(f"{key}={name!r}: no such directory, no {kind} of that name in the hub cache "
                    f"({hub_cache_dir()}), and {why}: check the name, or download it while online")
