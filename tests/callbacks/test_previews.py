"""PreviewCallback: TensorBoard images and scalar at the right steps, pictures enlarged to
display_side with their labels drawn in and the prompts in the TensorBoard description, RNG and
mode restored, once per step under gradient accumulation, the latent ablation, PNGs in save_dir."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from cheers_pl.analysis.figures import LABEL_WIDTH, PAD
from cheers_pl.callbacks import PreviewCallback
from cheers_pl.model import CheersModel
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec

PROMPTS = ["a photo of a tabby cat", "a handwritten digit 3", "a cup of coffee"]


class TinyModule(pl.LightningModule):
    def __init__(self, spec: CheersSpec):
        super().__init__()
        self.model = CheersModel(spec)

    def training_step(self, batch, batch_idx):
        return self.model(batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def fit(callback, logger, spec=None, max_steps=3, accumulate=1):
    torch.manual_seed(0)
    module = TinyModule(spec or CheersSpec.tiny())
    batch = mixed_batch(module.model)
    loader = DataLoader([batch] * (max_steps * accumulate), batch_size=None)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        accumulate_grad_batches=accumulate,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer, module, batch


def panels_extent(n: int, side: int) -> int:
    """Pixels that n panels of ``side`` take along one axis of a labelled grid."""
    return n * (side + PAD) + PAD


def header_height(picture: torch.Tensor, rows: int, side: int) -> int:
    return picture.shape[1] - panels_extent(rows, side)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    callback = PreviewCallback(every_n_steps=2, steps=2, prompts=PROMPTS)
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"))
    trainer, module, batch = fit(callback, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return callback, trainer, module, batch, events


def test_images_and_mse_logged_at_start_and_every_n_steps(run):
    callback, _, _, _, events = run
    tags = events.Tags()
    for tag in ("previews/generated", "previews/reconstruction"):
        assert tag in tags["images"]
        assert [e.step for e in events.Images(tag)] == [0, 2]
    mse = events.Scalars("previews/reconstruction_mse")
    assert [e.step for e in mse] == [0, 2]
    assert all(e.value > 0 for e in mse)
    assert mse[-1].value == pytest.approx(callback.last_reconstruction_mse, rel=1e-5)
    assert callback.last_step == 2


def test_pictures_are_enlarged_to_display_side_and_labelled(run):
    callback, _, module, batch, events = run
    s = module.model.image_size
    big = -(-256 // s) * s  # display_side 256, an integer factor: 32 -> 256
    assert big >= 256 and callback.display_side == 256
    n_rec = min(callback.num_reconstructions, batch["images"].shape[0])
    for picture, rows, cols in (
        (callback.last_generated, 1, len(PROMPTS)),
        (callback.last_reconstruction, 2, n_rec),
    ):
        assert picture.dtype == torch.float32 and picture.min() >= 0 and picture.max() <= 1
        assert picture.shape[2] == LABEL_WIDTH + panels_extent(cols, big)
        top = header_height(picture, rows, big)
        assert top > 10  # a header strip of column labels (the prompts) above the panels
        assert picture[:, :top].min() < 0.5  # dark text drawn into it
        assert picture[:, top:, : LABEL_WIDTH - 1].min() < 0.5  # row labels ("input", ...)
    for tag, picture in (("previews/generated", callback.last_generated),
                         ("previews/reconstruction", callback.last_reconstruction)):  # fmt: skip
        img = events.Images(tag)[-1]
        assert (img.height, img.width) == tuple(picture.shape[1:])


def test_the_panels_are_the_images_nearest_neighbour_enlarged(run):
    callback, trainer, module, _, _ = run
    callback.preview(trainer, module)
    with torch.no_grad():
        out = module.model.eval().generate(PROMPTS, cfg_scale=4.0, steps=2, shift=1.0, seed=0)
    module.model.train()
    s, pic = module.model.image_size, callback.last_generated
    k = -(-256 // s)
    top, x0 = header_height(pic, 1, s * k) + PAD, LABEL_WIDTH + PAD
    panel = pic[:, top : top + s * k, x0 : x0 + s * k]
    expected = out.images[0].clamp(0, 1).repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    torch.testing.assert_close(panel, expected.float(), atol=1e-6, rtol=0)


def test_descriptions_carry_the_prompts(run):
    callback, _, _, _, events = run
    about = events.SummaryMetadata("previews/generated").summary_description
    assert all(prompt in about for prompt in PROMPTS) and "CFG 4.0" in about
    rec = events.SummaryMetadata("previews/reconstruction").summary_description
    assert "Top row" in rec and "D(VAE.encode(x))" in rec
    assert about == callback.descriptions()["previews/generated"]


def test_reference_images_are_the_first_batch_and_mse_matches(run):
    callback, trainer, module, batch, _ = run
    ref = batch["images"][: callback.num_reconstructions]
    assert torch.equal(callback.reference_images, ref)
    model = module.model
    callback.preview(trainer, module)  # D has trained one more step since the last logged preview
    with torch.no_grad():
        recon = model.pixel_decoder(model.vae.encode(ref)).clamp(0, 1)
    assert callback.last_reconstruction_mse == pytest.approx(float(((recon - ref) ** 2).mean()), rel=1e-5)


def test_preview_keeps_rng_state_and_training_flags(run):
    callback, trainer, module, _, _ = run
    model = module.model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    assert model.training and not model.vae.training  # the frozen VAE stays in eval mode
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model.generate(PROMPTS[:1], cfg_scale=4.0, steps=1, seed=0)  # generate has its own generator
    assert torch.equal(torch.get_rng_state(), state)
    callback.preview(trainer, module)
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: m.training for name, m in model.named_modules()} == modes
    first = callback.last_generated.clone()
    callback.preview(trainer, module)  # the fixed seed makes previews of the same weights identical
    assert torch.equal(callback.last_generated, first)
    assert not any(p.grad is not None and p.grad.requires_grad for p in model.parameters())


def test_once_per_step_under_accumulation_and_pngs_in_save_dir(tmp_path):
    callback = PreviewCallback(every_n_steps=1, steps=1, prompts=PROMPTS[:1], save_dir=str(tmp_path / "png"))
    seen = []
    preview = callback.preview

    def counting_preview(trainer, pl_module):
        seen.append(trainer.global_step)
        preview(trainer, pl_module)

    callback.preview = counting_preview
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(callback, logger=False, max_steps=1, accumulate=2)
    assert seen == [0, 1]  # 2 batch starts and 2 batch ends, but global_step only 0 then 1
    assert sum("no TensorBoardLogger" in str(w.message) for w in caught) == 1
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == [f"{kind}_step{s:06d}.png" for kind in ("generated", "reconstruction") for s in (0, 1)]


def test_no_logger_and_no_save_dir_skips_the_work():
    callback = PreviewCallback(every_n_steps=1, steps=1, prompts=PROMPTS[:1])
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        fit(callback, logger=False, max_steps=1)
    assert callback.last_generated is None


def test_latent_ablation_skips_reconstructions(tmp_path):
    callback = PreviewCallback(every_n_steps=1, steps=1, prompts=PROMPTS[:2])
    logger = TensorBoardLogger(tmp_path)
    fit(callback, logger, spec=CheersSpec.tiny(pixel_reconstruct="latent"), max_steps=1)
    assert callback.last_reconstruction is None and callback.last_reconstruction_mse is None
    assert callback.last_generated is not None
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["previews/generated"]
    assert [e.step for e in events.Images("previews/generated")] == [0, 1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        PreviewCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="prompts"):
        PreviewCallback(prompts=[])
    with pytest.raises(ValueError, match="display_side"):
        PreviewCallback(display_side=0)
    assert len(PreviewCallback().prompts) == 4
