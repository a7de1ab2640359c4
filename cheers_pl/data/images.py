"""Image decoding that never trusts a file's name, and the paper's two preprocessings.

``decode_image`` sniffs the format from the bytes (a ``.jpg`` that is really a PNG decodes),
loads fully (a truncated file fails here, not later) and converts every colour mode to RGB:
palette, grayscale, CMYK and 16-bit images are converted exactly; transparency is composited
over white. It returns what it repaired, so the loader can count it.

Preprocessing (DESIGN section 5): understanding images have their longer side resized to the
image size keeping the aspect ratio, then are padded to a square; generation images have their
shorter side resized to the image size, then are centre-cropped.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from cheers_pl.data.schema import SampleError

FORMAT_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}


def open_image(data: bytes) -> Image.Image:
    """Open and fully load encoded image bytes; raises ``SampleError("corrupt_image")``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SampleError("corrupt_image", f"cannot decode image ({len(data)} bytes): {err}") from None
    return img


def image_extension(img: Image.Image) -> str:
    """The file extension of the image's real format (``jpg``, ``png``, ...)."""
    return FORMAT_EXT.get(img.format or "", (img.format or "png").lower())


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """(RGB image, what was repaired or None). 16-bit channels are scaled exactly to 8 bits; 8-bit
    grayscale is not a repair (its three channels are the one, exactly)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode == "L":  # 8-bit grayscale: each value copied to R, G and B, nothing lost, no repair to count
        return img.convert("RGB"), None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr / top * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), f"mode:{mode}"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), f"mode:{mode}"
    return img.convert("RGB"), f"mode:{mode}"


def decode_image(data: bytes) -> tuple[Image.Image, str | None]:
    """Encoded bytes -> (RGB PIL image, repair note or None); raises ``SampleError``."""
    return to_rgb(open_image(data))


def resize_pad(img: Image.Image, size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Understanding: longer side -> ``size`` keeping aspect ratio, centred on a ``size`` square."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Generation: shorter side -> ``size`` keeping aspect ratio, then a centred ``size`` square crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1] (the released processor only divides by 255)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
