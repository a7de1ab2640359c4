"""Drawing helpers for the pictures the kit logs: upscaling, labelled grids, a colour bar.

Pictures are (3, H, W) float CPU tensors in [0, 1] on a white background, drawn with PIL (text)
and plain tensor copies (panels), so their pixel layout is exact and testable:

* :func:`upscale` enlarges (N, 3, h, w) images by one integer factor, nearest-neighbour, so a
  32-pixel tiny-model image becomes a readable 256-pixel panel whose pixels stay sharp blocks;
* :func:`labelled_grid` lays out rows x columns of equal panels with a header strip (column
  labels: prompts, "step 5 t=0.26", ...) and a left strip (row labels: "input", "reconstruction");
* :func:`colour_bar` draws a vertical colour scale with numeric ticks, to be set beside a grid
  (:func:`beside`), so a heat map reads as absolute values instead of blending over an image.

Text uses PIL's bundled FreeType font at ``FONT_SIZE`` pixels (PIL's bitmap font where FreeType
is missing). matplotlib is imported lazily, in :func:`colour_bar` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PAD = 2  # pixels of white between panels and around the picture
FONT_SIZE = 14
LABEL_WIDTH = 160  # left strip of row labels, pixels (text wraps inside it)
BAR_WIDTH = 16  # the colour gradient itself; its tick labels come to its right


def font(size: int = FONT_SIZE):
    """PIL's bundled font at ``size`` pixels (FreeType), or its fixed bitmap font without FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def upscale_factor(side: int, target: int | None) -> int:
    """The integer k with ``side * k >= target`` (smallest such), 1 when ``target`` is None or smaller."""
    if target is None or side >= target:
        return 1
    return math.ceil(target / side)


def upscale(images: Tensor, target: int | None) -> Tensor:
    """images (N, C, h, w) -> (N, C, h k, w k), nearest-neighbour, k = :func:`upscale_factor` (max(h, w))."""
    k = upscale_factor(max(images.shape[-2:]), target)
    x = images.detach().float().cpu()
    return x if k == 1 else F.interpolate(x, scale_factor=k, mode="nearest")


def to_tensor(image) -> Tensor:
    """A PIL RGB image -> (3, H, W) float in [0, 1]."""
    w, h = image.size
    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return pixels.view(h, w, 3).permute(2, 0, 1).float() / 255.0


def wrap(text: str, width: int, fnt) -> list[str]:
    """Greedy word wrap of ``text`` into lines of at most ``width`` pixels (a long word is cut)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if fnt.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while fnt.getlength(line) > width and len(line) > 1:  # a word wider than the cell
                cut = max(1, int(len(line) * width / fnt.getlength(line)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def line_height(fnt) -> int:
    return int(fnt.getbbox("Ag0=|")[3]) + 3


def text_block(text: str, width: int, fnt, height: int | None = None) -> Tensor:
    """(3, height, width) white block with ``text`` wrapped to ``width`` in black, top-left aligned.

    ``height`` defaults to what the wrapped lines need; a taller block pads, a shorter one clips.
    """
    from PIL import Image, ImageDraw

    lines = wrap(text, max(1, width - 2), fnt)
    step = line_height(fnt)
    height = len(lines) * step + 2 if height is None else height
    block = Image.new("RGB", (width, max(1, height)), (255, 255, 255))
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(lines):
        draw.text((1, 1 + i * step), line, fill=(0, 0, 0), font=fnt)
    return to_tensor(block)


def labelled_grid(
    panels: Tensor,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    *,
    label_width: int = LABEL_WIDTH,
    font_size: int = FONT_SIZE,
) -> Tensor:
    """panels (R, C, 3, h, w) in [0, 1] -> one (3, H, W) picture with labels drawn into it.

    Layout, ``p = PAD``: a header strip of height ``T`` (the tallest wrapped column label; 0 without
    ``col_labels``) above the panels, a left strip of width ``L = label_width`` (0 without
    ``row_labels``); panel (r, c) covers rows ``p + T + r (h + p)`` .. ``+ h`` and columns
    ``L + p + c (w + p)`` .. ``+ w``. So ``H = T + R (h + p) + p`` and ``W = L + C (w + p) + p``.
    """
    if panels.ndim != 5 or panels.shape[2] != 3:
        raise ValueError(f"panels must be (rows, cols, 3, h, w), got {tuple(panels.shape)}")
    rows, cols, _, h, w = panels.shape
    for name, labels, n in (("col_labels", col_labels, cols), ("row_labels", row_labels, rows)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries for {n} {name[:3]}s")
    fnt, p = font(font_size), PAD
    heads = [text_block(s, w, fnt) for s in col_labels] if col_labels is not None else []
    top = max((b.shape[1] for b in heads), default=0)
    left = label_width if row_labels is not None else 0
    fig = torch.ones(3, top + rows * (h + p) + p, left + cols * (w + p) + p)
    for c, head in enumerate(heads):
        x0 = left + p + c * (w + p)
        fig[:, : head.shape[1], x0 : x0 + w] = head
    for r in range(rows):
        y0 = top + p + r * (h + p)
        if row_labels is not None:
            fig[:, y0 : y0 + h, :left] = text_block(row_labels[r], left, fnt, height=h)
        for c in range(cols):
            x0 = left + p + c * (w + p)
            fig[:, y0 : y0 + h, x0 : x0 + w] = panels[r, c].detach().float().cpu().clamp(0, 1)
    return fig


def colour_bar(
    height: int,
    vmin: float,
    vmax: float,
    cmap: str,
    label: str,
    *,
    ticks: int = 5,
    font_size: int = FONT_SIZE,
) -> Tensor:
    """(3, height, W) vertical colour scale: ``vmax`` at the top, ``vmin`` at the bottom.

    A ``BAR_WIDTH``-pixel gradient through ``matplotlib.colormaps[cmap]`` with ``ticks`` numeric
    labels to its right and ``label`` (e.g. ``"|g|"``) above the top tick; W fits the longest text.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    fnt, step = font(font_size), line_height(font(font_size))
    values = [vmin + (vmax - vmin) * k / max(ticks - 1, 1) for k in range(ticks)]
    texts = [f"{v:.3g}" for v in values]
    top, bottom = step + 2, step // 2 + 2  # room for the label and the lowest tick's text
    span = max(1, height - top - bottom)
    width = BAR_WIDTH + 6 + int(max(fnt.getlength(s) for s in [*texts, label])) + 4
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    ramp = torch.linspace(1, 0, span)[:, None].expand(span, BAR_WIDTH)  # top = 1 = vmax
    rgb = (colormaps[cmap](ramp.numpy())[..., :3] * 255).round().astype("uint8")
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((0, 0), label, fill=(0, 0, 0), font=fnt)
    for k, text in enumerate(texts):
        y = top + round((span - 1) * (1 - k / max(ticks - 1, 1)))
        draw.line([(BAR_WIDTH, y), (BAR_WIDTH + 4, y)], fill=(0, 0, 0))
        draw.text((BAR_WIDTH + 6, y - step // 2), text, fill=(0, 0, 0), font=fnt)
    return to_tensor(canvas)


def beside(left: Tensor, right: Tensor, top: int = 0) -> Tensor:
    """(3, H1, W1), (3, H2, W2) -> (3, max(H1, top + H2), W1 + PAD + W2): ``right`` set ``top`` rows down."""
    height = max(left.shape[1], top + right.shape[1])
    fig = torch.ones(3, height, left.shape[2] + PAD + right.shape[2])
    fig[:, : left.shape[1], : left.shape[2]] = left
    fig[:, top : top + right.shape[1], left.shape[2] + PAD :] = right
    return fig


def stack(pictures: Sequence[Tensor]) -> Tensor:
    """(3, Hi, Wi) pictures -> one (3, sum Hi, max Wi), top to bottom, white where narrower."""
    fig = torch.ones(3, sum(p.shape[1] for p in pictures), max(p.shape[2] for p in pictures))
    y = 0
    for pic in pictures:
        fig[:, y : y + pic.shape[1], : pic.shape[2]] = pic
        y += pic.shape[1]
    return fig


def to_side(images: Tensor, side: int | None) -> Tensor:
    """images (N, C, h, w) -> panels of about ``side`` pixels: :func:`upscale` when smaller (nearest,
    integer factor), antialiased bilinear down to ``side`` x ``side w / h`` when larger; None: unchanged."""
    h, w = images.shape[-2:]
    if side is None or max(h, w) <= side:
        return upscale(images, side)
    size = (side, max(1, round(side * w / h))) if h >= w else (max(1, round(side * h / w)), side)
    x = images.detach().float().cpu()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
