"""GenEval image generation: the folder layout GenEval's own scorer reads.

For the prompt on line ``i`` (0-based) of GenEval's ``evaluation_metadata.jsonl``::

    out/
        run.json                      repro card (settings, seeds, model id, counts)
        00000/
            metadata.jsonl            line i of the source file, byte for byte (one line)
            samples/
                0000.png ... 0003.png  images_per_prompt samples at the model's resolution

Then score with GenEval (``djghosh13/geneval``)::

    python evaluation/evaluate_images.py out --outfile results.jsonl --model-path <detector dir>
    python evaluation/summary_scores.py results.jsonl

The scorer reads every all-digit folder and every ``<digits>.png`` in its ``samples``, so nothing
else is written there (PNGs are written to a dot-named temporary file first, then renamed).

Seeds. The samples of prompt ``i`` are generated in chunks of ``batch_size`` consecutive samples
(``model.generate`` takes one generator per call); the chunk starting at sample ``k`` draws its
noise from ``derive_seed(seed, "00000"-style key, k)``. With ``batch_size=1`` every image has its
own seed. A chunk's images depend only on (seed, prompt index, k, settings), never on ``limit``,
on which prompts were generated before or on a resumed run. ``run.json`` records the settings;
resuming into a folder made with other settings is refused unless ``overwrite``.

Released GenEval settings (DESIGN section 4): s=9.5, N=80, shift a=1.0, 4 images per prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

__all__ = [
    "GenEvalPrompt",
    "chunk_plan",
    "derive_seed",
    "generate_chunk",
    "load_geneval_metadata",
    "main",
    "run_geneval",
    "sample_images",
    "save_png",
    "to_uint8",
]

# Settings that change the pixels: a resumed run must match them (``limit`` does not).
IMAGE_SETTINGS = ("images_per_prompt", "cfg_scale", "steps", "shift", "seed", "batch_size", "resolution")
_PNG_NAME = re.compile(r"^(\d+)\.png$")


# -- shared by the benchmark runners ------------------------------------------------------------
def derive_seed(seed: int, key: str, k: int) -> int:
    """A 63-bit seed from (run seed, prompt key, sample index): stable across machines and runs."""
    digest = hashlib.sha256(f"cheers-pl/bench:{int(seed)}:{key}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def chunk_plan(seed: int, key: str, n: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``[(first sample k, count, seed), ...]``: how the ``n`` samples of one prompt are generated."""
    return [(k, min(batch_size, n - k), derive_seed(seed, key, k)) for k in range(0, n, batch_size)]


def sample_images(
    model,
    prompt: str,
    key: str,
    n: int,
    *,
    cfg_scale: float,
    steps: int,
    shift: float,
    seed: int = 0,
    batch_size: int = 4,
) -> Tensor:
    """The ``n`` samples (n, 3, r, r) in [0, 1] the runners write for ``prompt`` under ``key``."""
    out = [
        generate_chunk(model, prompt, count, s, cfg_scale, steps, shift)
        for _, count, s in chunk_plan(seed, key, n, batch_size)
    ]
    return torch.cat(out)


def generate_chunk(model, prompt: str, count: int, seed: int, cfg_scale: float, steps: int, shift: float):
    """One ``model.generate`` call: ``count`` samples of ``prompt`` from one seed, (count,3,r,r) on CPU."""
    images = model.generate([prompt] * count, cfg_scale=cfg_scale, steps=steps, shift=shift, seed=seed).images
    return images.detach().float().cpu()


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounding to nearest (what the PNGs hold)."""
    arr = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(1, 2, 0).contiguous().numpy()


def save_png(pixels: np.ndarray | Image.Image, path: Path) -> None:
    """Write a PNG atomically: a dot-named temporary file (no scorer pattern matches it), then rename."""
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def check_settings(
    images_per_prompt: int, steps: int, batch_size: int, limit: int | None, cfg_scale, shift, seed: int = 0
) -> None:
    """Raise ``ValueError`` naming the first bad sampling argument."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for name, value in (
        ("images_per_prompt", images_per_prompt),
        ("steps", steps),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")
    for name, value in (("cfg_scale", cfg_scale), ("shift", shift)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")


def resume_guard(out_dir: Path, settings: dict[str, Any], model_id: str | None, overwrite: bool) -> None:
    """Refuse to add images to a folder whose ``run.json`` says they were made differently.

    With ``overwrite`` the run goes on, but a partial one (``limit``) warns that the outputs it does
    not reach still hold the old settings' images.
    """
    card = out_dir / "run.json"
    if not card.is_file():
        return
    try:
        old = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        if overwrite:
            return
        raise ValueError(f"{card} is unreadable ({err}); remove it or pass overwrite=True") from None
    before = old.get("settings", {}) if isinstance(old, dict) else {}
    diff = [
        f"{k}={before.get(k)!r} (now {settings[k]!r})" for k in IMAGE_SETTINGS if before.get(k) != settings[k]
    ]
    old_id = old.get("model_id") if isinstance(old, dict) else None
    if model_id is not None and old_id is not None and old_id != model_id:
        diff.append(f"model_id={old_id!r} (now {model_id!r})")
    if diff and overwrite:
        if settings.get("limit") is not None:
            warnings.warn(
                f"{out_dir}: overwriting with other settings ({', '.join(diff)}) but limit="
                f"{settings['limit']}: outputs beyond the limit keep the old images",
                stacklevel=3,
            )
    elif diff:
        raise ValueError(
            f"{out_dir} already holds images made with other settings: {', '.join(diff)}; "
            "use another output folder or overwrite=True"
        )


def run_card(benchmark: str, model, settings: dict[str, Any], model_id: str | None, **extra) -> dict:
    """The common part of ``run.json``."""
    import cheers_pl

    spec = getattr(model, "spec", None)
    device = getattr(getattr(model, "placeholder_ids", None), "device", None)
    return {
        "benchmark": benchmark,
        "settings": settings,
        "seed_rule": (
            "samples are generated in chunks of batch_size consecutive samples of one prompt; the chunk "
            "starting at sample k uses torch.Generator().manual_seed(derive_seed(seed, key, k)), "
            "derive_seed = first 8 bytes (big-endian, & 2**63-1) of "
            "sha256('cheers-pl/bench:{seed}:{key}:{k}')"
        ),
        "model_id": model_id,
        "model_spec": dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else None,
        "versions": {"cheers_pl": cheers_pl.__version__, "torch": torch.__version__},
        "device": str(device) if device is not None else None,
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class eval_mode:
    """Context manager: the model in eval mode inside, its previous mode restored after."""

    def __init__(self, model):
        self.model, self.was_training = model, bool(getattr(model, "training", False))

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()
        return False


def load_model(path: str, device: str | None):
    """``cheers_pl.io.export.load_any(path)``, imported only now, moved to ``device``."""
    try:
        from cheers_pl.io.export import load_any
    except ImportError as err:
        raise SystemExit(
            f"cannot load --model: cheers_pl.io.export.load_any is unavailable ({err})"
        ) from None
    try:
        model = load_any(path)
    except (ValueError, OSError) as err:
        raise SystemExit(f"cannot load --model {path}: {err}") from None
    if not hasattr(model, "generate"):
        raise SystemExit(f"--model {path}: load_any returned {type(model).__name__}, not a CheersModel")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)


def add_sampling_args(parser: argparse.ArgumentParser, steps: int, shift: float) -> None:
    parser.add_argument("--model", required=True, metavar="PATH", help="checkpoint / export to load")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="samples per prompt")
    parser.add_argument("--cfg-scale", type=float, default=9.5, help="CFG scale s")
    parser.add_argument("--steps", type=int, default=steps, help="Euler steps N")
    parser.add_argument("--shift", type=float, default=shift, help="time shift a")
    parser.add_argument("--seed", type=int, default=0, help="run seed")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per generate call")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--model-id", default=None, help="id recorded in run.json (default: --model)")


# -- GenEval -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GenEvalPrompt:
    """One line of the metadata file: ``index`` (0-based line), the ``line`` text, its ``prompt``."""

    index: int
    line: str
    prompt: str
    tag: str | None


def load_geneval_metadata(path: str | os.PathLike) -> list[GenEvalPrompt]:
    """Parse and check every line (errors name the line number) before anything is generated.

    Trailing blank lines are ignored; a blank line between prompts is an error, since the folder
    index is the line index.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GenEval metadata file not found: {path}")
    if not path.is_file():
        raise ValueError(f"GenEval metadata path is not a file: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty GenEval metadata file (no prompt lines)")
    out = []
    for i, line in enumerate(lines):
        where = f"{path}: line {i + 1}"
        if not line.strip():
            raise ValueError(f"{where}: blank line (each line must be one JSON object)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: no non-empty string 'prompt'")
        tag = obj.get("tag")
        out.append(GenEvalPrompt(i, line, prompt, tag if isinstance(tag, str) else None))
    return out


def _existing(samples: Path, n: int) -> set[int]:
    return {k for k in range(n) if (samples / f"{k:04d}.png").is_file()}


def run_geneval(
    model,
    metadata_jsonl: str | os.PathLike,
    out_dir: str | os.PathLike,
    images_per_prompt: int = 4,
    cfg_scale: float = 9.5,
    steps: int = 80,
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    limit: int | None = None,
    overwrite: bool = False,
    model_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate GenEval's sample folders (layout in the module docstring); returns the run card.

    Prompts whose samples all exist are skipped unless ``overwrite``; of a partly written prompt only
    the chunks with a missing file are generated (the rest are the same images anyway).
    ``limit`` keeps the first ``limit`` prompts of the file (same folder names, same images).
    """
    check_settings(images_per_prompt, steps, batch_size, limit, cfg_scale, shift, seed)
    prompts = load_geneval_metadata(metadata_jsonl)
    selected = prompts if limit is None else prompts[:limit]
    out = Path(out_dir)
    settings = {
        "images_per_prompt": images_per_prompt,
        "cfg_scale": float(cfg_scale),
        "steps": steps,
        "shift": float(shift),
        "seed": seed,
        "batch_size": batch_size,
        "resolution": int(model.image_size),
        "limit": limit,
        "overwrite": overwrite,
    }
    resume_guard(out, settings, model_id, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"prompts_in_source": len(prompts), "selected": len(selected)}
    counts.update(generated_images=0, skipped_prompts=0)
    seeds = {}
    for p in selected:
        key = f"{p.index:05d}"
        seeds[key] = [s for *_, s in chunk_plan(seed, key, images_per_prompt, batch_size)]
    card = run_card(
        "geneval",
        model,
        settings,
        model_id,
        source=str(metadata_jsonl),
        source_sha256=hashlib.sha256(Path(metadata_jsonl).read_bytes()).hexdigest(),
        layout="{index:05d}/metadata.jsonl (source line) + {index:05d}/samples/{k:04d}.png",
        scorer="python evaluation/evaluate_images.py OUT --outfile results.jsonl --model-path DETECTOR_DIR",
        counts=counts,
        status="running",
        chunk_seeds=seeds,
    )
    write_json(out / "run.json", card)

    with eval_mode(model):
        for p in tqdm(selected, desc="GenEval", unit="prompt", disable=not progress):
            key = f"{p.index:05d}"
            folder, samples = out / key, out / key / "samples"
            samples.mkdir(parents=True, exist_ok=True)
            meta = folder / "metadata.jsonl"
            if not meta.is_file() or meta.read_text(encoding="utf-8") != p.line + "\n":
                meta.write_text(p.line + "\n", encoding="utf-8")
            if overwrite:
                for f in samples.iterdir():  # stale extra samples would be scored too
                    m = _PNG_NAME.match(f.name)
                    if m and int(m.group(1)) >= images_per_prompt:
                        f.unlink()
            have = set() if overwrite else _existing(samples, images_per_prompt)
            if len(have) == images_per_prompt:
                counts["skipped_prompts"] += 1
                continue
            for k0, count, s in chunk_plan(seed, key, images_per_prompt, batch_size):
                if all(k in have for k in range(k0, k0 + count)):
                    continue
                images = generate_chunk(model, p.prompt, count, s, cfg_scale, steps, shift)
                for j in range(count):
                    save_png(to_uint8(images[j]), samples / f"{k0 + j:04d}.png")
                counts["generated_images"] += count

    card["status"] = "complete"
    card["written_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(out / "run.json", card)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    from cheers_pl.cli_help import make_parser

    parser = make_parser(
        "cheers geneval",
        "Generate GenEval's sample folders (OUT/<index:05d>/metadata.jsonl and "
        "samples/<k:04d>.png) for its evaluate_images.py. Defaults are the released settings: "
        "s=9.5, N=80, a=1.0, 4 per prompt.",
    )
    parser.add_argument(
        "--metadata", required=True, metavar="JSONL", help="GenEval evaluation_metadata.jsonl"
    )
    add_sampling_args(parser, steps=80, shift=1.0)
    args = parser.parse_args(argv)
    try:  # check the inputs before the (slow) model load
        check_settings(
            args.images_per_prompt,
            args.steps,
            args.batch_size,
            args.limit,
            args.cfg_scale,
            args.shift,
            args.seed,
        )
        load_geneval_metadata(args.metadata)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    model = load_model(args.model, args.device)
    try:
        card = run_geneval(
            model,
            args.metadata,
            args.out,
            args.images_per_prompt,
            args.cfg_scale,
            args.steps,
            args.shift,
            args.seed,
            args.batch_size,
            args.limit,
            args.overwrite,
            model_id=args.model_id or args.model,
        )
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    c = card["counts"]
    print(
        f"GenEval: {c['selected']} prompts, {c['generated_images']} images generated, "
        f"{c['skipped_prompts']} prompts already complete -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
