"""An ImageNet-style tree ``root/<class>/<file>`` plus a captions file -> text-to-image samples.

This is the shape of the paper's re-captioned ImageNet. ``--captions`` is a JSONL
(``{"image": "n01440764/x.JPEG", "caption": "..."}``) or CSV file with those columns; the paths
are relative to ``root``. An image without a caption (or with an empty one) is skipped as
``no_caption``, or with ``--missing-caption class`` gets "a photo of a {class}" (``_`` -> space).
A caption for a file that is not in the tree is counted as ``missing_image``. ``--repeat N``
writes each sample N times (ids ``{id}_r0`` ... ``{id}_r{N-1}``, next to each other: shuffling is
the loader's job). ``--mode`` is as in the captions recipe (default ``t2i``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from cheers_pl.data.schema import SampleError
from data_recipes.captions import pair_samples
from data_recipes.common import (
    MODES,
    add_output_arguments,
    iter_rows,
    positive_int,
    recipe_main,
    sink_from_args,
)
from data_recipes.writer import ShardSink, check_image, read_image_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def scan_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``root`` (by suffix), sorted."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def load_captions(path: Path, known: set[str], sink: ShardSink) -> dict[str, str]:
    """{relative image path: caption} from the captions file; bad entries are counted on ``sink``."""
    captions: dict[str, str] = {}
    for n, row in iter_rows(path, sink, ["image", "caption"]):
        rel = str(row.get("image") or "")
        norm = PurePosixPath(os.path.normpath(rel)).as_posix() if rel else ""
        if not rel or os.path.isabs(rel) or norm == ".." or norm.startswith("../"):
            sink.skip(
                rel or f"{path.name}:{n}", "bad_path", f"{path.name}:{n}: {rel!r} leaves the image root"
            )
        elif norm not in known:
            sink.skip(rel, "missing_image", f"{path.name}:{n}: {rel!r} is not an image file under the root")
        elif norm in captions:
            sink.skip(
                rel, "duplicate_caption", f"{path.name}:{n}: a second caption for {rel!r} (the first is kept)"
            )
        elif isinstance(row.get("caption"), str) and row["caption"].strip():
            captions[norm] = row["caption"].strip()
    return captions


def class_caption(rel: str) -> str | None:
    """``"a photo of a {class}"`` from the first folder of ``rel`` (``_`` -> space), None at the top."""
    parts = PurePosixPath(rel).parts
    return f"a photo of a {parts[0].replace('_', ' ')}" if len(parts) > 1 else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The imagefolder recipe's options."""
    parser.add_argument("root", help="image tree: ROOT/<class>/<file>")
    parser.add_argument("--captions", default=None, help="JSONL or CSV of {image: path under ROOT, caption}")
    parser.add_argument(
        "--missing-caption", choices=["skip", "class"], default="skip", help="image without caption"
    )
    parser.add_argument("--repeat", type=positive_int, default=1, help="write every sample this many times")
    parser.add_argument("--mode", choices=MODES, default="t2i", help="text-to-image, captioning or both")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Convert the tree ``args.root`` into shards under ``args.out``; the manifest."""
    root = Path(args.root)
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, not {args.repeat}")
    with sink_from_args(args, "imagefolder") as sink:
        files = scan_images(root)
        captions = load_captions(Path(args.captions), set(files), sink) if args.captions else {}
        for rel in files:
            sample_id = str(PurePosixPath(rel).with_suffix(""))
            caption = captions.get(rel) or (class_caption(rel) if args.missing_caption == "class" else None)
            try:
                if caption is None:
                    raise SampleError("no_caption", f"no caption for {rel}")
                image = read_image_file(root, rel)
                check_image(image)  # once per file, not once per repeat
            except SampleError as err:
                sink.skip_error(sample_id, err)
                continue
            for k in range(args.repeat):
                rid = f"{sample_id}_r{k}" if args.repeat > 1 else sample_id
                for sample in pair_samples(
                    rid, image, caption, args.mode, {"source": "imagefolder", "image": rel}
                ):
                    sink.add(sample)
    return sink.manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m data_recipes.imagefolder ROOT --captions FILE --out DIR``."""
    return recipe_main("imagefolder", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
