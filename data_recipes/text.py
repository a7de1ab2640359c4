"""Text-only chats (JSONL, or a JSON list) -> ``text`` samples.

Each record is either LLaVA-style ``{"id", "conversations": [{"from", "value"}, ...]}`` or
``{"id", "messages": [{"role", "content"}, ...]}`` (roles system / user / assistant; human and
gpt are accepted too). A record with image markers is skipped (``marker_mismatch``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cheers_pl.data.schema import Sample, SampleError
from data_recipes.common import add_output_arguments, iter_json_records, recipe_main, sink_from_args
from data_recipes.llava import record_id, to_messages


def to_sample(record: Any, sample_id: str, source: str) -> Sample:
    """One text record -> :class:`Sample` of task ``text``; raises SampleError."""
    if not isinstance(record, dict):
        raise SampleError("bad_record", f"record is {type(record).__name__}, not an object")
    if "messages" in record:
        messages = to_messages(record["messages"], speaker="role", text="content")
    elif "conversations" in record:
        messages = to_messages(record["conversations"])
    else:
        raise SampleError(
            "bad_record", f"record has neither 'messages' nor 'conversations' (keys {sorted(record)})"
        )
    return Sample(sample_id, "text", messages, [], {"source": source})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The text recipe's options."""
    parser.add_argument("input", help="JSONL (or JSON list) of text-only chats")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Convert ``args.input`` into shards under ``args.out``; the manifest."""
    path = Path(args.input)
    with sink_from_args(args, "text") as sink:
        for n, record in iter_json_records(path, sink):
            sample_id = record_id(record, path, n)
            try:
                sink.add(to_sample(record, sample_id, path.name))
            except SampleError as err:
                sink.skip_error(sample_id, err)
    return sink.manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m data_recipes.text INPUT --out DIR``."""
    return recipe_main("text", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
