"""Shard lists and raw shard reading on top of WebDataset's URL opener and tar iterator.

A shard spec is a local path, a folder (all its ``*.tar``), a glob, a brace pattern
(``data/gen-{000000..000099}.tar``) or any URL ``webdataset.gopen`` opens (``http://``,
``pipe:``, ...). Reading yields raw samples, dicts of member suffix -> bytes plus ``__key__``,
``__url__`` and ``__index__`` (the sample's position in its shard, used to resume).
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

_GLOB = set("*?[")


class ShardError(OSError):
    """A shard could not be opened or broke off while being read."""

    def __init__(self, url: str, samples_read: int, cause: BaseException):
        super().__init__(f"shard {url}: {type(cause).__name__}: {cause} (after {samples_read} samples)")
        self.url, self.samples_read = url, samples_read


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def expand_shards(specs: list[str] | str) -> list[str]:
    """Expand shard specs into a list of shard URLs/paths, in order; a spec matching nothing raises."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for spec in specs:
        for item in braceexpand.braceexpand(str(spec)):
            if _is_url(item):
                out.append(item)
            elif os.path.isdir(item):
                found = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"shard folder {item} holds no .tar files")
                out.extend(found)
            elif _GLOB & set(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"shard pattern {item} matches no file")
                out.extend(found)
            elif not os.path.exists(item):
                raise FileNotFoundError(f"shard {item} does not exist")
            else:
                out.append(item)
    return out


def read_shard(url: str, start: int = 0) -> Iterator[dict]:
    """Raw samples of one shard from sample index ``start`` on; raises :class:`ShardError`.

    Samples before ``start`` are skipped without being decoded (only their bytes are read).
    """
    index = 0
    try:
        stream = gopen(url, "rb")
    except Exception as err:  # noqa: BLE001 - any opener failure is a shard error
        raise ShardError(url, 0, err) from err
    try:
        members = ({**m, "__url__": url} for m in tar_file_iterator(stream))
        for raw in group_by_keys(members):
            if index >= start:
                yield {**raw, "__index__": index}
            index += 1
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise ShardError(url, index, err) from err
    finally:
        stream.close()
