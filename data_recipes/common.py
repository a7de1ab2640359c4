"""What every recipe shares: the output options, record readers, the summary and ``main``.

Readers never stop on one bad record: a JSON line that does not parse is counted on the sink as
``bad_json``, a line or CSV row with bytes that are not UTF-8 as ``bad_encoding`` (the line is
skipped, not decoded with replacement characters), each named ``file:line``, and reading goes on.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data_recipes.writer import MANIFEST, ShardSink, check_out_dir, check_prefix

CAPTION_QUESTIONS = (
    "Describe this image briefly.",
    "What is shown in this picture?",
    "Write a short caption for this image.",
    "What do you see in the image?",
    "Give a one-sentence description of this photo.",
    "Summarise the content of this image.",
)
MODES = ("caption", "t2i", "both")


def add_output_arguments(parser: argparse.ArgumentParser, maxcount: int = 1000) -> None:
    """The options every recipe has: --out, --prefix, --maxcount, --maxsize and --overwrite.

    ``maxcount`` is the default of ``--maxcount``.
    """
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out",
        required=True,
        type=_checked(check_out_dir, str),
        help="folder for the shards and manifest.json",
    )
    group.add_argument(
        "--prefix",
        default="shard",
        type=_checked(check_prefix),
        help="shard file names are PREFIX-000000.tar, ... (a plain name: no path separator)",
    )
    group.add_argument("--maxcount", type=positive_int, default=maxcount, help="samples per shard at most")
    group.add_argument(
        "--maxsize", type=positive_int, default=1 << 30, help="bytes per shard (about) at most"
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards of an earlier finished run (an interrupted run's are replaced anyway)",
    )


def _checked(
    check: Callable[[str], Any], convert: Callable[[Any], Any] = lambda v: v
) -> Callable[[str], Any]:
    """An argparse ``type`` that runs ``check`` and turns its ``ValueError`` into a parse error."""

    def parse(value: str) -> Any:
        try:
            return convert(check(value))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def positive_int(value: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return n


def sink_from_args(args: argparse.Namespace, recipe: str, out: Path | None = None, **kw: Any) -> ShardSink:
    """A :class:`ShardSink` configured by the output options (``out`` overrides ``--out``)."""
    return ShardSink(
        out or args.out, args.prefix, args.maxcount, args.maxsize, args.overwrite, recipe=recipe, **kw
    )


def caption_question(sample_id: str) -> str:
    """A captioning question picked by a hash of the id (the same id always gets the same one)."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return CAPTION_QUESTIONS[digest[0] % len(CAPTION_QUESTIONS)]


def iter_json_records(path: Path, sink: ShardSink) -> Iterator[tuple[int, Any]]:
    """(number, record) of a JSON list file (number = position) or a JSONL file (line number).

    The format is told by the content: a file whose first non-blank character is ``[`` is a JSON
    list. A JSONL line that does not parse is counted as ``bad_json``, one that is not UTF-8 as
    ``bad_encoding``; a JSON list that does not parse raises ``ValueError`` (nothing of it can be
    trusted), and its records with undecodable bytes are counted as ``bad_encoding``.
    """
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        for n, record in enumerate(records):
            if _has_undecodable(record):
                sink.skip(
                    f"{path.name}:{n}", "bad_encoding", f"{path.name} record {n}: bytes that are not UTF-8"
                )
            else:
                yield n, record
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                where = f"{path.name}:{lineno}"
                message = f"{where}: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8"
                sink.skip(where, "bad_encoding", message)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                sink.skip(f"{path.name}:{lineno}", "bad_json", f"{path.name} line {lineno}: {err}")
                continue
            yield lineno, record


def _has_undecodable(value: Any) -> bool:
    """True if a string anywhere in ``value`` holds a byte ``surrogateescape`` could not decode."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _check_columns(path: Path, have: list[str], need: list[str]) -> None:
    missing = [c for c in need if c not in have]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; its columns are {have}")


def iter_rows(path: Path, sink: ShardSink, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) of a JSONL/JSON, CSV/TSV or parquet table, told by the file extension.

    A CSV or parquet file without one of ``columns`` raises ``ValueError`` naming the columns it has.
    Parquet cells may hold image bytes (or ``{"bytes": ...}`` structs) instead of paths.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for n, record in iter_json_records(path, sink):
            if isinstance(record, dict):
                yield n, record
            else:
                sink.skip(
                    f"{path.name}:{n}", "bad_record", f"record {n} is {type(record).__name__}, not an object"
                )
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            _check_columns(path, list(reader.fieldnames or []), columns)
            for row in reader:
                if _has_undecodable(row):
                    where = f"{path.name}:{reader.line_num}"
                    sink.skip(where, "bad_encoding", f"{where}: a cell holds bytes that are not UTF-8")
                else:
                    yield reader.line_num, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        _check_columns(path, table.schema_arrow.names, columns)
        n = 0
        for batch in table.iter_batches(columns=columns, batch_size=1024):
            for row in batch.to_pylist():
                yield n, row
                n += 1
    else:
        raise ValueError(
            f"{path}: unknown table format {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet"
        )


def summary(manifest: dict[str, Any], out: str | Path) -> str:
    """A few lines: samples per task, shards, skipped per reason, where the manifest is."""
    tasks = ", ".join(f"{task} {n}" for task, n in manifest["tasks"].items()) or "nothing"
    lines = [f"wrote {manifest['samples']} samples ({tasks}) in {len(manifest['shards'])} shard(s)"]
    if manifest["skipped"]:
        lines.append("skipped: " + ", ".join(f"{reason} {n}" for reason, n in manifest["skipped"].items()))
    if manifest.get("repaired"):
        lines.append("repaired: " + ", ".join(f"{what} {n}" for what, n in manifest["repaired"].items()))
    lines.append(f"manifest: {Path(out) / MANIFEST}")
    return "\n".join(lines)


def run_and_print(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    """Run a recipe and print its summary; the exit status (0, or 1 after one line naming the error).

    Errors that stop a run (an unreadable input, a missing column, old outputs, a full disk) are
    one line on stderr, not a traceback; a rerun replaces what the stopped run left.
    """
    try:
        manifest = run(args)
    except (OSError, ValueError) as err:
        print(f"cheers data: error: {err}", file=sys.stderr)
        return 1
    print(summary(manifest, args.out))
    return 0


def recipe_main(
    name: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    argv: list[str] | None = None,
) -> int:
    """``main`` of a recipe module: parse ``argv`` with its ``add_arguments``, run it, print the summary."""
    description = (doc or "").split("\n\n")[0]
    from cheers_pl.cli_help import make_parser

    parser = make_parser(f"cheers data {name}", description)
    add_arguments(parser)
    return run_and_print(run, parser.parse_args(argv))
