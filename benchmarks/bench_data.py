"""Data loading throughput: the DataModule's samples/s beside the raw decode-and-resize rate.

    python benchmarks/bench_data.py [--shards DIR] [--image-size 256] [--batches 40] [--workers 0 2]

Both rates are measured in one run over the same shards (the bundled demo set by default, built
into a temporary folder): "raw" decodes and resizes every image of the shards in this process,
with no tokenisation, batching or mixing; "loader" is ``CheersDataModule`` end to end (shard
reading, shuffling, decoding, preprocessing, tokenisation, collation) with N workers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from cheers_pl.cli_help import HelpFormatter
from cheers_pl.data.datamodule import CheersDataModule
from cheers_pl.data.images import decode_image, resize_crop, resize_pad, to_tensor
from cheers_pl.data.schema import IMAGE, from_raw
from cheers_pl.data.shards import expand_shards, read_shard

TASKS = ("understanding", "generation", "text")


def raw_rate(shards: list[str], size: int) -> tuple[float, float]:
    """(samples/s, images/s) for reading + decoding + resizing every image, single process."""
    n_samples = n_images = 0
    start = time.perf_counter()
    for url in shards:
        for raw in read_shard(url):
            sample = from_raw(raw)
            for (_, marker), data in zip(sample.markers(), sample.images, strict=True):
                img, _ = decode_image(data)
                to_tensor((resize_pad if marker == IMAGE else resize_crop)(img, size))
                n_images += 1
            n_samples += 1
    seconds = time.perf_counter() - start
    return n_samples / seconds, n_images / seconds


def loader_rate(root: Path, size: int, workers: int, batches: int, batch_size: int) -> tuple[float, float]:
    """(samples/s, images/s) through CheersDataModule after one warm-up batch."""
    from cheers_pl.components.processor import CheersProcessor
    from cheers_pl.registry import build

    tasks = {t: {"shards": [str(root / t)], "ratio": r} for t, r in zip(TASKS, (3, 6, 1), strict=True)}
    dm = CheersDataModule(tasks, batch_size=batch_size, num_workers=workers, shuffle_buffer=100)
    dm.attach(CheersProcessor(build("tokenizer", "tiny"), tokens_per_image=(size // 32) ** 2), size).setup()
    it = iter(dm.train_dataloader())
    next(it)
    n_images, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        n_images += 0 if "images" not in batch else batch["images"].shape[0]
    seconds = time.perf_counter() - start
    return batches * batch_size / seconds, n_images / seconds


def progress(k: int, n: int, what: str, start: float) -> None:
    """``row k/n`` on stderr as each measurement starts (stdout is the table, printed at the end)."""
    print(
        f"bench-data: row {k}/{n} ({time.perf_counter() - start:.0f} s so far): {what}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--shards", help="a folder with understanding/, generation/, text/ (default: build the demo)"
    )
    parser.add_argument("--image-size", type=int, default=256, help="images are resized to this side")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader row")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="one loader row per worker count"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    n = 1 + len(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards) if args.shards else Path(tmp)
        if not args.shards:
            from data_recipes.demo import main as demo

            print(f"bench-data: building the demo shards in {tmp}", file=sys.stderr, flush=True)
            if demo(["--out", tmp]) != 0:
                print(
                    "bench-data: error: building the demo shards failed (above); nothing measured",
                    file=sys.stderr,
                )
                return 1
        shards = [s for t in TASKS for s in expand_shards([str(root / t)])]
        progress(1, n, "raw decode + resize, 1 process", start)
        rows = [("raw decode + resize (1 process)", "-", *raw_rate(shards, args.image_size))]
        for k, w in enumerate(args.workers, 2):
            progress(
                k, n, f"CheersDataModule, {w} workers ({args.batches} batches of {args.batch_size})", start
            )
            rows.append(
                (
                    "CheersDataModule",
                    str(w),
                    *loader_rate(root, args.image_size, w, args.batches, args.batch_size),
                )
            )
    print(f"\nimage size {args.image_size}, batch {args.batch_size}, mixture 3:6:1\n")
    print(f"| {'measurement':34s} | workers | samples/s | images/s |")
    print(f"| {'-' * 34} | ------- | --------- | -------- |")
    for name, workers, sps, ips in rows:
        print(f"| {name:34s} | {workers:>7s} | {sps:9.1f} | {ips:8.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
