"""Drawing helpers: integer nearest-neighbour upscaling, labelled grid layout, colour bar, wrap."""

import pytest
import torch

from cheers_pl.analysis.figures import (
    LABEL_WIDTH,
    PAD,
    beside,
    colour_bar,
    font,
    labelled_grid,
    to_side,
    upscale,
    upscale_factor,
    wrap,
)


def test_upscale_is_an_integer_nearest_factor():
    assert upscale_factor(32, 256) == 8 and upscale_factor(48, 256) == 6 and upscale_factor(512, 256) == 1
    assert upscale_factor(32, None) == 1
    x = torch.rand(2, 3, 4, 4)
    big = upscale(x, 10)  # k = 3
    assert big.shape == (2, 3, 12, 12)
    torch.testing.assert_close(big[:, :, ::3, ::3], x)
    assert torch.equal(big[:, :, 1::3, 2::3], x)
    assert to_side(torch.rand(1, 3, 64, 32), 32).shape == (1, 3, 32, 16)  # larger images shrink


def test_labelled_grid_layout():
    panels = torch.rand(2, 3, 3, 10, 12)
    fig = labelled_grid(panels, ["a", "b", "a long label that wraps over lines"], ["input", "output"])
    top = fig.shape[1] - 2 * (10 + PAD) - PAD
    assert fig.shape[2] == LABEL_WIDTH + 3 * (12 + PAD) + PAD
    assert top > 2 * 14  # the longest column label wrapped to several lines in a 12-pixel column
    for r in range(2):
        for c in range(3):
            y0, x0 = top + PAD + r * (10 + PAD), LABEL_WIDTH + PAD + c * (12 + PAD)
            torch.testing.assert_close(fig[:, y0 : y0 + 10, x0 : x0 + 12], panels[r, c])
    bare = labelled_grid(panels)
    assert bare.shape == (3, 2 * (10 + PAD) + PAD, 3 * (12 + PAD) + PAD)
    with pytest.raises(ValueError, match="col_labels has 2"):
        labelled_grid(panels, ["a", "b"])


def test_colour_bar_and_beside():
    bar = colour_bar(100, 0.0, 0.5, "viridis", "|g|")
    assert bar.shape[1] == 100 and bar.shape[2] > 16 + 20  # gradient plus tick labels
    column = bar[:, 30:90, 8]  # down the gradient: from the top colour to the bottom one
    assert not torch.allclose(column[:, 0], column[:, -1])
    fig = beside(torch.zeros(3, 50, 40), bar, top=5)
    assert fig.shape == (3, 105, 40 + PAD + bar.shape[2])
    torch.testing.assert_close(fig[:, 5:, 40 + PAD :], bar)


def test_wrap_keeps_lines_inside_the_width():
    f = font()
    lines = wrap("a cup of coffee on a red saucer with a spoon, on a wooden table", 80, f)
    assert len(lines) > 2 and all(f.getlength(line) <= 80 for line in lines)
    assert " ".join(lines) == "a cup of coffee on a red saucer with a spoon, on a wooden table"
