"""``cheers sweep`` / ``make sweep``: one base stage under a list of overlays, side by side.

Each overlay (a YAML path, or ``base`` for none) is one run ``OUT/<name>`` with the same seed,
so ``tensorboard --logdir OUT`` shows them side by side. ``--preset tiny`` (the default) adds
``experiments/tiny.yaml``: CPU, tiny flavors, the demo shards. A base that starts from a previous
stage (``init_from``) gets one shared run of stage I first (``OUT/_stage1``), as in the paper's
ablations ("after standard vision-language alignment, models are fine-tuned ...").

The results table (``OUT/results.md`` and ``OUT/results.csv``), one row per run: the final
losses; a held-out flow-matching loss (fixed noise and t, on ``--heldout`` shards: by default the
demo's ``heldout/`` digits, never trained on); the reconstruction error of the last previews; the
training-time gate statistics; and the CLIP score of images sampled from fixed prompts when
``--clip`` names a local open_clip folder (else the column says it is unavailable).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from cheers_pl.io.export import load_any

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCALARS = ("train/loss", "train/loss_text", "train/loss_fm", "previews/reconstruction_mse",
           "hfi/gate_mean", "hfi/gate_abs_mean", "hfi/gate_std")  # fmt: skip
PROMPTS = [
    "a handwritten digit 0 in white on black",
    "a handwritten digit 3 in white on black",
    "a handwritten digit 7 in white on black",
    "a photo of a tabby cat",
]
UNAVAILABLE = "unavailable (no CLIP weights given)"


def run_name(overlay: str) -> str:
    return "base" if overlay == "base" else Path(overlay).stem


def check_overlays(base: str, overlays: list[str]) -> list[str]:
    """The run names of ``overlays``; ValueError before any run when two share a name or a YAML is missing."""
    names = [run_name(o) for o in overlays]
    if len(set(names)) != len(names):
        raise ValueError(f"overlay names must differ: {names}")
    missing = [o for o in [base, *overlays] if o != "base" and not Path(o).is_file()]
    if missing:  # now, not after the other runs
        raise ValueError(f"no such YAML: {', '.join(missing)}")
    return names


def needs_previous_stage(base: str) -> bool:
    """True when the base config starts from a previous stage's checkpoint."""
    config = yaml.safe_load(Path(base).read_text())
    return bool(((config.get("model") or {}).get("init_args") or {}).get("init_from"))


def fit(
    configs: list[str], root: Path, steps: int, seed: int, data_root: str | None, extra: list[str]
) -> Path:
    """One in-process ``cheers fit`` run; returns its last checkpoint."""
    from cheers_pl.cli import main

    args = ["fit", *[a for c in configs for a in ("-c", c)], "--trainer.default_root_dir", str(root)]
    args += ["--run_folder", "fixed"]  # a folder per run already (resumed from its last.ckpt)
    args += ["--trainer.max_steps", str(steps), "--seed_everything", str(seed), *extra]
    args += [
        "--trainer.log_every_n_steps",
        str(max(1, min(10, steps // 10))),
    ]  # the table reads the last values
    main(args + (["--data.root", data_root] if data_root else []))
    return root / "checkpoints" / "last.ckpt"


def last_scalars(root: Path) -> dict[str, float]:
    """The last value of every :data:`SCALARS` tag in a run's newest TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sorted(root.glob("tb/version_*"))[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    return {tag: acc.Scalars(tag)[-1].value for tag in SCALARS if tag in tags}


def heldout_fm_loss(model, shards: str, batches: int = 4, batch_size: int = 8, seed: int = 0) -> float:
    """Mean flow-matching loss of the first ``batches * batch_size`` generation samples of ``shards``,
    with fixed noise and t (the same for every run): :func:`cheers_pl.eval.heldout.mean_losses`."""
    from cheers_pl.eval.heldout import mean_losses, read_samples

    samples = read_samples(shards, task="generation", limit=batches * batch_size)
    return mean_losses(model, samples, batch_size, seed).loss_fm


def clip_column(model, clip: str | None) -> float | str:
    if clip is None:
        return UNAVAILABLE
    from cheers_pl.eval.clip_score import clip_score_or_none

    images = model.generate(PROMPTS, cfg_scale=3.0, steps=20, shift=1.0, seed=0).images
    return clip_score_or_none(images, PROMPTS, clip)


def run_sweep(
    base: str,
    overlays: list[str],
    out: str,
    preset: str = "tiny",
    steps: int = 60,
    seed: int = 0,
    data_root: str | None = None,
    heldout: str | None = None,
    clip: str | None = None,
    vae: str | None = None,
) -> list[dict]:
    """Run every overlay over ``base``; write ``results.md`` / ``results.csv`` in ``out``; return the rows.

    ``vae``: a diffusers VAE folder for every run (e.g. ``runs/demo/vae``, the VAE ``make demo``
    fits on the demo images; the tiny preset's random VAE makes image metrics meaningless).
    """
    out_dir = Path(out)
    names = check_overlays(base, overlays)
    tiny = [str(EXPERIMENTS / "tiny.yaml")] if preset == "tiny" else []
    common = (
        []
        if vae is None
        else ["--model.init_args.spec.vae", json.dumps({"flavor": "pretrained", "path": vae})]
    )
    extra = list(common)
    if needs_previous_stage(base):
        stage1 = [str(EXPERIMENTS / "stage1_alignment.yaml"), *tiny]
        _progress(f"stage I first, shared by every run: {out_dir / '_stage1'} (seed {seed})")
        first = fit(stage1, out_dir / "_stage1", steps, seed, data_root, common)
        extra += ["--model.init_args.init_from", str(first)]
    root = Path(data_root or ("data/demo" if preset == "tiny" else "."))
    heldout = heldout or str(root / "heldout" if (root / "heldout").is_dir() else root / "generation")
    rows = []
    for k, (overlay, name) in enumerate(zip(overlays, names, strict=True), 1):
        _progress(f"run {k}/{len(overlays)}: {overlay} -> {out_dir / name} (seed {seed})")
        configs = [base, *tiny] + ([] if overlay == "base" else [overlay])
        ckpt = fit(configs, out_dir / name, steps, seed, data_root, extra)
        model = load_any(ckpt)
        row = {
            "run": name,
            **last_scalars(out_dir / name),
            "heldout/loss_fm": heldout_fm_loss(model, heldout),
        }
        row["clip_score"] = clip_column(model, clip)
        rows.append(row)
    write_table(rows, out_dir, heldout)
    return rows


def _progress(line: str) -> None:
    """A progress line on stderr (stdout ends with the table)."""
    print(f"cheers sweep: {line}", file=sys.stderr, flush=True)


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def write_table(rows: list[dict], out: Path, heldout: str) -> None:
    """``results.csv`` and ``results.md`` in ``out`` (and the table printed); missing values are n/a."""
    columns = ["run", *SCALARS, "heldout/loss_fm", "clip_score"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="n/a")
        writer.writeheader()
        writer.writerows([{k: _fmt(r.get(k)) for k in columns} for r in rows])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in columns) + " |" for r in rows]
    note = f"\nheld-out FM loss on `{heldout}`; gate statistics are n/a without HFI.\n"
    (out / "results.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)


def main(argv: list[str] | None = None) -> int:
    from cheers_pl.cli_help import make_parser

    parser = make_parser("cheers sweep", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default=str(EXPERIMENTS / "stage2_pretrain.yaml"), help="the stage YAML the overlays modify"
    )
    parser.add_argument(
        "--overlays",
        nargs="+",
        default=None,
        help="overlay YAMLs, one run each; 'base': the base alone (default: base and every "
        "experiments/ablations/*.yaml)",
    )
    parser.add_argument("--out", default="runs/sweep", help="folder of the runs and results.md")
    parser.add_argument("--preset", choices=["tiny", "paper"], default="tiny", help="model sizes")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument("--data-root", default=None, help="the stage's data root (tiny: data/demo)")
    parser.add_argument("--heldout", default=None, help="generation shards for the held-out FM loss")
    parser.add_argument("--clip", default=None, help="a local open_clip folder for the CLIP score column")
    parser.add_argument(
        "--vae", default=None, help="a diffusers VAE folder for every run (e.g. runs/demo/vae)"
    )
    a = parser.parse_args(argv)
    if a.overlays is None:
        a.overlays = ["base", *sorted(str(p) for p in (EXPERIMENTS / "ablations").glob("*.yaml"))]
    if a.preset == "tiny":
        torch.set_num_threads(1)  # see tests/conftest.py
    try:
        check_overlays(a.base, a.overlays)
        if a.clip is not None:  # checked now, not after every run has trained
            from cheers_pl.eval.clip_score import check_clip_folder

            check_clip_folder(a.clip)
        if a.vae is not None and not (Path(a.vae) / "config.json").is_file():
            raise FileNotFoundError(f"--vae {a.vae}: no diffusers VAE folder (config.json) there")
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    run_sweep(a.base, a.overlays, a.out, a.preset, a.steps, a.seed, a.data_root, a.heldout, a.clip, a.vae)
    return 0
