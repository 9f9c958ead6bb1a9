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


def fix_safetensors_modes(root: str | Path) -> None:
    """Give ``root`` (a ``.safetensors`` file, or every one under a directory) the mode of the other
    files we write: safetensors keeps the 0600 of its private temporary file."""
    root = Path(root)
    files = [root] if root.is_file() else root.rglob("*.safetensors")
    for f in files:
        if f.suffix == ".safetensors":
            world_readable(f)


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


def rgb_image(img):
    """A PIL image as RGB; transparent pixels (RGBA, or a palette with transparency) are composited
    onto white rather than dropping alpha (which would show whatever colour they happen to hold)."""
    from PIL import Image

    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def decode_image(data: bytes):
    """Encoded image bytes (JPEG, PNG, WebP, ...) -> RGB PIL image (:func:`rgb_image`), decoded now
    so a truncated file fails here rather than later. The one image decoder of the package's data
    readers (the inverse of :func:`jpeg_bytes`); raises ``ValueError`` with a one-line reason."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return rgb_image(img)
    except UnidentifiedImageError:  # its message is only the repr of our BytesIO buffer
        raise ValueError(f"cannot decode image bytes ({len(data)} bytes): not a known image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image bytes ({len(data)} bytes): {e}") from None
