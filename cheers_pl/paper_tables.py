"""``cheers paper-tables`` / ``make paper-tables``: the paper's ablations at tiny size, with seeds.

Rows (each trained ``--seeds`` times, every seed its own stage I and stage II; tiny flavors, the
demo data and the demo's fitted VAE, on CPU):

* Table 5, row 1 ``und_only``: after alignment, fine-tuned on understanding (+ text) data only;
* Table 5, row 2 ``joint_no_hfi``: joint understanding + generation, ``hfi: none``;
* Table 5, row 3 ``joint_hfi``: joint, with HFI (CHEERS as specified);
* Table 6 ``latent_vit``: understanding only, latents straight into the ViT (TUNA-style,
  ``pixel_reconstruct: latent``, its own stage I in that mode). Its counterpart with pixel
  reconstruction is ``und_only`` (same data, ``pixel_reconstruct: decode``).

Each run ends with :func:`cheers_pl.eval.demo_eval.evaluate` (T2I prompt-following judged by the
digit classifier, held-out digit and number reading, held-out FM loss, both sensitivities, the
detail ratio) and, for HFI runs, Figure 5b: the HFI intensity at every denoising step (per-run
min-max normalisation, then the mean over samples; :mod:`cheers_pl.analysis.hfi`).

Results (``OUT/tables.md``, ``OUT/tables.json``, ``OUT/fig5b.png``): per row and metric the mean
+- sample std over seeds, and per comparison whether the difference of means exceeds the seed
spread (``|mean_a - mean_b| > std_a + std_b``). Resumable per run: a run whose ``result.json``
exists is skipped; one with a ``last.ckpt`` resumes from it (``--ckpt_path``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ABLATIONS = EXPERIMENTS / "ablations"
METRICS = (
    "t2i_acc",
    "read_digit_acc",
    "read_number_acc",
    "read_number_char_acc",
    "fm_heldout",
    "detail_ratio",
    "prompt_sensitivity",
    "image_sensitivity",
)


@dataclass(frozen=True)
class Row:
    """One ablation row: stage-II overlays and the stage-I mode it starts from."""

    name: str
    title: str
    overlays: tuple[str, ...]
    pixel_reconstruct: str = "decode"
    generation: bool = True  # trained on generation (T2I metrics mean something)


ROWS = (
    Row(
        "und_only",
        "Table 5 row 1: understanding-only fine-tune (HFI on)",
        (str(ABLATIONS / "understanding_only.yaml"),),
        generation=False,
    ),
    Row("joint_no_hfi", "Table 5 row 2: joint, no HFI", (str(ABLATIONS / "hfi_none.yaml"),)),
    Row("joint_hfi", "Table 5 row 3: joint, HFI (CHEERS)", ()),
    Row(
        "latent_vit",
        "Table 6 row 1: latents into the ViT (no pixel reconstruct), understanding only",
        (str(ABLATIONS / "understanding_only.yaml"), str(ABLATIONS / "pixel_reconstruct_latent.yaml")),
        pixel_reconstruct="latent",
        generation=False,
    ),
)
COMPARISONS = (  # (title, row a, row b, metrics)
    (
        "Table 5: does generation affect understanding?",
        "joint_hfi",
        "und_only",
        ("read_digit_acc", "read_number_acc", "read_number_char_acc", "image_sensitivity"),
    ),
    (
        "Table 5: is HFI necessary?",
        "joint_hfi",
        "joint_no_hfi",
        (
            "t2i_acc",
            "fm_heldout",
            "detail_ratio",
            "prompt_sensitivity",
            "read_digit_acc",
            "read_number_char_acc",
        ),
    ),
    (
        "Table 6: pixel reconstruct vs latents into the ViT",
        "und_only",
        "latent_vit",
        ("read_digit_acc", "read_number_acc", "read_number_char_acc", "image_sensitivity"),
    ),
)
PAPER = """Paper (Table 5): understanding-only 70.8 SEEDBench / 58.5 ChartQA; joint without HFI 70.0 / 58.8,
GenEval 0.17, DPG 39.11; joint with HFI 69.8 / 59.9, GenEval 0.30, DPG 51.63. (Table 6): without pixel
reconstruct ChartQA 13.9, OCRBench 2.5, TextVQA 9.6; with it 42.1 / 31.5 / 43.4. (Figure 5b): HFI
intensity starts low, dips in the middle and rises sharply in the final steps."""


def _overlay(out: Path, vae: Path, every: int) -> Path:
    """The runs' callbacks (checkpoints and held-out sensitivities, no previews) and the fitted VAE."""
    root, pl = "${trainer.default_root_dir}", "lightning.pytorch.callbacks"
    overlay = {
        "trainer": {
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": f"{pl}.ModelCheckpoint",
                    "init_args": {
                        "dirpath": f"{root}/checkpoints",
                        "save_last": True,
                        "every_n_train_steps": every,
                        "enable_version_counter": False,
                    },
                },
                {
                    "class_path": "cheers_pl.callbacks.SensitivityCallback",
                    "init_args": {"every_n_steps": every, "samples": 32},
                },
            ],
        },
        "model": {"init_args": {"spec": {"vae": {"flavor": "pretrained", "path": str(vae)}}}},
    }
    path = out / "paper_tables_overlay.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(overlay, indent=1))
    return path


def _fit(configs: list[str], root: Path, steps: int, seed: int, data: Path, extra: list[str]) -> Path:
    """The sweep's in-process ``cheers fit``, resumed from ``last.ckpt`` when a killed run left one."""
    from cheers_pl.sweep import fit

    last = root / "checkpoints" / "last.ckpt"
    return fit(
        configs, root, steps, seed, str(data), extra + (["--ckpt_path", str(last)] if last.is_file() else [])
    )


def stage1(out: Path, mode: str, seed: int, steps: int, data: Path, overlay: Path) -> Path:
    """The seed's alignment run in ``mode`` (shared by the rows that start from it)."""
    root = out / f"seed{seed}" / f"stage1_{mode}"
    last = root / "checkpoints" / "last.ckpt"
    if (root / "done").is_file():
        return last
    configs = [str(EXPERIMENTS / "stage1_alignment.yaml"), str(EXPERIMENTS / "tiny.yaml"), str(overlay)]
    if mode == "latent":
        configs.append(str(ABLATIONS / "pixel_reconstruct_latent.yaml"))
    _fit(configs, root, steps, seed, data, [])
    (root / "done").write_text("")
    return last


@torch.no_grad()
def hfi_curve(model, steps: int, seeds: int = 2, cfg_scale: float = 9.5) -> list[float] | None:
    """Figure 5b of one model: per-run min-max normalised HFI intensity averaged over the ten digit
    prompts x ``seeds`` samples, (steps,); None without HFI."""
    from cheers_pl.analysis.hfi import intensity_curve
    from cheers_pl.eval.demo_eval import DIGIT_CAPTION

    if model.spec.hfi == "none":
        return None
    prompts = [DIGIT_CAPTION.format(label=d) for d in range(10)]
    gates = [
        model.generate(prompts, cfg_scale=cfg_scale, steps=steps, shift=1.0, seed=s, return_gates=True).gates
        for s in range(seeds)
    ]
    return [float(v) for v in intensity_curve(gates, "minmax")]


def run_row(
    row: Row,
    seed: int,
    out: Path,
    data: Path,
    overlay: Path,
    steps: tuple[int, int],
    per_digit: int,
    curve_steps: int,
) -> dict[str, Any]:
    """Train and evaluate one (row, seed); its result dict (also ``result.json``)."""
    from cheers_pl.eval.demo_eval import EvalSettings, evaluate
    from cheers_pl.io.export import load_any

    root = out / f"seed{seed}" / row.name
    done = root / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    first = stage1(out, row.pixel_reconstruct, seed, steps[0], data, overlay)
    configs = [str(EXPERIMENTS / "stage2_pretrain.yaml"), str(EXPERIMENTS / "tiny.yaml"), str(overlay)]
    ckpt = _fit(
        [*configs, *row.overlays], root, steps[1], seed, data, ["--model.init_args.init_from", str(first)]
    )
    model = load_any(ckpt).eval()
    result = evaluate(model, data, EvalSettings(per_digit=per_digit, seed=seed))
    result.pop("_images", None)
    curve = hfi_curve(model, curve_steps) if row.generation else None  # a head never trained to generate
    result.update(row=row.name, seed=seed, steps=list(steps), hfi_curve=curve)
    result["train_seconds"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite ``values``."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def exceeds_spread(a: list[float], b: list[float]) -> bool:
    """True when ``|mean(a) - mean(b)| > std(a) + std(b)``: the gap is larger than the seed spread."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return abs(ma - mb) > sa + sb


def _cell(values: list[float]) -> str:
    m, s = mean_std(values)
    return "n/a" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def tables(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(Markdown, JSON summary) of every (row, seed) result."""
    by_row = {r.name: [x for x in results if x["row"] == r.name] for r in ROWS}
    seeds = sorted({x["seed"] for x in results})
    lines = [
        f"Seeds: {seeds}; mean ± sample std over seeds.",
        "",
        "| row | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    summary: dict[str, Any] = {"seeds": seeds, "rows": {}, "comparisons": [], "fig5b": None}
    for row in ROWS:
        runs = by_row[row.name]
        cells = []
        for m in METRICS:
            values = [x.get(m) for x in runs]
            if m == "t2i_acc" and not row.generation:
                cells.append(f"({_cell(values)})")  # not trained to generate: ~chance expected
            else:
                cells.append(_cell(values))
            summary["rows"].setdefault(row.name, {})[m] = list(mean_std(values)) + [values]
        lines.append(f"| {row.name}: {row.title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| comparison | metric | a | b | a - b | exceeds seed spread |",
        "|---|---|---|---|---|---|",
    ]
    for title, a, b, metrics in COMPARISONS:
        for m in metrics:
            va, vb = [x.get(m) for x in by_row[a]], [x.get(m) for x in by_row[b]]
            diff = mean_std(va)[0] - mean_std(vb)[0]
            yes = exceeds_spread(va, vb)
            lines.append(
                f"| {title} | {m} | {a} {_cell(va)} | {b} {_cell(vb)} | {diff:+.3f} | "
                f"{'yes' if yes else 'no'} |"
            )
            summary["comparisons"].append(
                {"title": title, "metric": m, "a": a, "b": b, "diff": diff, "exceeds_seed_spread": yes}
            )
    curves = [x["hfi_curve"] for x in by_row["joint_hfi"] if x.get("hfi_curve")]
    if curves:
        per_step = [mean_std(list(step)) for step in zip(*curves, strict=True)]
        summary["fig5b"] = [list(p) for p in per_step]
        lines += [
            "",
            "Figure 5b (joint_hfi): normalised HFI intensity per denoising step, mean ± std over seeds",
            "",
            "| step | " + " | ".join(str(i) for i in range(len(per_step))) + " |",
            "|---|" + "---|" * len(per_step),
            "| intensity | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in per_step) + " |",
        ]
    lines += ["", "Comparison rule: yes when |mean_a - mean_b| > std_a + std_b.", "", PAPER]
    return "\n".join(lines) + "\n", summary


class DemoDataError(RuntimeError):
    """The demo data could not be built (``data_recipes.demo`` returned non-zero; it printed why)."""


def run_tables(
    out: str = "runs/paper_tables",
    data: str = "data/demo",
    seeds: int = 3,
    stage1_steps: int = 200,
    stage2_steps: int = 2000,
    per_digit: int = 10,
    curve_steps: int = 20,
    rows: list[str] | None = None,
    vae_steps: int = 400,
) -> dict[str, Any]:
    """Every (row, seed) run, then the tables; returns the JSON summary."""
    from cheers_pl.demo import demo_data_current
    from cheers_pl.demo_vae import fit_and_save

    out_dir, data_dir = Path(out), Path(data)
    if not demo_data_current(data_dir):
        from data_recipes.demo import main as build_demo

        if build_demo(["--out", str(data_dir), "--overwrite"]) != 0:
            raise DemoDataError(f"building the demo data in {data_dir} failed (the error is above)")
    shards = [str(data_dir / "understanding"), str(data_dir / "generation")]
    vae = Path(fit_and_save(shards, str(out_dir / "vae"), size=32, steps=vae_steps))
    overlay = _overlay(out_dir, vae, every=500)
    chosen = [r for r in ROWS if rows is None or r.name in rows]
    results = []
    for seed in range(seeds):
        for row in chosen:
            results.append(
                run_row(
                    row,
                    seed,
                    out_dir,
                    data_dir,
                    overlay,
                    (stage1_steps, stage2_steps),
                    per_digit,
                    curve_steps,
                )
            )
    text, summary = tables(results)
    (out_dir / "tables.md").write_text(text)
    (out_dir / "tables.json").write_text(json.dumps(summary, indent=1) + "\n")
    if summary["fig5b"]:
        from torchvision.utils import save_image

        from cheers_pl.analysis.hfi import intensity_plot

        save_image(intensity_plot(torch.tensor([m for m, _ in summary["fig5b"]])), out_dir / "fig5b.png")
    print(text)
    return summary


def main(argv: list[str] | None = None) -> int:
    from cheers_pl.cli_help import make_parser

    parser = make_parser("cheers paper-tables", __doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/paper_tables", help="folder of the runs and tables.md/json")
    parser.add_argument("--data", default="data/demo", help="the demo shards (built here when missing)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (0, 1, ...)")
    parser.add_argument("--stage1-steps", type=int, default=200, help="stage I optimiser steps per run")
    parser.add_argument("--stage2-steps", type=int, default=2000, help="stage II optimiser steps per run")
    parser.add_argument("--per-digit", type=int, default=10, help="T2I images per digit and run")
    parser.add_argument("--curve-steps", type=int, default=20, help="denoising steps of Figure 5b")
    parser.add_argument(
        "--rows", nargs="+", choices=[r.name for r in ROWS], default=None, help="only these (default: all)"
    )
    parser.add_argument("--vae-steps", type=int, default=400, help="fit steps of the demo VAE (cached)")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: see tests/conftest.py
    try:
        run_tables(
            a.out,
            a.data,
            a.seeds,
            a.stage1_steps,
            a.stage2_steps,
            a.per_digit,
            a.curve_steps,
            a.rows,
            a.vae_steps,
        )
    except DemoDataError as err:
        parser.exit(1, f"{parser.prog}: error: {err}; nothing was trained\n")
    return 0
