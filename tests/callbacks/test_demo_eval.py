"""DemoEvalCallback and SensitivityCallback: eval/* scalars at the right steps, hparams at the end."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from cheers_pl.callbacks.demo_eval import DemoEvalCallback
from cheers_pl.callbacks.sensitivity import SensitivityCallback
from cheers_pl.cli import main
from cheers_pl.eval.demo_eval import METRICS
from cheers_pl.model import CheersModel
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec


class TinyModule(pl.LightningModule):
    def __init__(self, lr: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.model = CheersModel(CheersSpec.tiny())

    def training_step(self, batch, batch_idx):
        return self.model(batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    demo = tmp_path_factory.mktemp("demo")
    args = ["data", "demo", "--out", str(demo), "--digits", "40", "--texts", "2", "--heldout", "6"]
    assert main([*args, "--reading", "2", "--heldout-reading", "6"]) == 0
    torch.manual_seed(0)
    module = TinyModule()
    loader = DataLoader([mixed_batch(module.model)] * 3, batch_size=None)
    evaluation = DemoEvalCallback(every_n_steps=2, data=str(demo), per_digit=1, steps=2, max_reading=4,
                                  max_loss_samples=4, batch_size=4, save_dir=str(demo / "evals"))  # fmt: skip
    sensitivity = SensitivityCallback(every_n_steps=1, data=str(demo), samples=4, batch_size=2)
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), default_hp_metric=False)
    quiet = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=logger, callbacks=[evaluation, sensitivity], **quiet
    )
    trainer.fit(module, loader)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return evaluation, sensitivity, events, demo


def test_eval_scalars_every_n_steps_and_at_the_end(run):
    evaluation, _, events, demo = run
    for name in ("t2i_acc", "read_digit_acc", "read_number_acc", "detail_ratio"):
        assert [e.step for e in events.Scalars(f"eval/{name}")] == [2, 3], name  # step 3: the end
    assert evaluation.last_step == 3 and evaluation.last["read_number_count"] == 4
    assert (
        evaluation.last["t2i_images"] == 10 and "loss_samples" not in evaluation.last
    )  # sensitivity has them
    assert (demo / "evals" / "step000002" / "eval.json").is_file()


def test_sensitivities_every_step(run):
    _, sensitivity, events, _ = run
    for name in ("fm_heldout", "prompt_sensitivity", "image_sensitivity"):
        steps = [e.step for e in events.Scalars(f"eval/{name}")]
        assert steps == [0, 1, 2, 3], name  # left to SensitivityCallback: one value per step
    assert set(sensitivity.last) >= {"fm_heldout", "prompt_sensitivity", "image_sensitivity"}
    assert sensitivity.last["prompt_sensitivity"] == pytest.approx(
        sensitivity.last["fm_shuffled_prompts"] - sensitivity.last["fm_heldout"]
    )


def test_hparams_table_with_the_final_metrics(run):
    evaluation, _, events, _ = run
    assert events.PluginTagToContent("hparams")  # TensorBoard's HPARAMS plugin has the run
    final = events.Scalars("hparams/t2i_acc")
    assert [e.step for e in final] == [3] and final[0].value == pytest.approx(evaluation.last["t2i_acc"])
    for name in METRICS:  # the sensitivity callback's values join the table
        assert [e.step for e in events.Scalars(f"hparams/{name}")] == [3], name


def test_without_heldout_data_they_warn_once_and_do_nothing(tmp_path):
    from types import SimpleNamespace

    trainer = SimpleNamespace(
        loggers=[TensorBoardLogger(tmp_path)], datamodule=SimpleNamespace(root=str(tmp_path))
    )
    for callback in (SensitivityCallback(), DemoEvalCallback()):
        with pytest.warns(UserWarning, match=f"{tmp_path / 'heldout'}.* does not exist"):
            assert not callback.wanted(trainer, None)
        assert not callback.wanted(trainer, None) and "heldout" in callback.disabled  # no second warning
