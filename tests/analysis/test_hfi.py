"""HFI analysis: intensities use |g|, per-run normalisation then the mean over runs (checked by
hand), several runs concatenate, heat-map figure layout (enlarged panels, absolute colour scale,
a colour bar beside the maps), the intensity plot, gate PNGs on disk."""

import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from cheers_pl.analysis.figures import LABEL_WIDTH, PAD
from cheers_pl.analysis.hfi import (
    evenly_spaced_steps,
    heatmap_figure,
    intensity,
    intensity_curve,
    intensity_plot,
    normalise_per_run,
    save_gate_maps,
)


def hand_gates() -> torch.Tensor:
    """(3 steps, 2 samples, 2, 2). Every map has mean 0 or close, so a signed mean would fail.

    Sample 0: mean |g| = 1, 2, 4 over the steps. Sample 1: mean |g| = 3 at every step (constant run).
    """
    s0 = [[[1.0, -1.0], [1.0, -1.0]], [[2.0, -2.0], [2.0, 2.0]], [[-4.0, 4.0], [4.0, 4.0]]]
    s1 = [[[3.0, -3.0], [-3.0, 3.0]]] * 3
    return torch.stack([torch.tensor(s0), torch.tensor(s1)], dim=1)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_intensity_is_the_mean_magnitude():
    gates = hand_gates()
    assert_close(intensity(gates), [[1, 3], [2, 3], [4, 3]])
    assert_close(intensity(-gates), [[1, 3], [2, 3], [4, 3]])  # the sign of g does not matter
    with pytest.raises(ValueError, match=r"\(steps, B, S, S\)"):
        intensity(gates[0])


def test_normalise_per_run_by_hand():
    values = intensity(hand_gates())  # columns [1, 2, 4] and [3, 3, 3]
    # minmax: (v - 1) / (4 - 1); the constant run -> zeros
    assert_close(normalise_per_run(values, "minmax"), [[0, 0], [1 / 3, 0], [1, 0]])
    # max: v / 4 and v / 3
    assert_close(normalise_per_run(values, "max"), [[0.25, 1], [0.5, 1], [1, 1]])
    assert_close(normalise_per_run(values, "none"), [[1, 3], [2, 3], [4, 3]])
    assert_close(normalise_per_run(torch.tensor([1.0, 2.0, 4.0])), [0, 1 / 3, 1])  # one 1-D run
    assert_close(normalise_per_run(torch.zeros(3, 1), "max"), [[0], [0], [0]])  # all-zero run
    with pytest.raises(ValueError, match="'minmax', 'max', 'none'"):
        normalise_per_run(values, "zscore")


def test_intensity_curve_normalises_each_run_then_averages():
    gates = hand_gates()
    assert_close(intensity_curve(gates), [0, 1 / 6, 1 / 2])  # mean of [0, 1/3, 1] and [0, 0, 0]
    assert_close(intensity_curve(gates, "max"), [0.625, 0.75, 1.0])  # mean of [.25, .5, 1], [1, 1, 1]
    assert_close(intensity_curve(gates, "none"), [2.0, 2.5, 3.5])
    with pytest.raises(ValueError, match="'minmax', 'max', 'none'"):
        intensity_curve(gates, "sum")


def test_several_runs_concatenate_along_the_batch():
    gates = hand_gates()
    # a second generate call: one sample on a 3x3 grid, mean |g| = 2, 1, 2
    other = torch.stack([torch.full((1, 3, 3), 2.0), -torch.ones(1, 3, 3), torch.full((1, 3, 3), -2.0)])
    # minmax runs [0, 1/3, 1], [0, 0, 0], [1, 0, 1]
    assert_close(intensity_curve([gates, other]), [1 / 3, 1 / 9, 2 / 3])
    # max runs [.25, .5, 1], [1, 1, 1], [1, .5, 1]
    assert_close(intensity_curve([gates, other], "max"), [0.75, 2 / 3, 1.0])
    split = [gates[:, :1], gates[:, 1:]]
    torch.testing.assert_close(intensity_curve(split), intensity_curve(gates))
    with pytest.raises(ValueError, match="same number of steps"):
        intensity_curve([gates, other[:2]])
    with pytest.raises(ValueError, match="no gate"):
        intensity_curve([])


def test_evenly_spaced_steps():
    assert evenly_spaced_steps(20) == [0, 5, 10, 14, 19]
    assert evenly_spaced_steps(3) == [0, 1, 2]
    assert evenly_spaced_steps(1) == [0]
    assert evenly_spaced_steps(9, 3) == [0, 4, 8]


def grid_width(panels: int, w: int) -> int:
    return LABEL_WIDTH + panels * (w + PAD) + PAD


def panel(fig, r, k, h, w):
    """Panel (row r, column k) of a heat-map figure whose header is what the rows leave free."""
    rows = 2
    top = fig.shape[1] - rows * (h + PAD) - PAD
    y0, x0 = top + PAD + r * (h + PAD), LABEL_WIDTH + PAD + k * (w + PAD)
    return fig[:, y0 : y0 + h, x0 : x0 + w]


def test_heatmap_figure_layout_first_column_is_the_image_and_a_bar_is_beside():
    torch.manual_seed(0)
    images, gates = torch.rand(2, 3, 16, 16), torch.randn(5, 2, 4, 4)
    fig = heatmap_figure(images, gates, [0, 2, -1], t=torch.linspace(0, 1, 5), prompts=["a cat", "a cup"],
                         panel_side=64)  # fmt: skip
    assert fig.dtype == torch.float32 and fig.min() >= 0 and fig.max() <= 1
    w = 64  # 16 px enlarged by 4, nearest
    assert fig.shape[2] > grid_width(4, w) + PAD + 20  # the colour bar with its tick labels
    assert fig.shape[1] > 2 * (w + PAD) + PAD  # the column titles above the rows
    for r in range(2):
        expected = images[r].repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
        torch.testing.assert_close(panel(fig, r, 0, w, w), expected)
    assert fig[:, : fig.shape[1] - 2 * (w + PAD) - PAD].min() < 0.5  # column titles drawn
    assert fig[:, -w:, : LABEL_WIDTH - 1].min() < 0.5  # the prompt drawn left of its row
    bar = fig[:, :, grid_width(4, w) + PAD : grid_width(4, w) + PAD + 16]
    viridis = colormaps["viridis"]
    top = torch.tensor(viridis(1.0)[:3], dtype=torch.float32)
    assert ((bar - top[:, None, None]).abs().amax(dim=0) < 0.02).any()  # the bar reaches vmax's colour


def test_heatmap_maps_use_an_absolute_scale_from_zero():
    # sample 0: step 0 |g| = 1 everywhere, step 1 |g| = 2 except one cell at 1 (signed), step 2 |g| = 3
    one = torch.stack([torch.ones(2, 2), torch.tensor([[-2.0, 2.0], [2.0, -1.0]]), -3 * torch.ones(2, 2)])
    gates = torch.stack([one, torch.full_like(one, -4.0)], dim=1)  # (3, 2, 2, 2); sample 1: |g| = 4
    images = torch.full((2, 3, 4, 4), 0.5)
    jet = colormaps["jet"]

    def colour(v):
        return torch.tensor(jet(v)[:3], dtype=torch.float32)[:, None, None].expand(3, 4, 4)

    fig = heatmap_figure(images, gates, [0, 1, 2], cmap="jet", panel_side=None, vmax=4.0)
    # |g| / 4 with 0 at the bottom: 1 -> 0.25, 2 -> 0.5, 3 -> 0.75 (not min-max: 1 does not go to 0)
    torch.testing.assert_close(panel(fig, 0, 1, 4, 4), colour(0.25), atol=1e-6, rtol=0)
    torch.testing.assert_close(panel(fig, 0, 3, 4, 4), colour(0.75), atol=1e-6, rtol=0)
    p1 = panel(fig, 0, 2, 4, 4)
    torch.testing.assert_close(p1[:, 0, 0], colour(0.5)[:, 0, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(p1[:, 3, 3], colour(0.25)[:, 0, 0], atol=1e-6, rtol=0)  # the |g| = 1 cell
    per_figure = heatmap_figure(images, gates, [0, 1, 2], cmap="jet", panel_side=None)  # vmax = 4, the max
    torch.testing.assert_close(per_figure, fig)
    clipped = heatmap_figure(images, gates, [0, 1, 2], cmap="jet", panel_side=None, vmax=2.0)
    torch.testing.assert_close(panel(clipped, 0, 3, 4, 4), colour(1.0), atol=1e-6, rtol=0)
    assert clipped.shape[2] > fig.shape[2]  # the bar's label says "(clipped)"


def test_heatmap_figure_bad_arguments():
    images, gates = torch.rand(2, 3, 8, 8), torch.randn(3, 2, 2, 2)
    with pytest.raises(ValueError, match="out of range"):
        heatmap_figure(images, gates, [3])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        heatmap_figure(images[0], gates, [0])
    with pytest.raises(ValueError, match=r"\(steps, B, S, S\)"):
        heatmap_figure(images, gates[:, :1], [0])
    with pytest.raises(ValueError, match="prompts"):
        heatmap_figure(images, gates, [0], prompts=["one"])
    with pytest.raises(ValueError, match="t has 2"):
        heatmap_figure(images, gates, [0], t=torch.zeros(2))


@pytest.mark.parametrize("with_t", [False, True])
def test_intensity_plot_is_an_rgb_image(with_t):
    curve = torch.tensor([0.0, 0.2, 0.9, 1.0, 0.4])
    t = torch.linspace(0, 1, 5) if with_t else None
    img = intensity_plot(curve, t)
    assert img.shape == (3, 300, 400) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    assert img.min() < 0.5 and img.max() == 1.0  # dark lines on a white background
    with pytest.raises(ValueError, match="t has 3"):
        intensity_plot(curve, torch.zeros(3))


def test_intensity_plot_with_the_raw_runs_is_wider():
    curve, runs = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([[0.1, 0.2], [0.2, 0.3], [0.4, 0.5]])
    img = intensity_plot(curve, torch.linspace(0, 1, 3), per_run=runs, labels=["a cat", "a cup"])
    assert img.shape == (3, 300, 800)
    with pytest.raises(ValueError, match="per_run has 2"):
        intensity_plot(curve, per_run=runs[:2])


@pytest.mark.parametrize(("side", "saved"), [(8, 64), (5, 65), (80, 80)])
def test_save_gate_maps_files_and_sizes(tmp_path, side, saved):
    torch.manual_seed(0)
    gates = torch.randn(3, 2, side, side)
    paths = save_gate_maps(gates, tmp_path / "maps", prefix="p")
    assert [p.name for p in paths] == [f"p{b:02d}_step{i:03d}.png" for b in range(2) for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [p.name for p in paths]
    for b in range(2):
        pixels = []
        for i in range(3):
            with Image.open(paths[b * 3 + i]) as im:
                assert im.mode == "L" and im.size == (saved, saved)
                pixels.append(torch.tensor(list(im.getdata())))
        pixels = torch.cat(pixels)  # |g| / max |g| per sample over all its steps jointly
        assert int(pixels.min()) >= 0 and int(pixels.max()) == 255


def test_save_gate_maps_uses_the_magnitude(tmp_path):
    gates = torch.tensor([[[[-2.0, 0.0], [1.0, 2.0]]]])  # (1, 1, 2, 2)
    (path,) = save_gate_maps(gates, tmp_path)
    with Image.open(path) as im:
        assert im.size == (64, 64)
        corners = [im.getpixel(xy) for xy in ((0, 0), (63, 0), (0, 63), (63, 63))]
    assert corners == [255, 0, 128, 255]  # |g| / 2 * 255, rounded


def test_save_gate_maps_keeps_zero_black(tmp_path):
    gates = torch.tensor([[[[1.0, 2.0], [2.0, 2.0]]]])  # min-max would turn the 1 into 0
    (path,) = save_gate_maps(gates, tmp_path)
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == 128
