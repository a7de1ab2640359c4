"""Helpers for the recipe tests: make small real image files, run a recipe, read its shards back."""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from cheers_pl.data.images import decode_image
from cheers_pl.data.schema import Sample, from_raw
from data_recipes.writer import verify_manifest


def picture(mode: str = "RGB", size: tuple[int, int] = (32, 24), seed: int = 0) -> Image.Image:
    """A small non-constant image in ``mode`` (RGB, RGBA, L, P, CMYK, I;16)."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # mode I;16
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        img = rgb.copy()
        img.putalpha(alpha)
        return img
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    """``img`` encoded as ``fmt``."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_image(path: Path, seed: int = 0, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """Write a small image file (creating folders); its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode(picture(mode, seed=seed), fmt)
    path.write_bytes(data)
    return data


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One JSON value per line (a ``str`` is written as the raw line)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_recipe(module: Any, argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` with the recipe's own options and run it; the manifest."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


def read_back(out: Path) -> list[tuple[str, Sample]]:
    """(shard file name, sample) of every sample in ``out``, read with ``webdataset`` itself."""
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    if not urls:
        return []
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [(Path(raw["__url__"]).name, from_raw(raw)) for raw in dataset]


def check_output(out: Path) -> tuple[dict[str, Any], list[Sample]]:
    """Everything a written folder must satisfy; its manifest and samples.

    The checksums, sizes and counts verify; the manifest's counts per task and per shard equal
    what webdataset reads back; every sample validates and every image decodes to RGB.
    """
    report = verify_manifest(out)
    assert report["ok"], report["errors"]
    manifest = json.loads((out / "manifest.json").read_text())
    found = read_back(out)
    per_shard: dict[str, Counter] = {}
    for shard, sample in found:
        per_shard.setdefault(shard, Counter())[sample.task] += 1
        for data in sample.images:
            img, _ = decode_image(data)
            assert img.mode == "RGB"
    assert {s["file"]: s["tasks"] for s in manifest["shards"]} == {k: dict(v) for k, v in per_shard.items()}
    assert {s["file"]: s["samples"] for s in manifest["shards"]} == {
        k: sum(v.values()) for k, v in per_shard.items()
    }
    assert manifest["tasks"] == dict(sum(per_shard.values(), Counter()))
    assert manifest["samples"] == len(found) == sum(manifest["tasks"].values())
    return manifest, [s for _, s in found]


def skipped_ids(manifest: dict[str, Any], reason: str) -> list[str]:
    """Ids of the skipped examples with ``reason``."""
    return [e["id"] for e in manifest["skipped_examples"] if e["reason"] == reason]
