"""The one sample schema shared by every task, every recipe and the data module.

A sample is a chat plus the images its markers refer to::

    Sample(id="coco-000123", task="understanding",
           messages=[{"role": "user", "content": "<image>\\nWhat is on the table?"},
                     {"role": "assistant", "content": "A cup of coffee."}],
           images=[<encoded image bytes>])

In ``content``, a bare ``<image>`` marks an input (understanding / editing source) image and
``<image_gen>`` the image to generate; ``images`` holds one encoded file per marker, in reading
order over the messages. The tasks:

============== ========================================================= ==========================
task           markers                                                   images
============== ========================================================= ==========================
understanding  one or more ``<image>`` (user turns), no ``<image_gen>``    the input images
generation     one ``<image_gen>`` (assistant turn), no ``<image>``        the target image
text           none                                                      none
edit           ``<image>`` (user) ..., then one ``<image_gen>`` (assistant) sources first, target last
============== ========================================================= ==========================

On disk (WebDataset tar), one sample is the members ``{key}.json`` (the record below) and
``{key}.img0.{ext}``, ``{key}.img1.{ext}``, ... (the image bytes, extension = real format)::

    {"id": ..., "task": ..., "messages": [...], "images": ["img0.jpg", ...], "meta": {...}}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TASKS = ("understanding", "generation", "text", "edit")
ROLES = ("system", "user", "assistant")
IMAGE, IMAGE_GEN = "<image>", "<image_gen>"
_MARKER = re.compile(r"<image>|<image_gen>")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short counter name (``"corrupt_image"``, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Sample:
    """One training sample of any task (see the module docstring)."""

    id: str
    task: str
    messages: list[dict[str, str]]
    images: list[bytes] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def markers(self) -> list[tuple[str, str]]:
        """(role, marker) of every image marker, in reading order."""
        return [(m["role"], mk) for m in self.messages for mk in _MARKER.findall(m["content"])]


def validate(sample: Sample) -> None:
    """Raise :class:`SampleError` naming the reason unless ``sample`` follows the schema."""
    if sample.task not in TASKS:
        raise SampleError("unknown_task", f"task {sample.task!r}; valid tasks are {list(TASKS)}")
    if not sample.messages:
        raise SampleError("empty_text", "no messages")
    for m in sample.messages:
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise SampleError("bad_message", f"message {m!r} must be {{'role', 'content'}}")
        if m["role"] not in ROLES:
            raise SampleError("bad_message", f"role {m['role']!r}; valid roles are {list(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise SampleError("empty_text", f"empty {m['role']} message")
    if not any(m["role"] == "assistant" for m in sample.messages):
        raise SampleError("bad_layout", "no assistant turn: nothing to learn")
    markers = sample.markers()
    if len(markers) != len(sample.images):
        raise SampleError("marker_mismatch", f"{len(markers)} image markers but {len(sample.images)} images")
    und = [r for r, mk in markers if mk == IMAGE]
    gen = [r for r, mk in markers if mk == IMAGE_GEN]
    expected = {
        "understanding": len(und) >= 1 and not gen,
        "generation": not und and len(gen) == 1,
        "text": not markers,
        "edit": len(und) >= 1 and len(gen) == 1 and markers[-1][1] == IMAGE_GEN,
    }[sample.task]
    if not expected:
        raise SampleError("bad_layout", f"task {sample.task!r} with markers {[mk for _, mk in markers]}")
    if any(r != "assistant" for r in gen):
        raise SampleError("bad_layout", "<image_gen> must be in an assistant turn")
    if sample.task in ("generation", "edit") and not any(
        _MARKER.sub("", m["content"]).strip() for m in sample.messages if m["role"] == "user"
    ):
        raise SampleError("empty_text", "empty prompt")


def wds_key(sample_id: str) -> str:
    """A WebDataset-safe key (no dots or slashes: the key is the member name up to its first dot)."""
    return _KEY_UNSAFE.sub("_", sample_id) or "_"


def to_record(sample: Sample, extensions: list[str]) -> dict[str, Any]:
    """The JSON record stored as ``{key}.json``; ``extensions`` are the images' real formats."""
    return {
        "id": sample.id,
        "task": sample.task,
        "messages": sample.messages,
        "images": [f"img{i}.{ext}" for i, ext in enumerate(extensions)],
        "meta": sample.meta,
    }


def from_raw(raw: dict[str, Any]) -> Sample:
    """A :class:`Sample` from a raw WebDataset sample (member suffix -> bytes); raises SampleError."""
    key = raw.get("__key__", "?")
    if "json" not in raw:
        raise SampleError("missing_key", f"sample {key} has no .json member (has {sorted(k for k in raw)})")
    try:
        record = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError("bad_json", f"sample {key}: {err}") from None
    if not isinstance(record, dict):
        raise SampleError("bad_json", f"sample {key}: record is {type(record).__name__}, not an object")
    for name in ("id", "task", "messages"):
        if name not in record:
            raise SampleError("missing_key", f"sample {key}: record has no {name!r}")
    images = []
    for name in record.get("images", []):
        if name not in raw:
            raise SampleError("missing_image", f"sample {key}: no member {name!r}")
        images.append(raw[name])
    if not isinstance(record["messages"], list):
        raise SampleError("bad_json", f"sample {key}: messages must be a list")
    sample = Sample(str(record["id"]), record["task"], record["messages"], images, record.get("meta", {}))
    validate(sample)
    return sample
