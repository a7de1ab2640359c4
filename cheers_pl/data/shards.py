"""Shard lists and raw shard reading on top of WebDataset's URL opener and Python's tar reader.

A shard spec is a local path, a folder (all its ``*.tar``), a glob, a brace pattern
(``data/gen-{000000..000099}.tar``) or any URL ``webdataset.gopen`` opens (``http://``,
``pipe:``, ...). Reading yields raw samples, dicts of member suffix -> bytes plus ``__key__``,
``__url__`` and ``__index__`` (the sample's position in its shard, used to resume).

A shard that cannot be read to its end raises a :class:`ShardError` whose ``kind`` says why:

* ``missing_shard`` (:class:`MissingShardError`): the file is gone (it was listed, then deleted);
* ``truncated_shard``: the data ends before the tar's end-of-archive marker (a cut file, a copy
  that stopped, a file shorter than one tar header);
* ``shard_error``: anything else: not a tar, a damaged member header, bytes after the
  end-of-archive marker (junk, or two tars concatenated: the second would be silently lost).

Every sample read before the break is still yielded, including the one the break cut short
(its missing members then fail schema validation and are counted there).

A key seen earlier in the same shard (members of one sample split apart, or a shard that holds
a sample twice) would train that sample twice: such a repeat keeps its ``__index__`` but is not
yielded as a sample; with ``mark_duplicates`` it is yielded as ``{"__duplicate__": True, ...}``
so the caller can count it. Python's tar reader
stops silently at a damaged header in mid-archive; this reader raises instead, so the samples
lost behind it are never lost without a count.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen

log = logging.getLogger(__name__)
_GLOB = set("*?[")
_TAIL_CHECKED = 1 << 20  # bytes after the end-of-archive marker checked for data (normally <10 KiB of zeros)
_TRUNCATED_MESSAGES = ("unexpected end of data", "truncated header", "empty file", "empty header")


class ShardError(OSError):
    """A shard could not be opened or broke off while being read; ``kind`` is its counter name."""

    kind = "shard_error"

    def __init__(self, url: str, samples_read: int, cause: BaseException, kind: str | None = None):
        if kind is not None:
            self.kind = kind
        what = "no such file" if isinstance(cause, FileNotFoundError) else f"{type(cause).__name__}: {cause}"
        self.detail = f"{what} (after {samples_read} samples)"  # the message without the URL
        super().__init__(f"shard {url}: {self.detail}")
        self.url, self.samples_read = url, samples_read


class MissingShardError(ShardError):
    """A listed shard file no longer exists."""

    kind = "missing_shard"


class _BrokenArchive(tarfile.TarError):
    """Raised by :func:`_members` for damage that ``tarfile`` itself would pass over in silence."""


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def resolve_shards(specs: list[str] | str) -> tuple[list[str], list[str]]:
    """(shard URLs/paths in order, one message per spec item that matches nothing).

    Brace patterns are expanded first, so each missing file of ``a-{0..9}.tar`` has its message.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    problems: list[str] = []
    for spec in specs:
        for item in braceexpand.braceexpand(str(spec)):
            if _is_url(item):
                out.append(item)
            elif os.path.isdir(item):
                found = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not found:
                    problems.append(f"shard folder {item} holds no .tar files")
                out.extend(found)
            elif _GLOB & set(item):
                found = sorted(glob.glob(item))
                if not found:
                    problems.append(f"shard pattern {item} matches no file")
                out.extend(found)
            elif not os.path.exists(item):
                problems.append(f"shard {item} does not exist")
            else:
                out.append(item)
    return out, problems


def expand_shards(specs: list[str] | str) -> list[str]:
    """Expand shard specs into a list of shard URLs/paths, in order; a spec matching nothing raises."""
    out, problems = resolve_shards(specs)
    if problems:
        raise FileNotFoundError(problems[0])
    return out


def _kind(err: BaseException) -> str:
    if isinstance(err, (EOFError, tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        return "truncated_shard"
    text = str(err)
    return "truncated_shard" if any(m in text for m in _TRUNCATED_MESSAGES) else "shard_error"


def _members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in the tar ``stream``, read strictly to its end.

    The same walk as ``TarFile.next`` in stream mode, but a damaged or missing header after the
    first one raises, as does data after the end-of-archive marker.
    """
    with tarfile.open(fileobj=stream, mode="r|*") as tar:  # reads the first header; raises if bad
        info, tar.firstmember = tar.firstmember, None
        while info is not None:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            if tar.offset != tar.fileobj.tell():  # skip what was not read (non-files, padding)
                tar.fileobj.seek(tar.offset - 1)
                if not tar.fileobj.read(1):
                    raise tarfile.ReadError("unexpected end of data")
            try:
                info = tar.tarinfo.fromtarfile(tar)
            except tarfile.EOFHeaderError:
                info = None
            except tarfile.HeaderError as err:
                if isinstance(err, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)) or (
                    isinstance(err, tarfile.SubsequentHeaderError) and _kind(err) == "truncated_shard"
                ):  # the data ends inside or right before a header (the one after a pax header included)
                    raise tarfile.TruncatedHeaderError(
                        f"no end-of-archive marker: {err} at byte {tar.offset}"
                    ) from None
                raise _BrokenArchive(f"damaged member header at byte {tar.offset}: {err}") from None
        checked = 0
        while checked < _TAIL_CHECKED:
            block = tar.fileobj.read(1 << 16)
            if not block:
                break
            if block.count(0) != len(block):
                raise _BrokenArchive(
                    f"data after the end-of-archive marker (near byte {tar.offset + checked})"
                )
            checked += len(block)


def _split(name: str) -> tuple[str, str] | None:
    """(key, lower-case suffix) as WebDataset splits member names: the key ends at the first dot."""
    folder, _, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    if not dot or not key or not suffix or suffix.startswith("__"):
        return None
    return (f"{folder}/{key}" if folder else key), suffix.lower()


def _close(url: str, stream) -> None:
    try:
        stream.close()
    except Exception as err:  # noqa: BLE001 - a failing close (a pipe's exit status) must not mask the read
        log.warning("shard %s: closing failed: %s: %s", url, type(err).__name__, err)


def read_shard(url: str, start: int = 0, mark_duplicates: bool = False) -> Iterator[dict]:
    """Raw samples of one shard from sample index ``start`` on; raises :class:`ShardError`.

    Samples before ``start`` are skipped without being decoded (only their bytes are read). A
    sample is the run of consecutive members sharing a key (a repeated suffix starts a new one).
    A sample whose key an earlier sample of this shard had is dropped with a warning, or, with
    ``mark_duplicates``, yielded as ``{"__key__", "__url__", "__index__", "__duplicate__": True}``
    (no members). When the shard breaks off, the samples before the break, the last one
    included, are yielded first; the error then says how many samples were read.
    """
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError as err:
        raise MissingShardError(url, 0, err) from err
    except Exception as err:  # noqa: BLE001 - any opener failure is a shard error
        raise ShardError(url, 0, err) from err
    index, current, failure = 0, None, None
    seen: set[str] = set()

    def finished(sample: dict, index: int) -> dict | None:
        """``sample`` as yielded (None: not at all), remembering its key."""
        key = sample["__key__"]
        repeated = key in seen
        seen.add(key)
        if index < start:
            return None
        if not repeated:
            return {**sample, "__index__": index}
        if mark_duplicates:
            return {"__key__": key, "__url__": url, "__index__": index, "__duplicate__": True}
        log.warning("shard %s: sample %d repeats the key %r of an earlier sample: skipped", url, index, key)
        return None

    try:
        try:
            for name, data in _members(stream):
                split = _split(name)
                if split is None:
                    continue
                key, suffix = split
                if current is not None and (key != current["__key__"] or suffix in current):
                    if (out := finished(current, index)) is not None:
                        yield out
                    index, current = index + 1, None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[suffix] = data
        except Exception as err:  # noqa: BLE001 - whatever the bytes make the tar reader raise
            failure = err
        if current is not None:
            if (out := finished(current, index)) is not None:
                yield out
            index += 1
        if failure is not None:
            if isinstance(failure, FileNotFoundError):
                raise MissingShardError(url, index, failure) from failure
            raise ShardError(url, index, failure, _kind(failure)) from failure
    finally:
        _close(url, stream)
