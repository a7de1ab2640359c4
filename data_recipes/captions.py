"""Image-caption pairs (JSONL, CSV or parquet) -> captioning and/or text-to-image samples.

``--mode caption``: an understanding sample (user: ``<image>`` and a captioning question picked by
a hash of the id; assistant: the caption). ``--mode t2i``: a generation sample (user: the
caption; assistant: ``<image_gen>``). ``--mode both`` writes both, with ids ``{id}-cap`` and
``{id}-t2i``. The image column holds paths relative to ``--image-root`` (default: the table's
folder); in parquet it may also hold the image bytes (or ``{"bytes": ...}`` structs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cheers_pl.data.schema import IMAGE, IMAGE_GEN, Sample, SampleError
from data_recipes.common import (
    MODES,
    add_output_arguments,
    caption_question,
    iter_rows,
    recipe_main,
    sink_from_args,
)
from data_recipes.writer import ShardSink, read_image_file


def pair_samples(sample_id: str, image: bytes, caption: str, mode: str, meta: dict[str, Any]) -> list[Sample]:
    """The samples ``mode`` makes of one image-caption pair (see the module docstring)."""
    caption_sample = Sample(
        sample_id if mode == "caption" else f"{sample_id}-cap",
        "understanding",
        [
            {"role": "user", "content": f"{IMAGE}\n{caption_question(sample_id)}"},
            {"role": "assistant", "content": caption},
        ],
        [image],
        meta,
    )
    t2i_sample = Sample(
        sample_id if mode == "t2i" else f"{sample_id}-t2i",
        "generation",
        [{"role": "user", "content": caption}, {"role": "assistant", "content": IMAGE_GEN}],
        [image],
        meta,
    )
    return {"caption": [caption_sample], "t2i": [t2i_sample], "both": [caption_sample, t2i_sample]}[mode]


def clean_caption(value: Any) -> str:
    """The caption stripped of surrounding blanks; ``SampleError("empty_text")`` if there is none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SampleError("empty_text", "empty or missing caption")
    if not isinstance(value, str):
        raise SampleError("bad_record", f"caption must be text, not {type(value).__name__}")
    return value.strip()


def cell_image(value: Any, root: Path) -> tuple[bytes, str | None]:
    """(image bytes, path or None) from a table cell: a path, bytes or a ``{"bytes", "path"}`` struct."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str) and value.strip():
        return read_image_file(root, value), value
    raise SampleError("missing_image", "no image path or bytes in the row")


def add_pairs(sink: ShardSink, rows: Any, args: argparse.Namespace, root: Path, stem: str) -> None:
    """Write the samples of every ``(n, row)`` in ``rows``; bad rows are counted on ``sink``."""
    for n, row in rows:
        sample_id = str(row.get(args.id_column) or "") if args.id_column else ""
        sample_id = sample_id or f"{stem}-{n:07d}"
        try:
            caption = clean_caption(row.get(args.caption_column))
            image, path = cell_image(row.get(args.image_column), root)
        except SampleError as err:
            sink.skip_error(sample_id, err)
            continue
        meta = {"source": stem, "image": path} if path else {"source": stem}
        for sample in pair_samples(sample_id, image, caption, args.mode, meta):
            sink.add(sample)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The captions recipe's options."""
    parser.add_argument("input", help="table of pairs: .jsonl/.json, .csv/.tsv or .parquet")
    parser.add_argument("--image-column", default="image", help="column with the image path (or bytes)")
    parser.add_argument("--caption-column", default="caption", help="column with the caption")
    parser.add_argument("--id-column", default=None, help="column with a sample id (default: row number)")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    parser.add_argument("--mode", choices=MODES, default="both", help="captioning, text-to-image or both")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Convert the table ``args.input`` into shards under ``args.out``; the manifest."""
    path = Path(args.input)
    root = Path(args.image_root) if args.image_root else path.parent
    columns = [c for c in (args.image_column, args.caption_column, args.id_column) if c]
    with sink_from_args(args, "captions") as sink:
        add_pairs(sink, iter_rows(path, sink, columns), args, root, path.stem)
    return sink.manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m data_recipes.captions INPUT --out DIR``."""
    return recipe_main("captions", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
