"""``cheers eval demo --model CKPT``: does the demo model follow its prompt and read its image?

On the demo data (``cheers data demo``; ``--data``, default ``data/demo``):

* **T2I prompt-following** (``t2i_acc``): ``--per-digit`` images of each digit 0-9 from the demo's
  own caption ("a handwritten digit 7 in white on black"), judged by the digit classifier
  ``judge/digits.npz`` (:class:`~cheers_pl.eval.judge.DigitJudge`, trained on the training
  digits only); chance is 10%, and a model that draws one shape for every prompt scores exactly
  10%. Image k of every digit is sampled in one call of the ten captions with seed ``seed + k``;
  CFG scale (default 9.5, the paper's), steps and shift are recorded.
* **Reading** (``read_digit_acc``, ``read_number_acc``): greedy answers (``model.answer``) to
  "What digit is this?" on the held-out digits and "What number is written?" on the held-out
  rendered numbers (``heldout_understanding/``); the first run of digits in the answer must equal
  the label exactly ("It is the number 1234." -> "1234"); ``read_number_char_acc`` also credits
  the digits of a number read right in place (a graded score where exact match is still ~0).
* **Held-out losses** (:mod:`cheers_pl.eval.heldout`): ``fm_heldout`` on ``heldout/``,
  ``prompt_sensitivity`` (shuffled prompts minus true), ``image_sensitivity`` (held-out text loss
  with shuffled images minus true), with fixed noise and t.
* **Detail** (:mod:`cheers_pl.eval.detail`): ``detail_ratio``, high-frequency power fraction of
  the generated images over that of the real held-out digits at the model's size.

Writes ``OUT/eval.json`` (every number, the settings, per-digit accuracies, answer examples),
``OUT/eval.md`` (the table) and ``OUT/t2i.png`` (a row per digit); OUT defaults to the run folder
of a ``checkpoints/*.ckpt`` (``runs/demo/stage2/eval``), else ``MODEL_PARENT/eval``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cheers_pl.data.schema import Sample
from cheers_pl.data.transforms import SampleEncoder
from cheers_pl.eval.detail import CUTOFF, detail_ratio
from cheers_pl.eval.heldout import image_sensitivity, prompt_sensitivity, read_samples, spread
from cheers_pl.eval.judge import DigitJudge
from data_recipes.demo import DIGIT_CAPTION, DIGIT_QUESTION, HELDOUT, HELDOUT_UND, JUDGE, READING_QUESTION

DEFAULT_DATA = "data/demo"
METRICS = ("t2i_acc", "read_digit_acc", "read_number_acc", "read_number_char_acc", "fm_heldout",
           "prompt_sensitivity", "image_sensitivity", "detail_ratio")  # fmt: skip  # TensorBoard: eval/<name>
_NUMBER = re.compile(r"\d+")


@dataclass
class EvalSettings:
    """What the evaluation runs; the defaults are the full ``cheers eval demo``.

    per_digit: images per digit 0-9; cfg_scale, steps, shift: the sampler; seed: noise of the
    images (image k: ``seed + k``) and of the held-out losses; batch_size: loss and answer
    batches; max_new_tokens: answer length; max_reading: held-out questions of each kind (None:
    all); max_loss_samples: held-out samples per loss (None: all); detail_cutoff: cycles/pixel.
    """

    per_digit: int = 20
    cfg_scale: float = 9.5  # the paper's (and generate's) default scale
    steps: int = 20
    shift: float = 1.0
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 24
    max_reading: int | None = None
    max_loss_samples: int | None = None
    detail_cutoff: float = CUTOFF

    def __post_init__(self):
        for name in ("per_digit", "steps", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_reading", "max_loss_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ValueError(f"eval setting {name} must be >= 2 or None, got {getattr(self, name)}")


@dataclass
class DemoData:
    """The held-out parts of a demo data folder: samples (in shard order), the judge and its entry."""

    root: Path
    generation: list[Sample]
    digits: list[Sample]
    numbers: list[Sample]
    judge: DigitJudge
    judge_entry: dict[str, Any]

    @classmethod
    def load(cls, root: str | Path = DEFAULT_DATA) -> DemoData:
        """Read ``root``; raises naming the missing file or folder and how to make it."""
        root = Path(root)
        hint = f"make it with `cheers data demo --out {root}` (the demo recipe of this kit version)"
        for part in (HELDOUT, HELDOUT_UND):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root / part} does not exist: no held-out demo data; {hint}")
        if not (root / JUDGE).is_file():
            raise FileNotFoundError(f"{root / JUDGE} does not exist: no digit judge; {hint}")
        und = read_samples(root / HELDOUT_UND, task="understanding")
        digits = [s for s in und if question(s) == DIGIT_QUESTION]
        numbers = [s for s in und if question(s) == READING_QUESTION]
        for samples, key in ((digits, "label"), (numbers, "number")):
            for s in samples:
                if key not in s.meta:
                    raise ValueError(f"{root / HELDOUT_UND}: sample {s.id} has no meta[{key!r}]")
        entry: dict[str, Any] = {}
        if (root / "manifest.json").is_file():
            entry = json.loads((root / "manifest.json").read_text()).get("judge") or {}
        gen = read_samples(root / HELDOUT, task="generation")
        if not gen or not digits or not numbers:
            raise ValueError(
                f"{root}: held-out data incomplete ({len(gen)} generation samples in {HELDOUT}/, "
                f"{len(digits)} digit and {len(numbers)} reading questions in {HELDOUT_UND}/); {hint}"
            )
        return cls(root, gen, digits, numbers, DigitJudge.load(root / JUDGE), entry)


def question(sample: Sample) -> str:
    """The question of a one-round understanding sample (its user turn without the image marker)."""
    return sample.messages[0]["content"].replace("<image>", "").strip() if sample.messages else ""


def parse_number(text: str) -> str | None:
    """The first run of digits in ``text`` ("It is the number 1234." -> "1234"), or None."""
    match = _NUMBER.search(text)
    return match.group(0) if match else None


def char_accuracy(answer: str | None, truth: str) -> float:
    """Digits right in place, over the longer of the two: ("1273", "1234") -> 0.5; None -> 0."""
    if not answer:
        return 0.0
    return sum(a == b for a, b in zip(answer, truth, strict=False)) / max(len(answer), len(truth))


def _images(model, samples: list[Sample]) -> Tensor:
    """The first image of each sample as the model sees it (N,3,S,S), preprocessed by its marker."""
    enc = SampleEncoder(model.processor, model.image_size, cfg_dropout=0.0)
    return torch.stack([enc.images(s)[0] for s in samples])


@torch.no_grad()
def t2i_accuracy(model, judge: DigitJudge, s: EvalSettings) -> tuple[dict[str, Any], Tensor]:
    """(fields, images (per_digit*10, 3, S, S), image k of digit d at row k*10 + d)."""
    prompts = [DIGIT_CAPTION.format(label=d) for d in range(10)]
    images = []
    for k in range(s.per_digit):
        out = model.generate(prompts, cfg_scale=s.cfg_scale, steps=s.steps, shift=s.shift, seed=s.seed + k)
        images.append(out.images.float().cpu())
    images_t = torch.cat(images)
    labels = torch.arange(10).repeat(s.per_digit)
    pred = torch.as_tensor(judge.predict(images_t))
    right = pred == labels
    fields = {
        "t2i_acc": float(right.float().mean()),
        "t2i_images": len(labels),
        "t2i_per_digit": {str(d): float(right[labels == d].float().mean()) for d in range(10)},
        "t2i_judged_as": {str(d): int((pred == d).sum()) for d in range(10)},
    }
    return fields, images_t


@torch.no_grad()
def reading_accuracy(model, samples: list[Sample], key: str, s: EvalSettings) -> dict[str, Any]:
    """Exact-match accuracy of the parsed answers to ``samples`` against ``meta[key]``; examples."""
    answers: list[str] = []
    for start in range(0, len(samples), s.batch_size):
        part = samples[start : start + s.batch_size]
        images = _images(model, part).to(model.placeholder_ids.device)
        answers += model.answer(images, [question(x) for x in part], max_new_tokens=s.max_new_tokens)
    truth = [str(x.meta[key]) for x in samples]
    parsed = [parse_number(a) for a in answers]
    right = [p == t for p, t in zip(parsed, truth, strict=True)]
    return {
        "acc": sum(right) / len(right),
        "char_acc": sum(char_accuracy(p, t) for p, t in zip(parsed, truth, strict=True)) / len(truth),
        "count": len(right),
        "most_common_answers": Counter(answers).most_common(3),
        "examples": [
            {"id": x.id, "truth": t, "answer": a}
            for x, t, a in list(zip(samples, truth, answers, strict=True))[:5]
        ],
    }


def evaluate(model, data: DemoData | str | Path = DEFAULT_DATA, settings: EvalSettings | None = None,
             parts: tuple[str, ...] = ("t2i", "reading", "losses")) -> dict[str, Any]:  # fmt: skip
    """Every metric of the module docstring for ``model`` (a CheersModel, eval mode); the result dict.

    ``parts`` picks what runs ("t2i" also gives ``detail_ratio``); the global RNG is left as found.
    """
    s = settings or EvalSettings()
    data = data if isinstance(data, DemoData) else DemoData.load(data)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"settings": asdict(s), "data": str(data.root), "chance_t2i": 0.1}
    result["judge"] = {
        k: data.judge_entry[k] for k in ("heldout_accuracy", "heldout_count") if k in data.judge_entry
    }
    with torch.random.fork_rng(devices=[]):
        if "t2i" in parts:
            fields, images = t2i_accuracy(model, data.judge, s)
            result.update(fields)
            real = _images(model, data.generation)
            result.update(detail_ratio(images, real, s.detail_cutoff))
            result["_images"] = images
        if "reading" in parts:
            for name, samples, key in (("digit", data.digits, "label"), ("number", data.numbers, "number")):
                r = reading_accuracy(model, spread(samples, s.max_reading), key, s)
                result[f"read_{name}_acc"], result[f"read_{name}_count"] = r["acc"], r["count"]
                if name == "number":
                    result["read_number_char_acc"] = r["char_acc"]
                result[f"read_{name}_answers"] = r["most_common_answers"]
                result[f"read_{name}_examples"] = r["examples"]
        if "losses" in parts:
            gen = spread(data.generation, s.max_loss_samples)
            und = spread(data.digits + data.numbers, s.max_loss_samples)
            result.update(prompt_sensitivity(model, gen, s.batch_size, s.seed))
            result.update(image_sensitivity(model, und, s.batch_size, s.seed))
            result["loss_samples"] = {"generation": len(gen), "understanding": len(und)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """``{"eval/<metric>": value}`` of the :data:`METRICS` present in ``result`` (TensorBoard tags)."""
    return {f"eval/{m}": float(result[m]) for m in METRICS if m in result}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    """The eval table (Markdown) of a result dict."""
    s, n = result["settings"], result.get("loss_samples", {})
    rows = [
        ("T2I prompt-following (judge)", "t2i_acc", f"{result.get('t2i_images', 0)} images; chance 0.1000; "
         f"cfg {s['cfg_scale']}, steps {s['steps']}, shift {s['shift']}"),
        ("reading: held-out digits", "read_digit_acc", f"{result.get('read_digit_count', 0)} questions"),
        ("reading: held-out numbers", "read_number_acc", f"{result.get('read_number_count', 0)} questions"),
        ("reading: digits of numbers", "read_number_char_acc", "digits right in place / longer length"),
        ("held-out FM loss", "fm_heldout", f"{n.get('generation', 0)} samples"),
        ("prompt sensitivity", "prompt_sensitivity", "FM loss, shuffled prompts - true (> 0: uses it)"),
        ("held-out text loss", "text_heldout", f"{n.get('understanding', 0)} samples"),
        ("image sensitivity", "image_sensitivity", "text loss, shuffled images - true (> 0: uses it)"),
        ("detail ratio", "detail_ratio", f"power above {s['detail_cutoff']} cyc/px, generated / real"),
    ]  # fmt: skip
    lines = ["| metric | value | note |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(result[key])} | {note} |" for name, key, note in rows if key in result]
    judge = result.get("judge", {})
    if "heldout_accuracy" in judge:
        lines.append(
            f"\njudge: {judge['heldout_accuracy']:.4f} on {judge['heldout_count']} held-out real digits"
        )
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``eval.json``, ``eval.md`` (and ``t2i.png`` when images were made) in ``out``; their paths."""
    from torchvision.utils import save_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "md": out / "eval.md"}
    images = result.get("_images")
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    paths["json"].write_text(json.dumps(clean, indent=2) + "\n")
    paths["md"].write_text(markdown(result))
    if images is not None:
        per_digit = images.shape[0] // 10
        cols = min(per_digit, 10)  # a row per digit: its first images
        grid = images.view(per_digit, 10, *images.shape[1:])[:cols].transpose(0, 1).flatten(0, 1)
        paths["png"] = out / "t2i.png"
        save_image(grid, paths["png"], nrow=cols, padding=1)
    return paths


def default_out(model_path: str | Path) -> Path:
    """``RUN/eval`` for ``RUN/checkpoints/x.ckpt``, else ``PARENT/eval``."""
    path = Path(model_path)
    parent = path.parent if path.is_file() else path
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


def evaluate_demo(model_path: str | Path, data: str | Path = DEFAULT_DATA, out: str | Path | None = None,
                  settings: EvalSettings | None = None, device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Load ``model_path`` (any :func:`~cheers_pl.io.export.load_any` format), evaluate, write the report."""
    from cheers_pl.io.export import load_any

    demo = DemoData.load(data)  # the data's errors before the model's load
    model = load_any(model_path).to(device).eval()
    result = {"model": str(model_path), **evaluate(model, demo, settings)}
    paths = write_report(result, out or default_out(model_path))
    result["files"] = {k: str(v) for k, v in paths.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    """``cheers eval demo``: the eval table of a demo checkpoint."""
    from cheers_pl.cli_help import make_parser

    parser = make_parser("cheers eval demo", __doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a stage .ckpt, an exported or a converted folder")
    parser.add_argument("--data", default=DEFAULT_DATA, help="the demo data folder (cheers data demo --out)")
    parser.add_argument("--out", default=None, help="report folder (default: the run's eval/)")
    d = EvalSettings()
    parser.add_argument("--per-digit", type=int, default=d.per_digit, help="generated images per digit")
    parser.add_argument("--cfg", dest="cfg_scale", type=float, default=d.cfg_scale, help="CFG scale")
    parser.add_argument("--steps", type=int, default=d.steps, help="Euler steps")
    parser.add_argument("--shift", type=float, default=d.shift, help="time shift of the schedule")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the generated images")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per forward pass")
    parser.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help="most tokens of a reading answer"
    )
    parser.add_argument("--max-reading", type=int, default=None, help="questions of each kind (default: all)")
    parser.add_argument("--max-loss-samples", type=int, default=None, help="samples per loss (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    a = parser.parse_args(argv)
    try:
        settings = EvalSettings(a.per_digit, a.cfg_scale, a.steps, a.shift, a.seed, a.batch_size,
                                a.max_new_tokens, a.max_reading, a.max_loss_samples)  # fmt: skip
        result = evaluate_demo(a.model, a.data, a.out, settings, a.device)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"cheers eval demo: error: {err}\n")
    print(markdown(result), end="")
    print(f"written: {', '.join(result['files'].values())}")
    return 0


def main_eval(argv: list[str] | None = None) -> int:
    """``cheers eval BENCHMARK ...``: the in-kit evaluations (``demo``)."""
    argv = sys.argv[1:] if argv is None else argv
    benchmarks = {"demo": main}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: cheers eval {demo} [options]   (cheers eval demo --help)")
        return 0
    if argv[0] not in benchmarks:
        print(f"cheers eval: unknown benchmark {argv[0]!r}; valid: {list(benchmarks)}", file=sys.stderr)
        return 2
    return benchmarks[argv[0]](argv[1:])
