"""``cheers demo`` / ``make demo``: the kit's main job on bundled real data, on CPU, in minutes.

1. build the demo shards (scikit-image photos, scikit-learn digits) unless already there;
2. fit the tiny VAE on the demo images (CHEERS's VAE is frozen and no tiny pretrained one
   exists, so a random one would make every image meaningless);
3. stage I (alignment) then stage II (pre-training), tiny flavors, through the same LightningCLI
   YAMLs as the paper runs (``experiments/stage*.yaml`` + ``experiments/tiny.yaml``);
4. sample images from the final checkpoint; print where the logs, checkpoints and images are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PROMPTS = [
    "a handwritten digit 0",
    "a handwritten digit 3",
    "a handwritten digit 7",
    "a photo of a tabby cat",
]


def _callback(class_path: str, **init_args: object) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def _overlay(out: Path, vae: Path, preview_every: int) -> Path:
    """The demo's few changes over ``tiny.yaml``: the fitted VAE and the preview cadence."""
    root, pl = "${trainer.default_root_dir}", "lightning.pytorch.callbacks"
    callbacks = [
        _callback(f"{pl}.ModelCheckpoint", dirpath=f"{root}/checkpoints", save_last=True,
                  every_n_train_steps=preview_every, enable_version_counter=False),
        _callback(f"{pl}.LearningRateMonitor", logging_interval="step"),
        _callback("cheers_pl.callbacks.previews.PreviewCallback", every_n_steps=preview_every, steps=20,
                  cfg_scale=3.0, shift=1.0, prompts=PROMPTS, save_dir=f"{root}/previews"),
        _callback("cheers_pl.callbacks.hfi_heatmap.HFIHeatmapCallback", every_n_steps=preview_every, steps=20,
                  cfg_scale=3.0, shift=1.0, prompts=PROMPTS, panel_side=96),
        _callback(f"{pl}.RichProgressBar"),
    ]  # fmt: skip
    overlay = {
        "trainer": {"callbacks": callbacks, "log_every_n_steps": 10},
        "model": {"init_args": {"spec": {"vae": {"flavor": "pretrained", "path": str(vae)}}}},
    }
    path = out / "demo_overlay.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(overlay, indent=1))  # JSON is YAML
    return path


def _stage(name: str, yaml: str, out: Path, data: Path, overlay: Path, steps: int) -> Path:
    from cheers_pl.cli import main

    configs = ["-c", str(EXPERIMENTS / yaml), "-c", str(EXPERIMENTS / "tiny.yaml"), "-c", str(overlay)]
    where = ["--trainer.default_root_dir", str(out / name), "--data.root", str(data)]
    main(["fit", *configs, *where, "--trainer.max_steps", str(steps)])
    return out / name / "checkpoints" / "last.ckpt"


def _losses(run: Path) -> tuple[float, float]:
    """First and last logged ``train/loss`` of a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.glob("tb/version_*"))[-1]
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in acc.Scalars("train/loss")]
    return values[0], values[-1]


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
    stage1_steps: int = 600,
    stage2_steps: int = 1200,
    vae_steps: int = 400,
    preview_every: int = 200,
) -> dict[str, str]:
    """Run the whole demo; returns the paths it leaves (also printed)."""
    from cheers_pl.demo_vae import fit_and_save

    torch.set_num_threads(1)  # tiny models: see tests/conftest.py for the measurement
    start, out_dir, data_dir = time.perf_counter(), Path(out), Path(data)
    if not (data_dir / "manifest.json").is_file():
        from data_recipes.demo import main as build_demo

        build_demo(["--out", str(data_dir)])
    shards = [str(data_dir / "understanding"), str(data_dir / "generation")]
    vae = Path(fit_and_save(shards, str(out_dir / "vae"), size=32, steps=vae_steps))
    overlay = _overlay(out_dir, vae, preview_every)
    _stage("stage1", "stage1_alignment.yaml", out_dir, data_dir, overlay, stage1_steps)
    ckpt2 = _stage("stage2", "stage2_pretrain.yaml", out_dir, data_dir, overlay, stage2_steps)
    image = sample(ckpt2, out_dir)
    report = {"logs": str(out_dir), "checkpoint": str(ckpt2), "image": str(image), "vae": str(vae)}
    print(f"\n== CHEERS demo done in {time.perf_counter() - start:.0f} s ==")
    for name in ("stage1", "stage2"):
        first, last = _losses(out_dir / name)
        print(f"{name}: train/loss {first:.3f} -> {last:.3f}")
    for key, value in report.items():
        print(f"{key:10s} {value}")
    print(f"TensorBoard: make tb RUNS={out_dir}   (or: .venv/bin/tensorboard --logdir {out_dir})")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cheers demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--stage1-steps", type=int, default=600)
    parser.add_argument("--stage2-steps", type=int, default=1200)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--preview-every", type=int, default=200)
    a = parser.parse_args(argv)
    run_demo(a.out, a.data, a.stage1_steps, a.stage2_steps, a.vae_steps, a.preview_every)
    return 0
