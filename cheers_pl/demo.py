"""``cheers demo`` / ``make demo``: the kit's main job on bundled real data, on CPU, in minutes.

1. build the demo shards (scikit-image photos, scikit-learn digits) unless already there;
2. fit the tiny VAE on the demo images (CHEERS's VAE is frozen and no tiny pretrained one
   exists, so a random one would make every image meaningless);
3. stage I (alignment) then stage II (pre-training), tiny flavors, through the same LightningCLI
   YAMLs as the paper runs (``experiments/stage*.yaml`` + ``experiments/tiny.yaml``), with the
   held-out prompt / image sensitivities and the judged eval logged to TensorBoard as it trains;
4. sample images from the final checkpoint, run ``cheers eval demo`` on it (T2I prompt-following
   judged by a digit classifier, held-out digit and number reading, held-out FM loss and the
   sensitivities) and print per stage the text and FM losses and the eval table.

Sizes, steps and learning rate were chosen so that this reaches, on a 2-core CPU in about ten
minutes, T2I prompt-following >= 80% and held-out digit reading >= 90% (README: the table).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PROMPTS = [  # the demo's own training captions (data_recipes/demo.py), and a photo's
    "a handwritten digit 0 in white on black",
    "a handwritten digit 3 in white on black",
    "a handwritten digit 7 in white on black",
    "a photo of a tabby cat",
]
STAGE1_STEPS, STAGE2_STEPS, VAE_STEPS, PREVIEW_EVERY = 200, 5500, 400, 1000
EMA_DECAY, EMA_EVERY = 0.99, 5  # stage II's EMA, updated every 5 steps (horizon ~500 steps): steadier
# reading at a constant LR; every step would cost ~15 ms (a Python loop over ~700 tensors)


def demo_data_current(data: Path) -> bool:
    """True when ``data`` holds demo shards with the held-out folders and judge the eval reads
    (an older demo folder lacks them and is rebuilt)."""
    try:
        manifest = json.loads((data / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return all(key in manifest for key in ("heldout", "heldout_understanding", "judge"))


def _callback(class_path: str, **init_args: object) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def _overlay(out: Path, vae: Path, preview_every: int, name: str, ema_decay: float | None = None) -> Path:
    """The demo's few changes over ``tiny.yaml``: the fitted VAE, the callbacks and their cadence.

    ``ema_decay``: also keep an EMA of the weights (Lightning's ``EMAWeightAveraging``, updated
    every ``EMA_EVERY`` steps); checkpoints then hold the EMA weights (the live ones under
    ``current_model_state``), so the next stage, the final sample and the eval use them.
    Callbacks during training see the live weights.
    """
    root, pl = "${trainer.default_root_dir}", "lightning.pytorch.callbacks"
    callbacks = [
        _callback(f"{pl}.ModelCheckpoint", dirpath=f"{root}/checkpoints", save_last=True,
                  every_n_train_steps=preview_every, enable_version_counter=False),
        _callback(f"{pl}.LearningRateMonitor", logging_interval="step"),
        _callback("cheers_pl.callbacks.previews.PreviewCallback", every_n_steps=preview_every, steps=20,
                  cfg_scale=3.0, shift=1.0, prompts=PROMPTS, save_dir=f"{root}/previews"),
        _callback("cheers_pl.callbacks.hfi_heatmap.HFIHeatmapCallback", every_n_steps=preview_every, steps=20,
                  cfg_scale=3.0, shift=1.0, prompts=PROMPTS, panel_side=96),
        _callback("cheers_pl.callbacks.SensitivityCallback", every_n_steps=preview_every, samples=32),
        _callback("cheers_pl.callbacks.DemoEvalCallback", every_n_steps=2 * preview_every, per_digit=2,
                  max_reading=20),
        _callback("cheers_pl.callbacks.progress.CheersProgressBar"),
        _callback("cheers_pl.callbacks.DataStatsCallback"),
    ]  # fmt: skip
    if ema_decay is not None:
        callbacks.append(
            _callback(f"{pl}.EMAWeightAveraging", decay=ema_decay, update_every_n_steps=EMA_EVERY)
        )
    overlay = {
        "trainer": {
            "callbacks": callbacks,
            "log_every_n_steps": 10,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": root, "name": "tb", "default_hp_metric": False},
            },
        },
        # absolute: the checkpoints keep this path, and must load from any working folder
        "model": {"init_args": {"spec": {"vae": {"flavor": "pretrained", "path": str(vae.resolve())}}}},
    }
    path = out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(overlay, indent=1))  # JSON is YAML
    return path


def _stage(name: str, yaml: str, out: Path, data: Path, overlay: Path, steps: int) -> Path:
    from cheers_pl.cli import main

    configs = ["-c", str(EXPERIMENTS / yaml), "-c", str(EXPERIMENTS / "tiny.yaml"), "-c", str(overlay)]
    where = ["--trainer.default_root_dir", str(out / name), "--data.root", str(data)]
    # the demo's own folders (a rerun replaces them, and says so), its stage I as stage II's start
    where += ["--run_folder", "fixed"]
    if name != "stage1":
        where += ["--model.init_args.init_from", str(out / "stage1" / "checkpoints" / "last.ckpt")]
    main(["fit", *configs, *where, "--trainer.max_steps", str(steps)])
    return out / name / "checkpoints" / "last.ckpt"


LOSSES = ("train/loss_text", "train/loss_fm")


def losses(run: Path) -> dict[str, tuple[float, float]]:
    """Per tag of :data:`LOSSES`: the mean of its first and of its last fifth of logged values.

    Means over fifths, not single steps: one batch's loss swings with its mix of tasks and t.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.glob("tb/version_*"))[-1]
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in LOSSES:
        values = [e.value for e in acc.Scalars(tag)]
        k = max(1, len(values) // 5)
        out[tag] = (sum(values[:k]) / k, sum(values[-k:]) / k)
    return out


def sample(ckpt: Path, out: Path, steps: int = 40) -> Path:
    """Images for :data:`PROMPTS` from a stage checkpoint (its saved spec), saved as one PNG grid."""
    from torchvision.utils import save_image

    from cheers_pl.io.export import load_any

    model = load_any(ckpt)
    images = model.generate(PROMPTS, cfg_scale=3.0, steps=steps, shift=1.0, seed=0).images
    path = out / "generated.png"
    save_image(images, path, nrow=len(PROMPTS), padding=2)
    return path


def run_demo(
    out: str = "runs/demo",
    data: str = "data/demo",
    stage1_steps: int = STAGE1_STEPS,
    stage2_steps: int = STAGE2_STEPS,
    vae_steps: int = VAE_STEPS,
    preview_every: int = PREVIEW_EVERY,
) -> dict[str, str]:
    """Run the whole demo; returns the paths it leaves (also printed)."""
    from cheers_pl.demo_vae import fit_and_save
    from cheers_pl.eval.demo_eval import evaluate_demo, markdown

    torch.set_num_threads(1)  # tiny models: see tests/conftest.py for the measurement
    # Lightning warns that EMAWeightAveraging cannot shard a model built in configure_model; the demo
    # runs in one process with nothing sharded, so the EMA copy is a few MB (the warning stays for fits)
    warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback with a model")
    start, out_dir, data_dir = time.perf_counter(), Path(out), Path(data)
    if not demo_data_current(data_dir):
        from data_recipes.demo import main as build_demo

        if build_demo(["--out", str(data_dir), "--overwrite"]) != 0:  # the reason is the line above
            raise SystemExit(f"cheers demo: could not build the demo data in {data_dir}")
    if any((out_dir / name / "checkpoints").is_dir() for name in ("stage1", "stage2")):
        print(
            f"cheers demo: replacing the checkpoints of the earlier demo run in {out_dir} (TensorBoard "
            "keeps each run as tb/version_N); give --out another folder to keep them",
            file=sys.stderr,
        )
    shards = [str(data_dir / "understanding"), str(data_dir / "generation")]
    vae = Path(fit_and_save(shards, str(out_dir / "vae"), size=32, steps=vae_steps))
    overlay1 = _overlay(out_dir, vae, preview_every, "demo_overlay_stage1")
    overlay2 = _overlay(out_dir, vae, preview_every, "demo_overlay_stage2", ema_decay=EMA_DECAY)
    _stage("stage1", "stage1_alignment.yaml", out_dir, data_dir, overlay1, stage1_steps)
    ckpt2 = _stage("stage2", "stage2_pretrain.yaml", out_dir, data_dir, overlay2, stage2_steps)
    image = sample(ckpt2, out_dir)
    result = evaluate_demo(ckpt2, data_dir, out_dir / "eval")
    report = {"logs": str(out_dir), "checkpoint": str(ckpt2), "image": str(image), "vae": str(vae),
              "eval": result["files"]["md"]}  # fmt: skip
    print(f"\n== CHEERS demo done in {time.perf_counter() - start:.0f} s ==")
    for name in ("stage1", "stage2"):
        row = ", ".join(f"{tag} {a:.3f} -> {b:.3f}" for tag, (a, b) in losses(out_dir / name).items())
        print(f"{name} (means of the first and last fifth): {row}")
    print("\n" + markdown(result))
    for key, value in report.items():
        print(f"{key:10s} {value}")
    print(f"TensorBoard: make tb RUNS={out_dir}   (or: .venv/bin/tensorboard --logdir {out_dir})")
    return report


def main(argv: list[str] | None = None) -> int:
    from cheers_pl.cli_help import make_parser

    parser = make_parser("cheers demo", __doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="run folder: checkpoints, TensorBoard logs, eval")
    parser.add_argument("--data", default="data/demo", help="the demo shards (built here when missing)")
    parser.add_argument("--stage1-steps", type=int, default=STAGE1_STEPS, help="stage I optimiser steps")
    parser.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS, help="stage II optimiser steps")
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="fit steps of the demo VAE (cached)")
    parser.add_argument(
        "--preview-every",
        type=int,
        default=PREVIEW_EVERY,
        help="steps between checkpoints, previews and sensitivities (the judged eval: twice that)",
    )
    a = parser.parse_args(argv)
    run_demo(a.out, a.data, a.stage1_steps, a.stage2_steps, a.vae_steps, a.preview_every)
    return 0
