"""Write small schema shards for the data tests (independent of the recipes under test elsewhere)."""

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from cheers_pl.data.schema import Sample, to_record, wds_key


def png(seed: int, size=(20, 12), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def sample(task: str, i: int) -> Sample:
    sid = f"{task}-{i:04d}"
    if task == "understanding":
        msgs = [
            {"role": "user", "content": "<image>\nWhat is this?"},
            {"role": "assistant", "content": f"thing {i}"},
        ]
        return Sample(sid, task, msgs, [png(i)])
    if task == "generation":
        msgs = [
            {"role": "user", "content": f"a picture number {i}"},
            {"role": "assistant", "content": "<image_gen>"},
        ]
        return Sample(sid, task, msgs, [png(1000 + i, (12, 20))])
    msgs = [{"role": "user", "content": f"count to {i}"}, {"role": "assistant", "content": "one two"}]
    return Sample(sid, "text", msgs)


def raw_members(s: Sample) -> dict:
    rec = to_record(s, ["png"] * len(s.images))
    out = {"__key__": wds_key(s.id), "json": json.dumps(rec).encode()}
    for name, data in zip(rec["images"], s.images, strict=True):
        out[name] = data
    return out


def write_shards(folder: Path, task: str, n: int, per_shard: int, start: int = 0) -> list[str]:
    """``n`` samples of ``task`` in shards of ``per_shard``; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, first in enumerate(range(0, n, per_shard)):
        path = folder / f"{task}-{k:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(first, min(n, first + per_shard)):
                w.write(raw_members(sample(task, start + i)))
        paths.append(str(path))
    return paths


def write_raw(path: Path, members: list[dict]) -> str:
    """A shard of raw member dicts (for bad-input cases)."""
    with wds.TarWriter(str(path)) as w:
        for m in members:
            w.write(m)
    return str(path)


def write_sink(folder: Path, samples: list[Sample], maxcount: int = 1000) -> list[str]:
    """``samples`` written by the recipes' own writer (``ShardSink``, fixed mtime: no pax headers)."""
    from data_recipes.writer import ShardSink

    with ShardSink(folder, maxcount=maxcount, mtime=0, overwrite=True) as sink:
        for s in samples:
            assert sink.add(s), s.id
    return [str(folder / e["file"]) for e in sink.manifest["shards"]]


def sample_spans(path: str) -> tuple[list[tuple[str, int, int]], int]:
    """([(key, first byte, end of last member's padded data)] per sample, offset of the end marker)."""
    import tarfile

    spans: list[tuple[str, int, int]] = []
    end = 0
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key = m.name.split("/")[-1].split(".")[0]
            end = m.offset_data + -(-m.size // 512) * 512
            if spans and spans[-1][0] == key:
                spans[-1] = (key, spans[-1][1], end)
            else:
                spans.append((key, m.offset, end))
    return spans, end
