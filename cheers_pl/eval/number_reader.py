"""``NumberReader``: reads the demo's rendered numbers by digit segmentation and glyph templates.

Not a judge of the model's answers (those are compared with the known number of each held-out
image); it checks that the reading images stay legible at the model's size, and can score
number-drawing generation. Steps, on a grayscale image (H, W) in [0, 1]:

1. columns whose brightest pixel exceeds ``threshold`` x the image maximum are ink; each run of
   ink columns is one digit (the renderer keeps >= 2 px between digits on its 64 px canvas, so
   >= 1 px at 32 px);
2. each digit is cropped to its ink rows, padded to a square, area-downsampled to 8x8 and
   standardised (zero mean, unit norm);
3. it is the digit of the most correlated template: Pillow's bundled font rendered at a few sizes
   and strokes, prepared at the same image size by the same steps.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TEMPLATE_SIZES, TEMPLATE_STROKES = (20, 28, 36), (0, 1)


def glyph_features(crop: np.ndarray) -> np.ndarray:
    """A digit crop (h, w) -> (64,) zero-mean, unit-norm features of its square 8x8 average."""
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side))
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
    f = F.adaptive_avg_pool2d(torch.tensor(square)[None, None], 8).flatten().numpy()
    f = f - f.mean()
    return f / (np.linalg.norm(f) + 1e-6)


def segments(image: np.ndarray, threshold: float = 0.35) -> list[np.ndarray]:
    """The digit crops of a grayscale image (H, W), left to right (see the module docstring)."""
    top = float(image.max())
    if top <= 0:
        return []
    ink = image.max(0) > threshold * top
    crops, i = [], 0
    while i < len(ink):
        if not ink[i]:
            i += 1
            continue
        j = i
        while j < len(ink) and ink[j]:
            j += 1
        part = image[:, i:j]
        rows = np.nonzero(part.max(1) > threshold * top)[0]
        crops.append(part[rows[0] : rows[-1] + 1])
        i = j
    return crops


@lru_cache(maxsize=8)
def templates(side: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (T, 64), digits (T,)) of the font's digits drawn on the 64 px canvas, resized to ``side``."""
    from data_recipes import numbers

    feats, labels = [], []
    for size in TEMPLATE_SIZES:
        for stroke in TEMPLATE_STROKES:
            for digit in range(10):
                img = numbers.draw(numbers.Rendering(str(digit), size, stroke, 255, 10, 10))
                if side != numbers.CANVAS:
                    img = img.resize((side, side), Image.Resampling.BICUBIC)
                crop = segments(np.asarray(img, dtype=np.float64) / 255.0)[0]
                feats.append(glyph_features(crop))
                labels.append(digit)
    return np.stack(feats), np.asarray(labels)


class NumberReader:
    """Reads white-on-black rendered numbers; ``read`` takes (N,3,H,W), (N,H,W) in [0,1] (square)."""

    def __init__(self, threshold: float = 0.35):
        self.threshold = threshold

    def read_one(self, image: np.ndarray) -> str:
        """The digits of one grayscale image (H, W) in [0, 1] ('' when it holds no ink)."""
        feats, labels = templates(image.shape[-1])
        crops = segments(image, self.threshold)
        return "".join(str(labels[np.argmax(feats @ glyph_features(c))]) for c in crops)

    def read(self, images) -> list[str]:
        """The number read in each image, as a digit string."""
        x = torch.as_tensor(images).detach().float().cpu()
        x = x.mean(1) if x.ndim == 4 else x
        if x.ndim != 3:
            raise ValueError(f"NumberReader: images must be (N,3,H,W) or (N,H,W), got {tuple(x.shape)}")
        return [self.read_one(a.double().numpy()) for a in x]
