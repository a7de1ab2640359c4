"""HFIHeatmapCallback: TensorBoard heat-map and intensity images (with the prompts in their
descriptions, a colour bar beside the maps) plus four summary scalars grouped by a custom-scalars
layout, at the right steps, values matching the analysis functions, RNG kept; the hfi='none'
ablation logs nothing."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from torch.utils.data import DataLoader

from cheers_pl.analysis.figures import LABEL_WIDTH, PAD
from cheers_pl.analysis.hfi import intensity, intensity_curve
from cheers_pl.callbacks import hfi_heatmap
from cheers_pl.callbacks.hfi_heatmap import HFIHeatmapCallback
from cheers_pl.model import CheersModel
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec
from tests.helpers import randomize_zero_inits

PROMPTS = ["a photo of a tabby cat", "a handwritten digit 3"]
STEPS = 3


class TinyModule(pl.LightningModule):
    def __init__(self, spec: CheersSpec):
        super().__init__()
        self.model = CheersModel(spec)
        randomize_zero_inits(self.model)  # the HFI gate's last layer starts at zero

    def training_step(self, batch, batch_idx):
        loss = self.model(batch).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def fit(callback, logger, spec=None, max_steps=3):
    torch.manual_seed(0)
    module = TinyModule(spec or CheersSpec.tiny())
    loader = DataLoader([mixed_batch(module.model)] * max_steps, batch_size=None)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer, module


def events_of(logger):
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    callback = HFIHeatmapCallback(every_n_steps=2, prompts=PROMPTS, steps=STEPS, panel_side=48)
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"))
    trainer, module = fit(callback, logger)
    return callback, trainer, module, events_of(logger)


SUMMARY = ["hfi/intensity/first", "hfi/intensity/last", "hfi/intensity/mean", "hfi/intensity/peak_t"]


def test_images_and_scalars_at_start_and_every_n_steps(run):
    callback, _, _, events = run
    tags = events.Tags()
    for tag in ("hfi/heatmaps", "hfi/intensity"):
        assert tag in tags["images"]
        assert [e.step for e in events.Images(tag)] == [0, 2]
    hfi_scalars = sorted(t for t in tags["scalars"] if t.startswith("hfi/intensity"))
    assert hfi_scalars == SUMMARY  # four summary scalars, no scalar per denoising step
    expected = callback.summary_scalars()
    for name in SUMMARY:
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [0, 2]
        assert scalars[-1].value == pytest.approx(expected[name], abs=1e-6)
    per_step = intensity(callback.last_gates).mean(dim=1)
    assert expected["hfi/intensity/mean"] == pytest.approx(float(per_step.mean()), rel=1e-6)
    assert expected["hfi/intensity/last"] == pytest.approx(float(per_step[-1]), rel=1e-6)
    assert expected["hfi/intensity/peak_t"] == pytest.approx(
        float(callback.last_t[callback.last_curve.argmax()])
    )
    assert callback.last_step == 2


def test_custom_scalars_layout_groups_the_intensity_once(run):
    _, _, _, events = run
    tag = custom_scalar_metadata.CONFIG_SUMMARY_TAG
    assert tag in events.Tags()["tensors"]
    assert len(events.Tensors(tag)) == 1  # written once per logger, not per logging step
    layout = layout_pb2.Layout.FromString(events.Tensors(tag)[0].tensor_proto.string_val[0])
    (category,) = layout.category
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert category.title == "HFI"
    assert sorted(charts[next(k for k in charts if k.startswith("sampled gate"))]) == sorted(
        ["hfi/intensity/first", "hfi/intensity/mean", "hfi/intensity/last"]
    )
    assert any("hfi/gate_abs_mean" in tags for tags in charts.values())


def test_descriptions_carry_the_prompts_and_the_scale(run):
    callback, _, _, events = run
    for tag in ("hfi/heatmaps", "hfi/intensity"):
        about = events.SummaryMetadata(tag).summary_description
        assert all(prompt in about for prompt in PROMPTS)
        assert about == callback.descriptions()[tag]
    assert "Colour bar: absolute |g|" in events.SummaryMetadata("hfi/heatmaps").summary_description


def test_last_gates_curve_and_figure_shapes(run):
    callback, _, module, events = run
    side = module.model.latent_side
    assert callback.last_gates.shape == (STEPS, len(PROMPTS), side, side)
    assert callback.last_gates.abs().sum() > 0  # randomized gate: non-zero maps
    torch.testing.assert_close(callback.last_curve, intensity_curve(callback.last_gates, "minmax"))
    assert callback.last_curve.shape == (STEPS,)
    assert callback.last_curve.min() >= 0 and callback.last_curve.max() <= 1
    assert callback.show_steps == [0, 1, 2]
    assert callback.last_heatmaps.shape[0] == 3 and callback.last_plot.shape[0] == 3
    panel = -(-48 // module.model.image_size) * module.model.image_size  # 32 -> 64: integer factor
    grid_width = LABEL_WIDTH + 4 * (panel + PAD) + PAD  # prompt labels, image + 3 steps
    assert callback.last_heatmaps.shape[2] > grid_width + PAD + 20  # the colour bar and its ticks
    bar = callback.last_heatmaps[:, :, grid_width + PAD :]
    assert (bar.max(dim=0).values - bar.min(dim=0).values).max() > 0.3  # coloured, not grey text only
    assert callback.last_heatmaps.shape[1] > len(PROMPTS) * (panel + PAD)  # rows plus the column titles
    for tag, img in (("hfi/heatmaps", callback.last_heatmaps), ("hfi/intensity", callback.last_plot)):
        event = events.Images(tag)[-1]
        assert (event.height, event.width) == tuple(img.shape[1:])


def test_logging_keeps_rng_state_and_training_flags(run):
    callback, trainer, module, _ = run
    model = module.model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    callback.log_heatmaps(trainer, module)
    first = callback.last_gates.clone()
    callback.log_heatmaps(trainer, module)  # the fixed seed gives the same maps for the same weights
    assert torch.equal(callback.last_gates, first)
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_no_gate_logs_nothing_and_never_samples(tmp_path, monkeypatch):
    def no_generate(*args, **kwargs):
        raise AssertionError("generate must not be called without an HFI gate")

    said = []
    monkeypatch.setattr(CheersModel, "generate", no_generate)
    monkeypatch.setattr(hfi_heatmap, "rank_zero_info", lambda msg, *a, **k: said.append(msg))
    callback = HFIHeatmapCallback(every_n_steps=1, prompts=PROMPTS, steps=STEPS)
    logger = TensorBoardLogger(tmp_path)
    fit(callback, logger, spec=CheersSpec.tiny(hfi="none"), max_steps=2)
    assert len(said) == 1 and "no HFI gate" in said[0]
    assert callback.last_gates is None and callback.last_curve is None and callback.last_step is None
    tags = events_of(logger).Tags()
    assert "train/loss" in tags["scalars"]  # the run did log, just nothing from the callback
    assert not [t for t in tags["images"] + tags["scalars"] if t.startswith("hfi")]


def test_no_tensorboard_logger_warns_once_and_skips(monkeypatch):
    calls = []
    monkeypatch.setattr(CheersModel, "generate", lambda *a, **k: calls.append(1))
    callback = HFIHeatmapCallback(every_n_steps=1, prompts=PROMPTS[:1], steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(callback, logger=False, max_steps=2)
    assert sum("no TensorBoardLogger" in str(w.message) for w in caught) == 1
    assert not calls and callback.last_gates is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        HFIHeatmapCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="prompts"):
        HFIHeatmapCallback(prompts=[])
    with pytest.raises(ValueError, match="'minmax', 'max', 'none'"):
        HFIHeatmapCallback(normalise="zscore")
    with pytest.raises(ValueError, match="out of range"):
        HFIHeatmapCallback(steps=4, show_steps=[0, 4])
    with pytest.raises(ValueError, match="vmax"):
        HFIHeatmapCallback(vmax=0.0)
    callback = HFIHeatmapCallback()
    assert callback.show_steps == [0, 5, 10, 14, 19] and len(callback.prompts) == 4
