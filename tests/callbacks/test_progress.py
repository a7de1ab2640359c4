"""CheersProgressBar (no v_num, no ``/-2``) and ThroughputLog (samples/s, tokens/s, peak memory)."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from cheers_pl.callbacks.progress import CheersProgressBar, ThroughputLog, _si


class _Toy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.lin(batch["x"]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _batches(n=12, b=3, length=5):
    out = []
    for i in range(n):
        mask = torch.ones(b, length, dtype=torch.bool)
        mask[:, length - 1 - i % 2 :] = False  # 4 or 3 real tokens per row
        out.append({"x": torch.randn(b, 4), "attention_mask": mask})
    return out


def _fit(tmp_path, callbacks, steps=6, **kw):
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, logger=CSVLogger(tmp_path), callbacks=callbacks,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1, **kw,
    )  # fmt: skip
    trainer.fit(_Toy(), train_dataloaders=torch.utils.data.DataLoader(_batches(), batch_size=None))
    return trainer


def test_throughput_log_prints_and_logs_every_n_steps(tmp_path, caplog):
    log = ThroughputLog(every_n_steps=2)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, [log], steps=6, enable_progress_bar=False)
    lines = [r.getMessage() for r in caplog.records if "samples/s" in r.getMessage()]
    assert [ln.split(" |")[0] for ln in lines] == ["step 2", "step 4", "step 6"]
    assert "tokens/s" in lines[0] and "peak mem" in lines[0] and "loss " in lines[0]
    samples, tokens = log.last["perf/samples_per_s"], log.last["perf/tokens_per_s"]
    # steps 5 and 6 (batches 4, 5): 3 rows each, 4 then 3 real tokens per row -> 21 tokens / 6 samples
    assert tokens / samples == pytest.approx(21 / 6)
    assert log.last["perf/peak_mem_gib"] > 0
    metrics = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()
    assert "perf/samples_per_s" in metrics and "perf/tokens_per_s" in metrics


def test_throughput_log_refuses_a_bad_period():
    with pytest.raises(ValueError, match="every_n_steps"):
        ThroughputLog(every_n_steps=0)


def test_progress_bar_has_no_version_number_and_no_minus_two(tmp_path):
    bar = CheersProgressBar()
    trainer = _fit(tmp_path, [bar], steps=2)
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    trainer.fit_loop.max_epochs = 3
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_si_suffixes():
    assert (_si(41.25), _si(5234.0), _si(1.2e6)) == ("41.2", "5.2k", "1.2M")


def test_the_cli_adds_the_kit_bar_and_throughput_line_unless_the_config_has_its_own():
    from lightning.pytorch.callbacks import RichProgressBar

    from cheers_pl.lightning_cli import _with_kit_callbacks

    added = _with_kit_callbacks([])
    assert [type(c) for c in added] == [CheersProgressBar, ThroughputLog]
    assert [type(c) for c in _with_kit_callbacks([], progress_bar=False)] == [ThroughputLog]
    own = RichProgressBar()
    assert [type(c) for c in _with_kit_callbacks([own, ThroughputLog(5)])] == [RichProgressBar, ThroughputLog]
