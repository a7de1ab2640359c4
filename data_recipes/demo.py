"""The bundled demo set, made offline from real images that ship inside packages.

Photos: 17 of scikit-image's ``skimage.data`` images, stored as PNG with the shorter side
downscaled to 128 px (grayscale ones stay grayscale). Digits: scikit-learn's ``load_digits()``
(8x8, ink 0..16) scaled to 0..255 and upscaled to 64x64 (nearest neighbour), white on black; the
first ``--digits`` of the 1797. Numbers: the reading task (the spirit of the paper's Table 6),
64x64 images of 2-4 digit numbers rendered with Pillow's bundled font at random sizes, strokes and
positions, white on black (:mod:`data_recipes.numbers`). Written to folders, each with its own
shards and manifest:

- ``understanding/``: per photo a captioning question, a question about it and "is it in colour?";
  per digit "What digit is this?" and "Describe the image."; ``--reading`` numbers with
  "What number is written?" -> "It is the number 1234.";
- ``generation/``: per photo and per digit, its caption -> the image;
- ``text/``: ``--texts`` chats: arithmetic (some two-round, with a system prompt), digit and
  colour facts;
- ``heldout/``: generation samples of the ``--heldout`` digits after the training ones;
- ``heldout_understanding/``: "What digit is this?" on those held-out digits, and
  ``--heldout-reading`` numbers of their own random draw, never trained on (a number's value may
  also occur in training, drawn differently: reading must still read);
- ``judge/digits.npz``: the digit classifier that scores generated digits
  (:class:`cheers_pl.eval.judge.DigitJudge`), trained on the training digits only;

plus ``manifest.json`` over the three training folders, which also lists the held-out folders
and the judge with its accuracy on the held-out digits. The output is deterministic: the same
shards, byte for byte, on every run (tar members carry a fixed time), and the same judge.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cheers_pl.data.schema import IMAGE, IMAGE_GEN, Sample
from data_recipes import numbers
from data_recipes.common import add_output_arguments, caption_question, recipe_main, sink_from_args
from data_recipes.writer import MANIFEST, ShardSink, finish_out_dir, interrupted_prefix, prepare_out_dir

MTIME = 1735689600  # 2025-01-01T00:00:00Z, the time stamp of every tar member
TASK_FOLDERS = ("understanding", "generation", "text")
HELDOUT = "heldout"  # generation samples of digits not in the training folders (sweep's held-out FM loss)
HELDOUT_UND = "heldout_understanding"  # digit and reading questions on images never trained on
JUDGE = "judge/digits.npz"
DIGIT_QUESTION, READING_QUESTION = "What digit is this?", "What number is written?"
DIGIT_CAPTION = "a handwritten digit {label} in white on black"
JUDGE_SIZES = (8, 32, 48, 64)  # image sides the judge's held-out accuracy is measured at
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# skimage.data name -> (caption, (question, answer))
PHOTOS = {
    "astronaut": (
        "a portrait of an astronaut in an orange spacesuit next to an American flag",
        ("What is the person wearing?", "An orange spacesuit."),
    ),
    "coffee": (
        "a cup of coffee on a red saucer with a spoon, on a wooden table",
        ("What drink is in the cup?", "Coffee."),
    ),
    "chelsea": ("a photo of a tabby cat", ("What animal is this?", "It is a cat, a tabby.")),
    "rocket": (
        "a rocket on its launch pad at dusk between tall towers",
        ("What stands on the launch pad?", "A rocket."),
    ),
    "horse": (
        "a black silhouette of a horse on a white background",
        ("What animal is shown?", "A horse, as a black silhouette."),
    ),
    "camera": (
        "a black-and-white photo of a man filming with a camera on a tripod",
        ("What is the man doing?", "He is looking through a camera on a tripod."),
    ),
    "coins": (
        "old coins laid out in rows on a dark background",
        ("What objects are in the image?", "Old coins, arranged in rows."),
    ),
    "moon": (
        "a grayscale close-up of the cratered surface of the moon",
        ("What surface is this?", "The surface of the moon."),
    ),
    "text": (
        "handwritten mathematical formulas on a sheet of paper",
        ("What is written on the paper?", "Mathematical formulas, by hand."),
    ),
    "page": (
        "a scanned page of a text about region-based segmentation",
        ("What is the title of the page?", "Region-based segmentation."),
    ),
    "hubble_deep_field": (
        "a deep-field telescope image of many small galaxies on a black sky",
        ("What are the bright spots?", "Distant galaxies."),
    ),
    "immunohistochemistry": (
        "a microscope image of tissue stained brown and blue",
        ("What kind of image is this?", "A stained tissue sample under a microscope."),
    ),
    "colorwheel": (
        "a colour wheel with every hue around a white centre, on black",
        ("What colour is at the centre?", "White."),
    ),
    "retina": (
        "a photo of the retina at the back of a human eye, with its blood vessels",
        ("Which organ is shown?", "An eye: its retina."),
    ),
    "brick": ("a grayscale texture of a brick wall", ("What is the wall made of?", "Bricks.")),
    "grass": ("a grayscale texture of grass seen from above", ("What plant covers the ground?", "Grass.")),
    "stereo_motorcycle": ("a red motorcycle parked in a garage", ("What colour is the motorcycle?", "Red.")),
}


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding of ``img`` (deterministic)."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def load_photo(name: str) -> Image.Image:
    """``skimage.data.<name>()`` as a PIL image (RGB or L) whose shorter side is 128 px."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
    arr = (arr * 255).astype(np.uint8) if arr.dtype == bool else arr
    img = Image.fromarray(arr)
    scale = 128 / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 digit (ink 0..16) -> a 64x64 grayscale image, white ink on black."""
    gray = np.round(pixels * (255 / 16)).astype(np.uint8)
    return Image.fromarray(gray, "L").resize((64, 64), Image.Resampling.NEAREST)


def understanding(sample_id: str, question: str, answer: str, image: bytes, meta: dict) -> Sample:
    """A one-round question about ``image``."""
    turns = [{"role": "user", "content": f"{IMAGE}\n{question}"}, {"role": "assistant", "content": answer}]
    return Sample(sample_id, "understanding", turns, [image], meta)


def generation(sample_id: str, prompt: str, image: bytes, meta: dict) -> Sample:
    """``prompt`` -> ``image``."""
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": IMAGE_GEN}]
    return Sample(sample_id, "generation", turns, [image], meta)


def photo_samples(name: str, image: bytes, is_colour: bool) -> Iterator[Sample]:
    """The understanding and generation samples of one photo."""
    caption, (question, answer) = PHOTOS[name]
    sid, meta = f"photo-{name}", {"source": f"skimage.data.{name}"}
    colour = "Yes, it is a colour image." if is_colour else "No, it is a grayscale image."
    yield understanding(
        f"{sid}-caption", caption_question(sid), caption[0].upper() + caption[1:] + ".", image, meta
    )
    yield understanding(f"{sid}-qa", question, answer, image, meta)
    yield understanding(f"{sid}-colour", "Is this a colour image?", colour, image, meta)
    yield generation(sid, caption, image, meta)


def digit_samples(index: int, label: int, image: bytes) -> Iterator[Sample]:
    """The understanding and generation samples of one handwritten digit."""
    sid, meta = (
        f"digit-{index:04d}",
        {"source": "sklearn.datasets.load_digits", "index": index, "label": label},
    )
    caption = DIGIT_CAPTION.format(label=label)
    yield understanding(f"{sid}-qa", DIGIT_QUESTION, f"It is the digit {label}.", image, meta)
    yield understanding(
        f"{sid}-describe",
        "Describe the image.",
        f"A handwritten digit {label} in white on black.",
        image,
        meta,
    )
    yield generation(sid, caption, image, meta)


def fact_chats() -> list[list[tuple[str, str]]]:
    """Fixed one-round chats about digits and colours."""
    mixes = [
        ("red", "yellow", "orange"),
        ("blue", "yellow", "green"),
        ("red", "blue", "purple"),
        ("red", "white", "pink"),
        ("black", "white", "grey"),
    ]
    things = [
        ("the sky on a clear day", "blue"),
        ("fresh grass", "green"),
        ("snow", "white"),
        ("a ripe banana", "yellow"),
        ("coal", "black"),
        ("a ripe strawberry", "red"),
    ]
    chats = [
        [("user", f"Which digit comes after {n}?"), ("assistant", f"The digit after {n} is {n + 1}.")]
        for n in range(9)
    ]
    chats += [
        [("user", f"Is {n} even or odd?"), ("assistant", f"{n} is {('even', 'odd')[n % 2]}.")]
        for n in range(10)
    ]
    chats += [
        [("user", f"How is the digit {n} written in words?"), ("assistant", f"It is written '{WORDS[n]}'.")]
        for n in range(10)
    ]
    chats += [
        [("user", f"What colour do you get by mixing {a} and {b} paint?"), ("assistant", f"You get {c}.")]
        for a, b, c in mixes
    ]
    chats += [
        [("user", f"What colour is {thing}?"), ("assistant", f"It is {colour}.")] for thing, colour in things
    ]
    return chats


def arithmetic_chat(rng: random.Random, two_rounds: bool) -> list[tuple[str, str]]:
    """A random sum, difference or product of small numbers (a second round adds one more)."""
    a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.choice("+-*")
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    sign = {"+": "+", "-": "-", "*": "×"}[op]
    turns = [("user", f"What is {a} {sign} {b}?"), ("assistant", f"{a} {sign} {b} = {value}.")]
    if two_rounds:
        turns = [("system", "You are a careful maths tutor. Answer briefly.")] + turns
        turns += [("user", "And if you add 1 to that?"), ("assistant", f"{value} + 1 = {value + 1}.")]
    return turns


def text_samples(count: int) -> Iterator[Sample]:
    """``count`` text-only samples: the fact chats, then arithmetic (every fifth one two-round)."""
    rng, facts = random.Random(0), fact_chats()
    for i in range(count):
        turns = facts[i] if i < len(facts) else arithmetic_chat(rng, two_rounds=i % 5 == 0)
        messages = [{"role": role, "content": content} for role, content in turns]
        yield Sample(f"text-{i:04d}", "text", messages, [], {"source": "demo"})


def photo_and_digit_samples(sink: ShardSink, digits: int) -> Iterator[Sample]:
    """Every image sample, photos first; a photo that fails to load is counted on ``sink``."""
    for name in PHOTOS:
        try:
            img = load_photo(name)
        except Exception as err:  # a data file missing from this skimage must not stop the demo
            sink.skip(f"photo-{name}", "unavailable", f"skimage.data.{name}: {type(err).__name__}: {err}")
            continue
        yield from photo_samples(name, png_bytes(img), img.mode == "RGB")
    from sklearn.datasets import load_digits

    data = load_digits()
    for i in range(min(digits, len(data.target))):
        yield from digit_samples(i, int(data.target[i]), png_bytes(digit_image(data.images[i])))


def heldout_samples(first: int, count: int, task: str = "generation") -> Iterator[Sample]:
    """``task`` samples ("generation", or "understanding": the digit question) of the ``count``
    digits after the first ``first`` (never trained on)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for i in range(first, min(first + count, len(data.target))):
        png = png_bytes(digit_image(data.images[i]))
        samples = digit_samples(i, int(data.target[i]), png)
        yield from (s for s in samples if s.task == task and not s.id.endswith("-describe"))


def reading_samples(split: str, count: int, min_digits: int, max_digits: int) -> Iterator[Sample]:
    """``count`` reading questions of rendered numbers; ``split`` ("train", "heldout") seeds the draw."""
    rng = random.Random(f"demo-reading-{split}")
    for i in range(count):
        r = numbers.random_rendering(rng, min_digits, max_digits)
        meta = {"source": "demo.numbers", "split": split, **r.meta()}
        png = png_bytes(numbers.draw(r))
        yield understanding(
            f"reading-{split}-{i:04d}", READING_QUESTION, f"It is the number {r.text}.", png, meta
        )


def digit_sizes(pixels: np.ndarray, size: int) -> np.ndarray:
    """8x8 digits (N,8,8), ink 0..16 -> (N,size,size) in [0,1] as the model sees them (size 8: raw)."""
    if size == 8:
        return pixels / 16.0
    from cheers_pl.data.images import resize_crop

    out = [np.asarray(resize_crop(digit_image(p).convert("RGB"), size).convert("L")) for p in pixels]
    return np.stack(out) / 255.0


def build_judge(out, digits: int, heldout: int) -> dict[str, Any]:
    """Fit the digit judge on the first ``digits`` digits, save it under ``out``; its manifest entry
    (``{"file": None, "reason"}`` when those digits lack a class).

    Accuracy on the ``heldout`` digits after them at every size of :data:`JUDGE_SIZES` (as the
    generation preprocessing resizes them), and at 32 px on all the digits the demo never uses.
    """
    from sklearn.datasets import load_digits

    from cheers_pl.eval.judge import DigitJudge

    data = load_digits()
    if len(set(data.target[:digits].tolist())) < 10:  # a judge that cannot name every digit: none
        return {"file": None, "reason": f"--digits {digits} does not hold every class 0-9"}
    judge = DigitJudge.fit(data.images[:digits] / 16.0, data.target[:digits])
    judge.save(out / JUDGE)
    end = min(digits + heldout, len(data.target))
    held, held_y = data.images[digits:end], data.target[digits:end]
    rest, rest_y = data.images[end:], data.target[end:]
    entry: dict[str, Any] = {
        "file": JUDGE,
        "model": "RBF SVM (C=10, gamma=0.05) on 8x8 area-downsampled grayscale, max-normalised",
        "trained_on": f"load_digits 0..{digits - 1} (the training digits)",
        "train_count": digits,
        "heldout_count": len(held_y),
    }
    if len(held_y):
        by_size = {str(s): round(judge.accuracy(digit_sizes(held, s), held_y), 4) for s in JUDGE_SIZES}
        entry["heldout_accuracy"] = by_size["32"]
        entry["heldout_accuracy_by_size"] = by_size
    if len(rest_y):  # other writers: a harder, larger test
        entry["unused_digits_count"] = len(rest_y)
        entry["unused_digits_accuracy"] = round(judge.accuracy(digit_sizes(rest, 32), rest_y), 4)
    return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo recipe's options."""
    parser.add_argument(
        "--digits", type=int, default=1000, help="how many of the 1797 digits to train on (the judge too)"
    )
    parser.add_argument("--texts", type=int, default=200, help="how many text-only chats to write")
    parser.add_argument(
        "--heldout",
        type=int,
        default=100,
        help="digits after the training ones, as held-out generation and digit-question samples",
    )
    parser.add_argument("--reading", type=int, default=600, help="rendered numbers to read, for training")
    parser.add_argument(
        "--heldout-reading",
        type=int,
        default=100,
        help="rendered numbers to read, held out (never trained on)",
    )
    parser.add_argument(
        "--reading-min-digits", type=int, default=2, help="fewest digits of a rendered number"
    )
    parser.add_argument("--reading-max-digits", type=int, default=4, help="most digits of a rendered number")
    parser.add_argument("--no-judge", dest="judge", action="store_false", help="do not fit the digit judge")
    add_output_arguments(parser, maxcount=50)


def combine(manifests: dict[str, dict[str, Any]], prefix: str) -> dict[str, Any]:
    """The top manifest: totals, and every folder's shards with paths relative to the top."""
    tasks, skipped, repaired = Counter(), Counter(), Counter()
    shards = []
    for folder, m in manifests.items():
        tasks.update(m["tasks"])
        skipped.update(m["skipped"])
        repaired.update(m["repaired"])
        shards += [{**s, "file": f"{folder}/{s['file']}"} for s in m["shards"]]
    return {
        "recipe": "demo",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prefix": prefix,
        "samples": sum(tasks.values()),
        "tasks": dict(sorted(tasks.items())),
        "folders": {folder: f"{folder}/{MANIFEST}" for folder in manifests},
        "shards": shards,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": [e for m in manifests.values() for e in m["skipped_examples"]],
        "repaired": dict(sorted(repaired.items())),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write the demo set under ``args.out``; the top manifest."""
    if not 1 <= args.reading_min_digits <= args.reading_max_digits <= numbers.MAX_DIGITS:
        raise ValueError(
            f"--reading-min-digits {args.reading_min_digits} and --reading-max-digits "
            f"{args.reading_max_digits}: need 1 <= min <= max <= {numbers.MAX_DIGITS}"
        )
    interrupted = interrupted_prefix(Path(args.out)) is not None  # its sub-folders are replaced too
    out = prepare_out_dir(args.out, args.prefix, args.overwrite, "demo")
    args = argparse.Namespace(**{**vars(args), "overwrite": args.overwrite or interrupted})
    with ExitStack() as stack:
        sinks = {
            t: stack.enter_context(sink_from_args(args, f"demo/{t}", out / t, mtime=MTIME))
            for t in TASK_FOLDERS
        }
        for sample in photo_and_digit_samples(sinks["understanding"], args.digits):
            sinks[sample.task].add(sample)
        reading = (args.reading_min_digits, args.reading_max_digits)
        for sample in reading_samples("train", args.reading, *reading):
            sinks["understanding"].add(sample)
        for sample in text_samples(args.texts):
            sinks["text"].add(sample)
        held = held_und = None
        kinds: Counter[str] = Counter()
        if args.heldout:
            held = stack.enter_context(sink_from_args(args, "demo/heldout", out / HELDOUT, mtime=MTIME))
            for sample in heldout_samples(args.digits, args.heldout):
                held.add(sample)
        if args.heldout or args.heldout_reading:
            held_und = stack.enter_context(
                sink_from_args(args, "demo/heldout_understanding", out / HELDOUT_UND, mtime=MTIME)
            )
            for sample in heldout_samples(args.digits, args.heldout, task="understanding"):
                held_und.add(sample)
                kinds["digits"] += 1
            for sample in reading_samples("heldout", args.heldout_reading, *reading):
                held_und.add(sample)
                kinds["reading"] += 1
    manifest = combine({task: sink.manifest for task, sink in sinks.items()}, args.prefix)
    if held is not None:  # listed apart: not part of the training totals
        manifest["heldout"] = {"manifest": f"{HELDOUT}/{MANIFEST}", "samples": held.manifest["samples"]}
    if held_und is not None:
        manifest[HELDOUT_UND] = {
            "manifest": f"{HELDOUT_UND}/{MANIFEST}",
            "samples": held_und.manifest["samples"],
            **{kind: kinds[kind] for kind in ("digits", "reading")},
        }
    if args.judge:
        manifest["judge"] = build_judge(out, args.digits, args.heldout)
    finish_out_dir(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m data_recipes.demo --out DIR``."""
    return recipe_main("demo", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
