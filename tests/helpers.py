"""Shared test helpers."""

from pathlib import Path

import torch
from torch import nn


def randomize_zero_inits(module: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give every all-zero parameter (AdaLN-Zero, final layers, the HFI gate) small random values,
    so that tests of the sampler and the head see non-trivial velocities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_random_model():
    """A tiny ``CheersModel`` in eval mode, seeded (0), with :func:`randomize_zero_inits` applied."""
    from cheers_pl.model import CheersModel
    from cheers_pl.spec import CheersSpec

    torch.manual_seed(0)
    model = CheersModel(CheersSpec.tiny()).eval()
    randomize_zero_inits(model)
    return model


def chat_template_ids(tokenizer, messages, add_generation_prompt=False):
    """The real tokenizer's own chat template, tokenized: the reference the processor must equal."""
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )


REPO = Path(__file__).resolve().parents[1]
CHECKPOINTED_OVERLAY = """
trainer:
  enable_progress_bar: false
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: ${{trainer.default_root_dir}}/checkpoints
        every_n_train_steps: {every}
        save_last: true
        enable_version_counter: false
{extra_callbacks}model:
  init_args:
    init_from: null
data:
  num_workers: {workers}
"""


def tiny_fit_args(
    run: Path, demo: Path, steps: int, every: int = 2, workers: int = 0, extra_callbacks: str = ""
) -> list[str]:
    """``cheers fit`` arguments of the tiny stage II from scratch on ``demo`` shards, checkpointing
    every ``every`` steps (each also as ``last.ckpt``) under ``run``; ``extra_callbacks`` is YAML
    of more ``trainer.callbacks`` entries (4-space indented list items)."""
    run.mkdir(parents=True, exist_ok=True)
    overlay = run / "overlay.yaml"
    overlay.write_text(
        CHECKPOINTED_OVERLAY.format(every=every, workers=workers, extra_callbacks=extra_callbacks)
    )
    configs = [REPO / "experiments/stage2_pretrain.yaml", REPO / "experiments/tiny.yaml", overlay]
    args = ["fit"] + [a for c in configs for a in ("-c", str(c))]
    return args + [
        "--run_folder",
        "fixed",
        "--trainer.default_root_dir",
        str(run),
        "--data.root",
        str(demo),
        "--trainer.max_steps",
        str(steps),
    ]
