"""Small file helpers shared by every layer (no diffalign imports)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def world_readable(path: str | Path) -> None:
    """Give a file we wrote the usual mode (0644 under umask 022). safetensors writes through a
    private temp file and keeps its 0600, unlike every other file we write."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_UMASK)


def save_safetensors(tensors: dict, path: str | Path) -> None:
    """``safetensors.torch.save_file`` with the usual file mode."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    world_readable(path)


def jpeg_bytes(arr, quality: int = 90) -> bytes:
    """``uint8 [H, W, 3]`` array -> JPEG bytes (the one encoder the package's data writers use)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
