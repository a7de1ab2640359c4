"""Rendered numbers for the demo's reading task (the spirit of the paper's Table 6: OCR-style reading).

Each image is a 64x64 grayscale canvas, white ink on black like the demo's digits, holding a
number of ``min_digits`` to ``max_digits`` digits (no leading zero) drawn with Pillow's bundled
scalable font (``ImageFont.load_default(size=...)``, FreeType) at a random size, stroke width,
ink level and position. Digits are drawn one at a time with a gap of at least 2 px between their
ink boxes (1 px once the model resizes the canvas to 32 px), so neighbouring digits never merge.

Legibility at the model's size: the font size is drawn between :data:`MIN_SIZE` and the largest
size whose number still fits the canvas (at most :data:`MAX_SIZE`), so fewer digits come out
bigger: at 32 px a digit is 7 to 15 px tall; a 4-digit number's digits are 7-8 px tall and
about 6 px wide, as big as the 8x8 handwritten digits. The stroke is at most 1 px below font
size 28 (a bolder small digit fills its holes). Everything follows from one
``random.Random``, so a split is the same images on every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

CANVAS = 64
MARGIN = 1  # px kept free at each border
MIN_SIZE, MAX_SIZE = 20, 40  # font sizes (px em) on the 64 px canvas
MAX_DIGITS = 4  # the most that fit the canvas at MIN_SIZE
STROKES = (0, 1, 2)  # extra stroke width in px (0: the plain font); 2 only from size 28 on


@dataclass(frozen=True)
class Rendering:
    """How one number was drawn: the text, font size, stroke, ink level and ink-box position."""

    text: str
    size: int
    stroke: int
    ink: int
    x: int
    y: int

    def meta(self) -> dict:
        return {"number": self.text, "font_size": self.size, "stroke": self.stroke, "ink": self.ink,
                "x": self.x, "y": self.y}  # fmt: skip


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` px; raises if this Pillow has no FreeType."""
    f = ImageFont.load_default(size=size)
    if not isinstance(f, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType: the reading task needs its scalable font")
    return f


def gap(size: int) -> int:
    """Pixels between two digits' ink boxes at font ``size``."""
    return max(2, size // 8)


def layout(text: str, size: int, stroke: int) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """(ink box (left, top, right, bottom) per digit, total width, total height) of ``text``."""
    boxes = [font(size).getbbox(c, stroke_width=stroke) for c in text]
    width = sum(r - left for left, _, r, _ in boxes) + gap(size) * (len(text) - 1)
    height = max(b for *_, b in boxes) - min(t for _, t, _, _ in boxes)
    return boxes, width, height


def largest_size(text: str, stroke: int) -> int:
    """The largest font size (<= MAX_SIZE) at which ``text`` fits the canvas inside the margins."""
    room = CANVAS - 2 * MARGIN
    for size in range(MAX_SIZE, MIN_SIZE - 1, -1):
        _, w, h = layout(text, size, stroke)
        if w <= room and h <= room:
            return size
    raise ValueError(f"{text!r} does not fit a {CANVAS} px canvas even at font size {MIN_SIZE}")


def max_stroke(size: int) -> int:
    """The widest stroke a digit at font ``size`` keeps legible at 32 px (1 below 28 px, else 2)."""
    return 1 if size < 28 else 2


def random_number(rng: random.Random, min_digits: int, max_digits: int) -> str:
    """A number with ``min_digits`` to ``max_digits`` digits (uniform count), first digit 1-9."""
    n = rng.randint(min_digits, max_digits)
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


def draw(r: Rendering) -> Image.Image:
    """The 64x64 grayscale ('L') image of a :class:`Rendering`."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    pen = ImageDraw.Draw(img)
    boxes, _, _ = layout(r.text, r.size, r.stroke)
    top = min(t for _, t, _, _ in boxes)
    x = r.x
    for c, (left, _, right, _) in zip(r.text, boxes, strict=True):
        pen.text((x - left, r.y - top), c, fill=r.ink, font=font(r.size), stroke_width=r.stroke,
                 stroke_fill=r.ink)  # fmt: skip
        x += right - left + gap(r.size)
    return img


def random_rendering(rng: random.Random, min_digits: int = 2, max_digits: int = 4) -> Rendering:
    """A random number with a random size, stroke, ink (200-255) and position that fit the canvas."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
    text = random_number(rng, min_digits, max_digits)
    size = rng.randint(MIN_SIZE, largest_size(text, 0))
    stroke = min(rng.choice(STROKES), max_stroke(size))  # a thick stroke fills a small digit's holes
    while stroke and max(layout(text, size, stroke)[1:]) > CANVAS - 2 * MARGIN:
        stroke -= 1  # the bolder number would not fit
    ink = rng.randint(200, 255)
    _, w, h = layout(text, size, stroke)
    x = rng.randint(MARGIN, CANVAS - MARGIN - w)
    y = rng.randint(MARGIN, CANVAS - MARGIN - h)
    return Rendering(text, size, stroke, ink, x, y)
