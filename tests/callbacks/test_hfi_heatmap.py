"""HFIHeatmapCallback: TensorBoard heat-map and intensity images plus per-step scalars at the
right steps, values matching the analysis functions, RNG kept; the hfi='none' ablation logs nothing."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from cheers_pl.analysis.hfi import intensity_curve
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
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    callback = HFIHeatmapCallback(every_n_steps=2, prompts=PROMPTS, steps=STEPS, panel_side=48)
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"))
    trainer, module = fit(callback, logger)
    return callback, trainer, module, events_of(logger)


def test_images_and_scalars_at_start_and_every_n_steps(run):
    callback, _, _, events = run
    tags = events.Tags()
    for tag in ("hfi/heatmaps", "hfi/intensity"):
        assert tag in tags["images"]
        assert [e.step for e in events.Images(tag)] == [0, 2]
    names = [f"hfi/intensity/step_{i:02d}" for i in range(STEPS)]
    assert sorted(t for t in tags["scalars"] if t.startswith("hfi/")) == names
    for i, name in enumerate(names):
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [0, 2]
        assert scalars[-1].value == pytest.approx(float(callback.last_curve[i]), abs=1e-6)
    assert callback.last_step == 2


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
    assert callback.last_heatmaps.shape[2] == 4 * (48 + 2) + 2  # image + 3 steps, panels of 48
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
    callback = HFIHeatmapCallback()
    assert callback.show_steps == [0, 5, 10, 14, 19] and len(callback.prompts) == 4
