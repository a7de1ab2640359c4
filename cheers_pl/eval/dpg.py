"""DPG-Bench image generation: one 2x2 grid PNG per prompt, the layout its scorer reads.

For every ``prompts_dir/<id>.txt``::

    out/
        run.json        repro card (settings, seeds, model id, skipped prompts)
        <id>.png        2r x 2r grid, r = the model's resolution; sample k sits at
                        k=0 (0,0,r,r)  k=1 (r,0,2r,r)  k=2 (0,r,r,2r)  k=3 (r,r,2r,2r)   (PIL crop boxes)

Then score with DPG-Bench (``TencentQQGYLab/ELLA``)::

    python dpg_bench/compute_dpg_bench.py --image-root-path out --resolution r --pic-num 4

(``--pic-num`` defaults to 1 there, which scores only the top-left sample; the scorer also tries
``run.json``, prints "Failed filename: run.json" and goes on.)

Seeds follow :mod:`cheers_pl.eval.geneval`: chunks of ``batch_size`` samples, the chunk starting at
sample k seeded with ``derive_seed(seed, id, k)``, so an image depends on its prompt id, not on
which other prompts were run. Released DPG-Bench settings (DESIGN section 4): s=9.5, N=250,
shift a=0.5, 4 images per prompt.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cheers_pl.eval.geneval import (
    add_sampling_args,
    check_settings,
    chunk_plan,
    eval_mode,
    generate_chunk,
    load_model,
    resume_guard,
    run_card,
    save_png,
    to_uint8,
    write_json,
)

__all__ = ["grid_boxes", "main", "make_grid", "read_dpg_prompts", "run_dpg"]

GRID = 2  # DPG-Bench's scorer crops a 2x2 grid


def grid_boxes(r: int) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes (left, upper, right, lower) of samples 0..3 in a grid of side ``2r``."""
    return [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]


def make_grid(samples: Sequence[np.ndarray]) -> np.ndarray:
    """Four (r, r, 3) uint8 samples -> the (2r, 2r, 3) grid with sample k at ``grid_boxes(r)[k]``."""
    if len(samples) != GRID * GRID:
        raise ValueError(f"a DPG-Bench grid takes 4 samples, got {len(samples)}")
    r = samples[0].shape[0]
    grid = np.zeros((GRID * r, GRID * r, 3), dtype=np.uint8)
    for s, (left, upper, right, lower) in zip(samples, grid_boxes(r), strict=True):
        grid[upper:lower, left:right] = s
    return grid


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_dpg_prompts(prompts_dir: str | os.PathLike) -> tuple[dict[str, str], dict[str, str]]:
    """(``{id: prompt}`` in natural id order, ``{id: why skipped}`` for empty or unreadable files)."""
    root = Path(prompts_dir)
    if not root.exists():
        raise FileNotFoundError(f"DPG-Bench prompts folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"DPG-Bench prompts path is not a folder: {root}")
    files = sorted(
        (f for f in root.iterdir() if f.suffix == ".txt" and f.is_file()), key=lambda f: _natural(f.stem)
    )
    if not files:
        raise ValueError(f"no <id>.txt prompt files in {root}")
    prompts, skipped = {}, {}
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            skipped[f.stem] = f"not UTF-8 ({err})"
            continue
        if not text:
            skipped[f.stem] = "empty prompt file"
            continue
        prompts[f.stem] = text
    return prompts, skipped


def run_dpg(
    model,
    prompts_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    images_per_prompt: int = 4,
    cfg_scale: float = 9.5,
    steps: int = 250,
    shift: float = 0.5,
    seed: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    batch_size: int = 4,
    model_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out/<id>.png`` grids (layout in the module docstring); returns the run card.

    Empty (or non-UTF-8) prompt files are reported in a warning and in ``run.json``'s ``skipped``
    and the others still run. Existing grids are kept unless ``overwrite``. ``limit`` keeps the first
    ``limit`` readable prompts in natural id order.
    """
    if images_per_prompt != GRID * GRID:
        raise ValueError(
            f"images_per_prompt={images_per_prompt!r}: DPG-Bench's 2x2 grid needs images_per_prompt=4"
        )
    check_settings(images_per_prompt, steps, batch_size, limit, cfg_scale, shift, seed)
    prompts, skipped = read_dpg_prompts(prompts_dir)
    if skipped:
        warnings.warn(
            f"DPG-Bench: skipping {len(skipped)} prompt file(s): "
            + ", ".join(f"{i}.txt ({why})" for i, why in skipped.items()),
            stacklevel=2,
        )
    ids = list(prompts)[:limit] if limit is not None else list(prompts)
    r = int(model.image_size)
    out = Path(out_dir)
    settings = {
        "images_per_prompt": images_per_prompt,
        "cfg_scale": float(cfg_scale),
        "steps": steps,
        "shift": float(shift),
        "seed": seed,
        "batch_size": batch_size,
        "resolution": r,
        "limit": limit,
        "overwrite": overwrite,
    }
    resume_guard(out, settings, model_id, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"prompt_files": len(prompts) + len(skipped), "selected": len(ids), "generated_grids": 0}
    counts.update(kept_existing=0, skipped=len(skipped))
    card = run_card(
        "dpg",
        model,
        settings,
        model_id,
        source=str(prompts_dir),
        layout="<id>.png: 2r x 2r grid; sample k at PIL crop box k of "
        "[(0,0,r,r),(r,0,2r,r),(0,r,r,2r),(r,r,2r,2r)]",
        scorer=f"python dpg_bench/compute_dpg_bench.py --image-root-path OUT --resolution {r} --pic-num 4",
        counts=counts,
        skipped=skipped,
        status="running",
        chunk_seeds={i: [s for *_, s in chunk_plan(seed, i, images_per_prompt, batch_size)] for i in ids},
        prompts_sha256=hashlib.sha256("\n".join(f"{i}\t{prompts[i]}" for i in ids).encode()).hexdigest(),
    )
    write_json(out / "run.json", card)

    with eval_mode(model):
        for pid in tqdm(ids, desc="DPG-Bench", unit="prompt", disable=not progress):
            target = out / f"{pid}.png"
            if target.is_file() and not overwrite:
                counts["kept_existing"] += 1
                continue
            samples = []
            for _, count, s in chunk_plan(seed, pid, images_per_prompt, batch_size):
                images = generate_chunk(model, prompts[pid], count, s, cfg_scale, steps, shift)
                samples += [to_uint8(images[j]) for j in range(count)]
            save_png(make_grid(samples), target)
            counts["generated_grids"] += 1

    card["status"] = "complete"
    card["written_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(out / "run.json", card)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    from cheers_pl.cli_help import make_parser

    parser = make_parser(
        "cheers dpg",
        "Generate DPG-Bench grids (OUT/<id>.png, 2x2 samples of the model's resolution) for "
        "compute_dpg_bench.py. Defaults are the released settings: s=9.5, N=250, a=0.5, 4 per prompt.",
    )
    parser.add_argument(
        "--prompts", required=True, metavar="DIR", help="folder of DPG-Bench <id>.txt prompts"
    )
    add_sampling_args(parser, steps=250, shift=0.5)
    args = parser.parse_args(argv)
    try:  # check the inputs before the (slow) model load
        if args.images_per_prompt != GRID * GRID:
            raise ValueError(f"--images-per-prompt={args.images_per_prompt}: DPG-Bench's 2x2 grid needs 4")
        check_settings(
            args.images_per_prompt,
            args.steps,
            args.batch_size,
            args.limit,
            args.cfg_scale,
            args.shift,
            args.seed,
        )
        read_dpg_prompts(args.prompts)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    model = load_model(args.model, args.device)
    try:
        card = run_dpg(
            model,
            args.prompts,
            args.out,
            args.images_per_prompt,
            args.cfg_scale,
            args.steps,
            args.shift,
            args.seed,
            args.limit,
            args.overwrite,
            args.batch_size,
            model_id=args.model_id or args.model,
        )
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    c = card["counts"]
    print(
        f"DPG-Bench: {c['generated_grids']} grids generated, {c['kept_existing']} kept, "
        f"{c['skipped']} prompt files skipped -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
