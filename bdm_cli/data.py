"""Images in, tensors out: decoding, RGB/grayscale conversion, center crop, resize, [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserError

__all__ = ["DataError", "IMAGE_SUFFIXES", "load_image", "preprocess"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_PIXELS = 20_000 * 20_000  # far above any photo; refuses decompression bombs


class DataError(UserError):
    """Unreadable or missing data."""


def preprocess(img, resolution: int, channels: int = 3) -> torch.Tensor:
    """A PIL image to a [C, R, R] float tensor in [-1, 1]: convert mode, center-crop to a square,
    resize with antialiasing (as EDM's dataset tool and ADM do)."""
    from PIL import Image

    # draft() lets JPEG decode at a reduced scale: huge photos never decode at full size.
    img.draft("L" if channels == 1 else "RGB", (resolution, resolution))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr * (255.0 / max(arr.max(), 1.0)) if arr.max() > 255 else arr).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)  # transparent areas become white, not black
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC if side < resolution else Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1


def load_image(path: Path | str, resolution: int, channels: int = 3) -> torch.Tensor:
    """Read one image file as a [C, R, R] tensor in [-1, 1], with clear errors for bad files."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {path}")
    if path.is_dir():
        raise DataError(f"expected an image file, got a directory: {path}")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as img:
            return preprocess(img, resolution, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None
