"""Write :class:`~cheers_pl.data.schema.Sample` objects into WebDataset shards plus a manifest.

Every recipe ends here::

    with ShardSink("out/llava", recipe="llava") as sink:
        sink.add(sample)                      # validated, images decoded once; bad ones are skipped
        sink.skip("file.jsonl:17", "bad_json", "line 17: ...")   # records that never became a Sample
    manifest = sink.manifest                  # also written to out/llava/manifest.json

The folder then holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``manifest.json``; until the
manifest is written (atomically) the folder also holds ``incomplete.json``, so the rerun of a run
that was killed or failed replaces what it left instead of refusing it (no ``--overwrite`` needed)::

    {"recipe", "created", "prefix", "samples", "tasks": {task: n},
     "shards": [{"file", "samples", "tasks", "bytes", "sha256"}],
     "skipped": {reason: n}, "skipped_examples": [{"id", "reason", "message"}], "repaired": {what: n}}

Images are stored as their original bytes under the extension of their real format (a ``.jpg``
that is really a PNG becomes ``img0.png``); nothing is re-encoded.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from cheers_pl.data.schema import Sample, SampleError, from_raw, to_record, validate, wds_key

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
INCOMPLETE = "incomplete.json"  # written first, removed after the manifest: marks an unfinished run
MARKER_NOTE = "a recipe run is writing here or was interrupted; a rerun replaces these shards"
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_EXAMPLES = 50


def error_message(err: SampleError) -> str:
    """The message of a :class:`SampleError` without its ``"reason: "`` prefix."""
    return str(err).removeprefix(f"{err.reason}: ")


def read_image_file(root: str | os.PathLike, rel: str) -> bytes:
    """The bytes of ``root/rel``; ``SampleError("bad_path")`` if ``rel`` leaves ``root`` or cannot be a path.

    The path as written may not be absolute or climb above ``root`` with ``..``; nor may the
    file it names, once symbolic links are followed, lie outside ``root`` (links that stay inside
    ``root`` work). A NUL byte, a symbolic-link loop or a name too long for the file system is
    ``bad_path``; a missing file ``missing_image``; any other read error ``unreadable_image``.
    Nothing here raises anything but :class:`SampleError`, so one bad record never stops a recipe.
    """
    rel = str(rel).strip()
    norm = os.path.normpath(rel) if rel else ""
    if not rel or os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
        raise SampleError("bad_path", f"image path {rel!r} is empty or leaves the image root {root}")
    if "\x00" in rel:
        raise SampleError("bad_path", f"image path {rel!r} holds a NUL byte")
    path = Path(root) / norm
    try:
        real = path.resolve()
        outside = path.exists() and not real.is_relative_to(Path(root).resolve())
        data = None if outside else path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SampleError("missing_image", f"no image file {path}") from None
    except RuntimeError:  # Path.resolve() on a symbolic-link loop (Python < 3.13)
        raise SampleError("bad_path", f"image path {rel!r} is a symbolic-link loop") from None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            raise SampleError("bad_path", f"image path {rel!r}: {err.strerror}") from None
        raise SampleError("unreadable_image", f"cannot read {path}: {err}") from None
    except ValueError as err:  # e.g. a character the file system cannot name
        raise SampleError("bad_path", f"image path {rel!r}: {err}") from None
    if data is None:
        raise SampleError(
            "bad_path", f"image path {rel!r} is a link to {real}, outside the image root {root}"
        )
    return data


def check_encoding(sample: Sample) -> None:
    """``SampleError("bad_encoding")`` if the id or a message holds text UTF-8 cannot encode.

    Such text (lone surrogates) comes from undecodable bytes in a file name or a ``"\\udc80"``
    escape in JSON; the tokenizer could not read it back.
    """
    for where, text in [("id", str(sample.id))] + [(m["role"], m["content"]) for m in sample.messages]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise SampleError(
                "bad_encoding", f"the {where} text is not valid UTF-8 ({err.reason} at character {err.start})"
            ) from None


def check_image(data: bytes) -> str:
    """Decode ``data`` fully (and to RGB) and return the extension of its real format."""
    from cheers_pl.data.images import image_extension, open_image, to_rgb  # imports torch: not at start-up

    try:
        img = open_image(data)
    except Image.DecompressionBombError as err:
        raise SampleError("image_too_large", str(err)) from None
    try:
        to_rgb(img)
    except (OSError, ValueError) as err:
        raise SampleError("corrupt_image", f"cannot convert {img.mode} image to RGB: {err}") from None
    return image_extension(img)


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a plain file-name stem (letters, digits, ``.``, ``_``, ``-``); else ``ValueError``.

    A prefix with a path separator (``../x``, ``a/b``) would write shards outside the output folder.
    """
    if not PREFIX_RE.fullmatch(prefix or ""):
        raise ValueError(
            f"prefix {prefix!r} must be a plain file-name stem (letters, digits, '.', '_', '-', starting "
            "with a letter or digit; no path separator); put the folder in --out instead"
        )
    return prefix


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` if it is, or can be created as, a writable folder; else ``ValueError`` saying why."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; name a folder (it is created if missing)")
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"output folder {out} cannot be created: {existing} is a file")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == out else f"cannot be created: {existing} is"
        raise ValueError(f"output folder {out} {what} not writable; name a writable folder")
    return out


def interrupted_prefix(out_dir: Path) -> str | None:
    """The prefix of a run that started writing in ``out_dir`` and never wrote its manifest, or None."""
    try:
        return str(json.loads((out_dir / INCOMPLETE).read_text()).get("prefix") or "shard")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "shard"


def old_outputs(out_dir: Path, prefix: str) -> list[Path]:
    """The files a previous run left in ``out_dir``: ``{prefix}-*.tar``, ``manifest.json`` and the
    ``incomplete.json`` marker of an interrupted run (with that run's own shards)."""
    found = set(out_dir.glob(f"{prefix}-*.tar"))
    interrupted = interrupted_prefix(out_dir)
    if interrupted is not None:
        found |= set(out_dir.glob(f"{glob.escape(interrupted)}-*.tar")) | {out_dir / INCOMPLETE}
    return sorted(found) + ([out_dir / MANIFEST] if (out_dir / MANIFEST).exists() else [])


def prepare_out_dir(out_dir: str | os.PathLike, prefix: str, overwrite: bool, recipe: str = "custom") -> Path:
    """Create ``out_dir`` and mark it ``incomplete.json`` until :func:`finish_out_dir`.

    Old outputs are refused (``FileExistsError``) unless ``overwrite``, or unless they are what an
    interrupted run left (the marker is there: a killed or failed run never wrote its manifest),
    which a rerun replaces. ``ValueError`` for a bad ``prefix`` or an unwritable ``out_dir``.
    """
    out = check_out_dir(out_dir)
    check_prefix(prefix)
    old = old_outputs(out, prefix) if out.is_dir() else []
    interrupted = interrupted_prefix(out) is not None if out.is_dir() else False
    if old and not overwrite and not interrupted:
        names = ", ".join(p.name for p in old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
        raise FileExistsError(
            f"{out} already holds {names}; pass overwrite=True (--overwrite) to replace them"
        )
    if old and interrupted and not overwrite:
        log.warning("%s: replacing the %d file(s) an interrupted run left", out, len(old))
    for path in old:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker = {"recipe": recipe, "prefix": prefix, "pid": os.getpid(), "started": _now(), "note": MARKER_NOTE}
    write_atomic(out / INCOMPLETE, json.dumps(marker, indent=2) + "\n")
    return out


def finish_out_dir(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically, then remove the ``incomplete.json`` marker."""
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out_dir / INCOMPLETE).unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardSink:
    """Context manager that validates samples and writes them to ``{prefix}-%06d.tar`` shards.

    ``mtime`` fixes the tar members' modification time (``None``: now); with a fixed value the
    same samples give byte-identical shards.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        maxcount: int = 1000,
        maxsize: int = 1 << 30,
        overwrite: bool = False,
        recipe: str = "custom",
        mtime: float | None = None,
    ):
        self.out_dir, self.prefix, self.recipe = Path(out_dir), prefix, recipe
        self.maxcount, self.maxsize, self.overwrite, self.mtime = maxcount, maxsize, overwrite, mtime
        self.tasks: Counter[str] = Counter()
        self.shard_tasks: dict[str, Counter[str]] = {}
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []
        self.manifest: dict[str, Any] | None = None
        self._keys: set[str] = set()
        self._writer = None

    def __enter__(self) -> ShardSink:
        prepare_out_dir(self.out_dir, self.prefix, self.overwrite, self.recipe)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None:
            self._writer.close()
        if exc_type is None:
            self.manifest = self._build_manifest()
            finish_out_dir(self.out_dir, self.manifest)

    @property
    def count(self) -> int:
        """Samples written so far."""
        return sum(self.tasks.values())

    def add(self, sample: Sample) -> bool:
        """Validate and write ``sample``; a bad one is skipped and counted. True if written."""
        try:
            validate(sample)
            check_encoding(sample)
            images = [bytes(data) for data in sample.images]
            extensions = [check_image(data) for data in images]
        except SampleError as err:
            self.skip(sample.id, err.reason, error_message(err))
            return False
        record = to_record(sample, extensions)
        obj = {"__key__": self._unique_key(wds_key(sample.id)), "json": json.dumps(record).encode()}
        obj.update(zip(record["images"], images, strict=True))
        writer = self._open_writer()
        writer.write(obj)
        self.tasks[sample.task] += 1
        self.shard_tasks.setdefault(Path(writer.fname).name, Counter())[sample.task] += 1
        return True

    def skip(self, sample_id: str, reason: str, message: str) -> None:
        """Count a record that was not written; the first 50 are kept for the manifest and logged."""
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"id": str(sample_id), "reason": reason, "message": message})
            log.warning("skipped %s (%s): %s", sample_id, reason, message)

    def skip_error(self, sample_id: str, err: SampleError) -> None:
        """:meth:`skip` with the reason and message of a :class:`SampleError`."""
        self.skip(sample_id, err.reason, error_message(err))

    def _unique_key(self, key: str) -> str:
        if key in self._keys:
            n = 1
            while f"{key}_dup{n}" in self._keys:
                n += 1
            key = f"{key}_dup{n}"
            self.repaired["renamed_duplicate_key"] += 1
        self._keys.add(key)
        return key

    def _open_writer(self):
        if self._writer is None:
            import webdataset as wds  # slow to import: only when something is written

            pattern = str(self.out_dir / f"{self.prefix}-%06d.tar")
            self._writer = wds.ShardWriter(
                pattern,
                maxcount=self.maxcount,
                maxsize=self.maxsize,
                verbose=0,
                encoder=False,
                mtime=self.mtime,
            )
        return self._writer

    def _build_manifest(self) -> dict[str, Any]:
        shards = []
        for name, tasks in sorted(self.shard_tasks.items()):
            path = self.out_dir / name
            shards.append(
                {
                    "file": name,
                    "samples": sum(tasks.values()),
                    "tasks": dict(sorted(tasks.items())),
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
            )
        return {
            "recipe": self.recipe,
            "created": _now(),
            "prefix": self.prefix,
            "samples": self.count,
            "tasks": dict(sorted(self.tasks.items())),
            "shards": shards,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": self.examples,
            "repaired": dict(sorted(self.repaired.items())),
        }


def read_shard(path: Path) -> list[dict[str, bytes]]:
    """The raw samples of one tar (member suffix -> bytes, plus ``__key__``), in order."""
    samples: list[dict[str, Any]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][suffix] = tar.extractfile(member).read()
    return samples


def _verify_shard(out: Path, entry: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """What one shard really holds; differences from its manifest ``entry`` go to ``errors``."""
    name, tasks = entry["file"], Counter()
    for raw in read_shard(out / name):
        try:
            tasks[from_raw(raw).task] += 1
        except SampleError as err:
            errors.append(f"{name}: {err}")
    found = {"file": name, "samples": sum(tasks.values()), "tasks": dict(sorted(tasks.items()))}
    found.update(bytes=(out / name).stat().st_size, sha256=sha256_file(out / name))
    errors += [
        f"{name}: {k} is {v!r}, manifest says {entry.get(k)!r}" for k, v in found.items() if v != entry.get(k)
    ]
    return found


def verify_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Re-read every shard a manifest lists and compare checksums, sizes and counts.

    Returns ``{"ok", "errors": [str], "samples", "tasks", "shards": [{"file", "samples", "tasks",
    "bytes", "sha256"}]}`` with what was found on disk. Every sample must pass ``from_raw``, and
    no ``{prefix}-*.tar`` may lie in the folder without being listed.
    """
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    listed = [entry["file"] for entry in manifest["shards"]]
    unlisted = {p.name for p in out.glob(f"{manifest['prefix']}-*.tar")} - set(listed)
    errors = [f"{name} is not in the manifest" for name in sorted(unlisted)]
    errors += [f"{name} is missing" for name in listed if not (out / name).is_file()]
    shards = [_verify_shard(out, e, errors) for e in manifest["shards"] if (out / e["file"]).is_file()]
    tasks: Counter[str] = Counter()
    for shard in shards:
        tasks.update(shard["tasks"])
    if dict(sorted(tasks.items())) != manifest["tasks"] or sum(tasks.values()) != manifest["samples"]:
        errors.append(f"shards hold {dict(sorted(tasks.items()))}, manifest says {manifest['tasks']}")
    return {
        "ok": not errors,
        "errors": errors,
        "samples": sum(tasks.values()),
        "tasks": dict(tasks),
        "shards": shards,
    }
