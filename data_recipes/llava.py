"""LLaVA-style chat records (the authors' format) -> samples of any task.

The input is a JSON list file or JSONL (told by the content) of records::

    {"id": "...", "image": "a.jpg" | "a.jpg,b.jpg" | ["a.jpg", "b.jpg"] | absent,
     "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is this?"}, ...]}

Speakers: human -> user, gpt -> assistant. ``<image>`` in a human turn is an input image, in a
gpt turn the image to generate (written as ``<image_gen>``). ``image`` lists the files in marker
order, so an edit lists its source(s) first and the target last. The task follows the markers:
a target -> ``edit`` when there are inputs too, else ``generation``; no target -> ``understanding``
when there are inputs, else ``text``. Image paths are relative to ``--image-root`` (default: the
input file's folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cheers_pl.data.schema import IMAGE, IMAGE_GEN, Sample, SampleError
from data_recipes.common import add_output_arguments, iter_json_records, recipe_main, sink_from_args
from data_recipes.writer import read_image_file

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(turns: Any, speaker: str = "from", text: str = "value") -> list[dict[str, str]]:
    """LLaVA turns (``{"from", "value"}``) -> schema messages; ``<image>`` said by gpt -> ``<image_gen>``."""
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_record", "the conversation must be a non-empty list of turns")
    messages = []
    for turn in turns:
        if (
            not isinstance(turn, dict)
            or turn.get(speaker) not in ROLES
            or not isinstance(turn.get(text), str)
        ):
            raise SampleError(
                "bad_message", f"turn {turn!r} needs {speaker!r} in {sorted(ROLES)} and a text {text!r}"
            )
        role, content = ROLES[turn[speaker]], turn[text]
        if role == "assistant":
            content = content.replace(IMAGE, IMAGE_GEN)
        messages.append({"role": role, "content": content})
    return messages


def infer_task(messages: list[dict[str, str]]) -> str:
    """The task the image markers of ``messages`` imply (see the module docstring)."""
    inputs = sum(m["content"].count(IMAGE) for m in messages)
    targets = sum(m["content"].count(IMAGE_GEN) for m in messages)
    if targets:
        return "edit" if inputs else "generation"
    return "understanding" if inputs else "text"


def image_paths(value: Any) -> list[str]:
    """The ``image`` field as a list: absent, one path, ``"a.jpg,b.jpg"`` or a JSON list."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return value
    raise SampleError("bad_record", f"image must be a path, comma-separated paths or a list, not {value!r}")


def record_id(record: Any, path: Path, n: int) -> str:
    """The record's ``id``, or ``{file stem}-{line or position}`` when it has none."""
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        return str(record["id"])
    return f"{path.stem}-{n}"


def to_sample(record: Any, sample_id: str, image_root: Path, source: str) -> Sample:
    """One LLaVA record -> :class:`Sample` (images read from ``image_root``); raises SampleError."""
    if not isinstance(record, dict):
        raise SampleError("bad_record", f"record is {type(record).__name__}, not an object")
    messages = to_messages(record.get("conversations"))
    paths = image_paths(record.get("image"))
    markers = sum(m["content"].count(IMAGE) + m["content"].count(IMAGE_GEN) for m in messages)
    if markers != len(paths):
        raise SampleError("marker_mismatch", f"{markers} image markers but {len(paths)} images {paths}")
    images = [read_image_file(image_root, p) for p in paths]
    meta = {"source": source, "images": paths} if paths else {"source": source}
    return Sample(sample_id, infer_task(messages), messages, images, meta)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The llava recipe's options."""
    parser.add_argument("input", help="LLaVA-style JSON list or JSONL file")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Convert ``args.input`` into shards under ``args.out``; the manifest."""
    path = Path(args.input)
    root = Path(args.image_root) if args.image_root else path.parent
    with sink_from_args(args, "llava") as sink:
        for n, record in iter_json_records(path, sink):
            sample_id = record_id(record, path, n)
            try:
                sample = to_sample(record, sample_id, root, path.name)
            except SampleError as err:
                sink.skip_error(sample_id, err)
                continue
            sink.add(sample)
    return sink.manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m data_recipes.llava INPUT --out DIR``."""
    return recipe_main("llava", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
