"""``cheers generate`` / ``cheers answer`` / ``cheers edit``: batch inference with repro cards.

Each command loads a model in any format :func:`cheers_pl.io.export.load_any` reads (``--model``),
takes one item from the command line or many from ``--jsonl FILE`` (one JSON object per line),
and writes to ``--out DIR``:

    generate  {"prompt"}                 -> DIR/{index:05d}_{k:02d}.png   (k < --num-images)
    answer    {"image", "question"}      -> DIR/answers.jsonl ({"index","image","question","answer"})
    edit      {"image", "instruction"}   -> DIR/{index:05d}.png

plus ``DIR/repro.json``: every setting, the seed of each output, the model path and the sha256 of
its weight files, the kit / torch versions and the command line; running the same command again
on the same machine gives byte-identical PNGs (each image is sampled alone from its own seed,
``seed + index * num_images + k``, so batching never changes it). ``index`` is an item's 0-based
line number in the JSONL (blank lines are skipped, not renumbered). An item that fails (an empty
prompt, an unreadable image, a bad line) is written to ``DIR/failures.jsonl`` with its reason and
the rest finish; the exit code is then 1 (2 for a usage or model error).

Zero-shot editing (paper appendix B, DESIGN section 4): the source image, centre-cropped as for
generation, is encoded to z_src and sampling starts at t = t0 = 0.1 from
z = t0 z_src + (1 - t0) z0. Two step grids (``schedule``; None follows ``spec.compat``):

    "kit"       n = round((1 - t0) N) steps, the n-step shifted grid compressed onto [t0, 1]:
                t_i = t0 + (1 - t0) shift(i / (n - 1)), dt scaled by (1 - t0); starts at t0, where z is;
    "released"  the release's: n = int((1 - t0) N), t_i = shift(linspace(t0, 1, n))_i, last dt 1/n,
                which evaluates the first step at shift(t0) (0.053 at a = 0.5), not at t0.

The kit keeps its own grid by default because its first time is the one the state z sits at on the
path; the released grid reproduces the authors' outputs. The same source is also an understanding
image (t = 1) of the prompt, whose user turn is ``"<image>\\n" + instruction``; the CFG null row keeps
that image span (:meth:`CheersProcessor.null_like`), so guidance is on the instruction only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from cheers_pl import __version__, flow
from cheers_pl.components.llm import image_span_ids, mixed_attention_mask, positions_from_valid
from cheers_pl.components.tokenizer import IMAGE, IMAGE_GEN

EDIT_T0 = 0.1  # paper appendix B: start at t = 0.1
EDIT_SCHEDULES = ("kit", "released")


# -- zero-shot editing ---------------------------------------------------------------------------
def edit_schedule(
    steps: int, shift: float = 0.5, t0: float = EDIT_T0, last_dt: str = "released", schedule: str = "kit"
):
    """(t (n,), dt (n,)) float64 of an edit from t0 to 1; ``schedule`` "kit" or "released" (module doc).

    "kit": the n = round((1 - t0) steps)-step grid of :func:`flow.sampling_schedule` mapped onto
    [t0, 1]. "released": n = int((1 - t0) steps), t = shift(linspace(t0, 1, n)), Euler dt = the
    differences, the last 1/n (``last_dt`` must be "released").
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t0 < 1.0:
        raise ValueError(f"edit start t0={t0} must be in [0, 1)")
    if schedule not in EDIT_SCHEDULES:
        raise ValueError(f"edit schedule={schedule!r}; valid choices are {list(EDIT_SCHEDULES)}")
    n = round((1 - t0) * steps) if schedule == "kit" else int(steps * (1 - t0))
    if n < 1:
        raise ValueError(f"steps={steps} with t0={t0} leaves {(1 - t0) * steps:g} -> 0 edit steps")
    if schedule == "kit":
        t, dt = flow.sampling_schedule(n, shift, last_dt)
        return t0 + (1 - t0) * t, (1 - t0) * dt
    if last_dt != "released":
        raise ValueError("the released edit schedule ends with dt = 1/n (last_dt='released')")
    t = flow.time_shift(torch.linspace(t0, 1, n, dtype=torch.float32), shift).double()
    return t, torch.cat([t[1:] - t[:-1], torch.tensor([1.0 / n], dtype=torch.float64)])


def edit_rows(model, instructions: list[str], cfg: bool) -> dict[str, Tensor]:
    """Left-padded rows ``prompt(<image>\\n instruction) <im_start> <image_gen>*T``; CFG null rows after."""
    if not instructions:
        raise ValueError("edit: the instruction list is empty")
    p, n_tok = model.processor, model.tokens_per_image
    rows = []
    for text in instructions:
        if not text.strip():
            raise ValueError("edit: empty instruction")
        if IMAGE in text or IMAGE_GEN in text:
            raise ValueError(f"edit: instruction {text!r} holds an image marker; the source is added itself")
        prompt = p.generation_prompt(IMAGE + "\n" + text)
        rows.append(torch.cat([prompt, torch.full((n_tok,), p.image_gen_id, dtype=prompt.dtype)]))
    if cfg:
        rows += [p.null_like(r) for r in rows]
    return p.collate(rows, padding_side="left")


@torch.no_grad()
def edit(
    model,
    images: Tensor,
    instructions: list[str],
    steps: int = 80,
    cfg_scale: float = 9.5,
    shift: float = 0.5,
    seed: int | None = 0,
    strength_t0: float = EDIT_T0,
    last_dt: str = "released",
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    schedule: str | None = None,
    return_latents: bool = False,
):
    """Zero-shot editing (see the module docstring): images (B,3,H,W) in [0,1] -> edited (B,3,H,W).

    ``noise`` (B, C, S, S): the z0 mixed into the source's latents (default: drawn from
    ``generator`` / ``seed``). ``schedule``: "kit" or "released" (None: "released" under
    ``spec.compat == "released"``, else "kit"). ``return_latents``: return a
    :class:`~cheers_pl.model.GenerationOutput` (images, final latents, t grid) instead of the images.
    The text prefix and the source image's span never attend to the generated span, so their KV
    cache is computed once and only the T generated positions run at each step (``use_cache=False``
    recomputes the whole sequence, the reference). D, SigLIP and the projector run once per step
    for both CFG rows.
    """
    model.check_images(images)
    b = images.shape[0]
    if len(instructions) != b:
        raise ValueError(f"edit: {b} images but {len(instructions)} instructions")
    schedule = schedule or ("released" if model.spec.compat == "released" else "kit")
    t_grid, dt = edit_schedule(steps, shift, strength_t0, last_dt, schedule)
    device, n_tok = model.placeholder_ids.device, model.tokens_per_image
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    use_cfg = cfg_scale != 1.0
    batch = edit_rows(model, instructions, use_cfg)
    ids, valid = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    r, lp = ids.shape[0], ids.shape[1] - n_tok
    model.check_placeholders(ids, 2 * r)

    z_src = model.vae.encode(images.to(device))
    if noise is None:
        noise = torch.randn(z_src.shape, generator=generator, device=device, dtype=z_src.dtype)
    elif noise.shape != z_src.shape:
        raise ValueError(f"edit: noise must be {tuple(z_src.shape)} (B, C, S, S), got {tuple(noise.shape)}")
    z = flow.interpolate(z_src, noise.to(z_src), torch.full((b,), strength_t0, device=device))
    reps = 2 if use_cfg else 1
    src_tokens = model.visual_tokens(z_src)[0].repeat(reps, 1, 1)  # understanding image, t = 1
    span, pos = image_span_ids(ids, model.placeholder_ids, n_tok), positions_from_valid(valid)
    if use_cache:
        prefix, _ = model.place_images(ids[:, :lp], src_tokens)
        prefix_mask = mixed_attention_mask(span[:, :lp], span[:, :lp], valid[:, :lp])
        _, cache = model.llm(prefix, prefix_mask, pos[:, :lp], use_cache=True)
        img_mask = mixed_attention_mask(span[:, lp:], span, valid)
    else:
        full_mask = mixed_attention_mask(span, span, valid)

    def velocity(z_t: Tensor, t: float, _: int) -> Tensor:
        tokens, detail = model.visual_tokens(z_t)
        tokens, detail = tokens.repeat(reps, 1, 1), detail.repeat(reps, 1, 1)
        if use_cache:
            hidden, _ = model.llm(tokens, img_mask, pos[:, lp:], cache=cache, use_cache=True)
            cache.crop(-n_tok)
        else:  # spans in reading order: row r's source, then its generated image
            embeds, _ = model.place_images(ids, torch.stack([src_tokens, tokens], 1).flatten(0, 1))
            hidden = model.llm(embeds, full_mask, pos)[0][:, lp:]
        v, _ = model.cfm_head(hidden, torch.full((r,), t, device=device), detail)
        return flow.cfg_combine(v[:b], v[b:], cfg_scale) if use_cfg else v

    z = flow.euler_sample(velocity, z, t_grid.to(device), dt)
    edited = model.vae.decode(z).clamp(0, 1).float()
    if return_latents:
        from cheers_pl.model import GenerationOutput

        return GenerationOutput(edited, z, None, t_grid.float())
    return edited


# -- items, images, outputs ----------------------------------------------------------------------
@dataclass
class Item:
    """One input: its index (JSONL line number), its fields, or why it cannot run."""

    index: int
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def read_jsonl(path: str | Path) -> list[Item]:
    """One item per non-blank line; a line that is not a JSON object becomes a failing item."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read --jsonl {path}: {err}") from None
    items = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            items.append(Item(i, error=f"line {i + 1} is not JSON ({err})"))
            continue
        items.append(
            Item(i, obj) if isinstance(obj, dict) else Item(i, error=f"line {i + 1} is not an object")
        )
    return items


def text_field(item: Item, name: str) -> str:
    """The item's non-empty string field ``name``; raises ``ValueError`` naming what is wrong."""
    value = item.fields.get(name)
    if not isinstance(value, str):
        raise ValueError(f"no {name!r} string field" if value is None else f"{name!r} is not a string")
    if not value.strip():
        raise ValueError(f"empty {name!r}")
    return value


def load_image(path: str | Path, size: int, mode: str) -> Tensor:
    """(1,3,size,size) in [0,1]: ``mode`` "pad" (understanding: resize_pad) or "crop" (generation)."""
    from cheers_pl.data.images import decode_image, resize_crop, resize_pad, to_tensor

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err.strerror or err}") from None
    try:
        img, _ = decode_image(data)
    except ValueError as err:
        raise ValueError(f"cannot decode image {path}: {err}") from None
    img = resize_pad(img, size) if mode == "pad" else resize_crop(img, size)
    return to_tensor(img)[None]


def save_png(image: Tensor, path: Path) -> None:
    """(3,H,W) in [0,1] -> 8-bit RGB PNG (deterministic bytes)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_identity(path: str | Path) -> dict[str, Any]:
    """The model's path, format and the sha256 of each weight file."""
    from cheers_pl.io.export import detect_format, weight_files

    path = Path(path)
    files = weight_files(path)
    root = path if path.is_dir() else path.parent
    return {
        "path": str(path.resolve()),
        "format": detect_format(path),
        "sha256": {str(f.relative_to(root)): sha256(f) for f in files},
    }


def write_card(
    out: Path, command: str, argv: list[str], model_path: str, settings: dict, outputs: list
) -> Path:
    """``out/repro.json``: settings, per-output seeds, model identity, versions, the command line."""
    import diffusers
    import transformers

    card = {
        "command": f"cheers {command} " + shlex.join(argv),
        "argv": [command, *argv],
        "cwd": os.getcwd(),
        "settings": settings,
        "model": model_identity(model_path),
        "versions": {
            "cheers_pl": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
        "outputs": outputs,
    }
    path = out / "repro.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def run_items(items: list[Item], work: Callable[[Item], Any], out: Path, desc: str) -> tuple[list, list]:
    """Run ``work`` on every item under a progress bar; failures go to ``out/failures.jsonl``."""
    done, failures = [], []
    for item in tqdm(items, desc=desc, unit="item", file=sys.stderr):
        try:
            if item.error:
                raise ValueError(item.error)
            done.append(work(item))
        except Exception as err:  # one bad item never stops the batch
            failures.append({"index": item.index, "reason": str(err), **item.fields})
    path = out / "failures.jsonl"
    if failures:
        path.write_text("".join(json.dumps(f) + "\n" for f in failures))
    elif path.exists():
        path.unlink()  # a stale report of an earlier run
    note = f", {len(failures)} failed (see {path})" if failures else ""
    print(f"{desc}: {len(done)} of {len(items)} items done{note}", file=sys.stderr)
    return done, failures


# -- commands --------------------------------------------------------------------------------------
SEED_MAX = 2**63 - 1


def number(kind: type, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable:
    """An argparse ``type``: a finite ``kind`` (int or float) in [lo, hi] (``(`` / ``)`` when open).

    ``nan``, ``inf`` and values out of range are refused at parse time, naming the option and the
    range: they would otherwise give black images and ``NaN`` in ``repro.json``.
    """
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    what = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not _inside(value, lo, hi, lo_open, hi_open):
            raise argparse.ArgumentTypeError(f"must be {what} in {interval}, got {text!r}")
        return value

    return parse


def _inside(value: float, lo: float, hi: float, lo_open: bool, hi_open: bool) -> bool:
    return (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)


def _parser(command: str, doc: str, items: str) -> argparse.ArgumentParser:
    from cheers_pl.cli_help import make_parser

    parser = make_parser(f"cheers {command}", doc)
    parser.add_argument("--model", required=True, help="a stage .ckpt, an exported or a converted folder")
    parser.add_argument("--jsonl", help=f"batch input, one JSON object per line: {items}")
    parser.add_argument(
        "--seed", type=number(int, 0, SEED_MAX), default=0, help="base seed (item i, image k: seed + i*n + k)"
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier run in --out"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="run the VAE and D as the plain diffusers modules, not the CPU fast path (same outputs "
        "within 1e-5; model.fast = False)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also torch.compile the VAE decoder and D (the first call compiles; falls back to eager "
        "with one line where it cannot)",
    )
    return parser


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg",
        dest="cfg_scale",
        type=number(float, 0, 100),
        default=9.5,
        help="classifier-free guidance scale in [0, 100] (1: none)",
    )
    parser.add_argument("--steps", type=number(int, 1, 10000), default=80, help="Euler steps N, 1 to 10000")
    parser.add_argument(
        "--shift", type=number(float, 0, 100, lo_open=True), default=0.5, help="time shift a, in (0, 100]"
    )
    parser.add_argument(
        "--last-dt",
        choices=flow.LAST_DT_MODES,
        default="released",
        help="released: the last Euler step is 1/N; exact: the steps end at t=1",
    )


def _items(parser, args, single: dict[str, Any]) -> list[Item]:
    """Items from ``--jsonl`` or from the single values given on the command line (not both)."""
    given = {k: v for k, v in single.items() if v is not None}
    if args.jsonl and given:
        parser.error(f"give --jsonl or {', '.join('--' + k for k in single)}, not both")
    if args.jsonl:
        try:
            items = read_jsonl(args.jsonl)
        except ValueError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
    elif len(given) == len(single):
        values = [v if isinstance(v, list) else [v] for v in given.values()]
        items = [
            Item(i, dict(zip(given, row, strict=True))) for i, row in enumerate(zip(*values, strict=True))
        ]
    else:
        parser.error(f"give --jsonl FILE or {' and '.join('--' + k for k in single)}")
    if not items:
        parser.error(f"no items: {args.jsonl} is empty")
    return items


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The ``--model``: any format of :func:`~cheers_pl.io.export.load_any`; a LoRA checkpoint with
    the base it names (its hash checked), the adapters merged in for speed."""
    from cheers_pl.io.export import load_any

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_any(args.model, merge_lora=True).to(device).eval()
    except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: an unknown --device
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    model.fast = not args.plain
    model.compile_decoders = args.compile and not args.plain
    args.device = device
    return model


def _settings(args: argparse.Namespace, names: str, **extra: Any) -> dict[str, Any]:
    """The repro card's settings: the named arguments, then ``extra``."""
    return {**{name: getattr(args, name) for name in names.split()}, **extra}


def _prepare_out(parser: argparse.ArgumentParser, args: argparse.Namespace, outputs: list[str]) -> Path:
    """Create ``--out``; exit with one line if it is a file, is not writable, or already holds one
    of ``outputs`` (an earlier run's) and ``--overwrite`` is not given."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.exit(
            2, f"{parser.prog}: error: --out {out} is a file; name a folder (it is created if missing)\n"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        parser.exit(2, f"{parser.prog}: error: cannot write to --out {out}: {err.strerror or err}\n")
    old = [name for name in dict.fromkeys(outputs) if (out / name).exists()]
    if old and not args.overwrite:
        names = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
        parser.exit(
            2,
            f"{parser.prog}: error: --out {out} already holds {names} of an earlier run; "
            "pass --overwrite to replace them, or choose another --out\n",
        )
    return out


OLD_RUN = ["repro.json", "failures.jsonl"]  # what every command writes (failures: when some fail)


def main_generate(argv: list[str] | None = None) -> int:
    """``cheers generate``: text-to-image, ``--num-images`` PNGs per prompt and a repro card."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(
        "generate", "Text-to-image with Euler sampling and classifier-free guidance.", '{"prompt": TEXT}'
    )
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    _sampling_args(parser)
    parser.add_argument(
        "--num-images", type=number(int, 1, 1000), default=1, help="images per prompt, 1 to 1000"
    )
    parser.add_argument(
        "--size", type=number(int, 1, 1 << 16), default=None, help="image size; must be the model's own"
    )
    parser.add_argument("--save-gates", action="store_true", help="also save every step's HFI gate map")
    args = parser.parse_args(argv)
    items = _items(parser, args, {"prompt": args.prompt})
    names = [f"{item.index:05d}_{k:02d}.png" for item in items for k in range(args.num_images)]
    out = _prepare_out(parser, args, OLD_RUN + names)
    model = _load(parser, args)
    size = model.image_size
    if args.size is not None and args.size != size:
        patch = model.resolved.vae_downsample
        parser.exit(
            2,
            f"{parser.prog}: error: --size {args.size} is not this model's image size {size} "
            f"(the kit's models make one fixed size, a multiple of their {patch}-px latent patch)\n",
        )

    def work(item: Item) -> list[dict]:
        prompt, records = text_field(item, "prompt"), []
        for k in range(args.num_images):
            seed = args.seed + item.index * args.num_images + k
            name = f"{item.index:05d}_{k:02d}"
            gates = str(out / "gates" / name) if args.save_gates else None
            result = model.generate(
                [prompt], args.cfg_scale, args.steps, args.shift, seed, last_dt=args.last_dt, gates_dir=gates
            )
            save_png(result.images[0], out / f"{name}.png")
            records.append(
                {"index": item.index, "k": k, "prompt": prompt, "seed": seed, "file": f"{name}.png"}
            )
        return records

    done, failures = run_items(items, work, out, "generate")
    names = "cfg_scale steps shift last_dt seed num_images save_gates device"
    settings = _settings(args, names, size=size, failures=len(failures))
    write_card(out, "generate", argv, args.model, settings, [r for rs in done for r in rs])
    return 1 if failures else 0


def main_answer(argv: list[str] | None = None) -> int:
    """``cheers answer``: a question about an image; greedy unless ``--sample``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(
        "answer",
        "Answer questions about images (greedy by default).",
        '{"image": PATH, "question": TEXT}; relative paths are from the JSONL\'s folder',
    )
    parser.add_argument("--image", help="an image file")
    parser.add_argument("--question", help="the question")
    parser.add_argument(
        "--max-new-tokens", type=number(int, 1, 65536), default=64, help="most tokens to generate, 1 to 65536"
    )
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--temperature",
        type=number(float, 0, 100, lo_open=True),
        default=0.7,
        help="sampling temperature (--sample), in (0, 100]",
    )
    parser.add_argument(
        "--top-k", type=number(int, 0, 1 << 30), default=20, help="top-k of --sample (0: off)"
    )
    parser.add_argument(
        "--top-p", type=number(float, 0, 1, lo_open=True), default=0.8, help="top-p of --sample, in (0, 1]"
    )
    args = parser.parse_args(argv)
    items = _items(parser, args, {"image": args.image, "question": args.question})
    out = _prepare_out(parser, args, [*OLD_RUN, "answers.jsonl"])
    model = _load(parser, args)
    root = Path(args.jsonl).parent if args.jsonl else Path(".")
    answers = out / "answers.jsonl"
    answers.write_text("")
    device = model.placeholder_ids.device
    decoding = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    decoding.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    def work(item: Item) -> dict:
        image, question = text_field(item, "image"), text_field(item, "question")
        pixels = load_image(root / image, model.image_size, "pad")
        seed = args.seed + item.index
        gen = torch.Generator(device=device).manual_seed(seed)
        text = model.answer(pixels, [question], **decoding, generator=gen)[0]
        record = {"index": item.index, "image": image, "question": question, "answer": text}
        with open(answers, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(f"[{item.index}] {text}")
        return {**record, "seed": seed}

    done, failures = run_items(items, work, out, "answer")
    extra = {"size": model.image_size, "preprocess": "resize_pad"}
    settings = {**decoding, "seed": args.seed, "device": args.device, **extra, "failures": len(failures)}
    write_card(out, "answer", argv, args.model, settings, done)
    return 1 if failures else 0


def main_edit(argv: list[str] | None = None) -> int:
    """``cheers edit``: zero-shot instruction editing of images (paper appendix B)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(
        "edit",
        "Zero-shot image editing: start at t0 from the source's latents, with the "
        "source also an understanding image of the prompt.",
        '{"image": PATH, "instruction": TEXT}; relative paths are from the JSONL\'s folder',
    )
    parser.add_argument("--image", help="the source image file")
    parser.add_argument("--instruction", help="what to change")
    _sampling_args(parser)
    parser.add_argument(
        "--t0",
        type=number(float, 0, 1, hi_open=True),
        default=EDIT_T0,
        help="start time in [0, 1) (0.1: round(0.9 N) steps)",
    )
    parser.add_argument(
        "--schedule", choices=EDIT_SCHEDULES, default=None, help="step grid (default: the model's compat)"
    )
    args = parser.parse_args(argv)
    try:
        edit_schedule(args.steps, args.shift, args.t0, args.last_dt, args.schedule or "kit")
    except ValueError as err:
        parser.error(str(err))
    items = _items(parser, args, {"image": args.image, "instruction": args.instruction})
    out = _prepare_out(parser, args, OLD_RUN + [f"{item.index:05d}.png" for item in items])
    model = _load(parser, args)
    args.schedule = args.schedule or ("released" if model.spec.compat == "released" else "kit")
    try:
        n_run = len(edit_schedule(args.steps, args.shift, args.t0, args.last_dt, args.schedule)[0])
    except ValueError as err:
        parser.error(str(err))
    root = Path(args.jsonl).parent if args.jsonl else Path(".")

    def work(item: Item) -> dict:
        image, instruction = text_field(item, "image"), text_field(item, "instruction")
        pixels = load_image(root / image, model.image_size, "crop")
        seed = args.seed + item.index
        result = edit(
            model,
            pixels,
            [instruction],
            args.steps,
            args.cfg_scale,
            args.shift,
            seed,
            args.t0,
            args.last_dt,
            schedule=args.schedule,
        )
        name = f"{item.index:05d}.png"
        save_png(result[0], out / name)
        return {"index": item.index, "image": image, "instruction": instruction, "seed": seed, "file": name}

    done, failures = run_items(items, work, out, "edit")
    names = "cfg_scale steps t0 shift last_dt schedule seed device"
    extra = {"steps_run": n_run, "size": model.image_size, "preprocess": "resize_crop"}
    settings = _settings(args, names, **extra, failures=len(failures))
    write_card(out, "edit", argv, args.model, settings, done)
    return 1 if failures else 0
