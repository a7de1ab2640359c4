"""A fixed mixed batch of real photos (scikit-image's bundled images) and a CPU smoke run.

Used by ``cheers smoke`` and the tests: one understanding, one generation and one text-only
sample, so that every loss term and every module is exercised.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PHOTOS = {
    "chelsea": "a photo of a cat",
    "coffee": "a cup of coffee",
    "astronaut": "a portrait of an astronaut",
}


def photo(name: str, size: int) -> Tensor:
    """A scikit-image bundled photo as (3, size, size) in [0, 1], centre-cropped to a square."""
    from skimage import data

    img = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1).float() / 255
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[
        0
    ]


def mixed_batch(model) -> dict[str, Tensor]:
    """Understanding (cat photo + question), generation (coffee caption + image), text-only; right-padded."""
    p, size = model.processor, model.image_size
    samples = [
        p.encode(
            [
                {"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": "A cat."},
            ],
            num_images=1,
        ),
        p.encode(
            [{"role": "user", "content": PHOTOS["coffee"]}, {"role": "assistant", "content": "<image_gen>"}],
            num_images=1,
        ),
        p.encode([{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}], 0),
    ]
    batch = p.collate(samples)
    batch["images"] = torch.stack([photo("chelsea", size), photo("coffee", size)])
    batch.update(p.batch_index(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    return batch


def run_smoke(steps: int = 2, seed: int = 0, out: str | None = None) -> dict[str, object]:
    """Tiny CheersModel on CPU: ``steps`` AdamW steps on :func:`mixed_batch`, one image, one answer."""
    from cheers_pl.model import CheersModel
    from cheers_pl.spec import CheersSpec

    torch.manual_seed(seed)
    start = time.perf_counter()
    model = CheersModel(CheersSpec.tiny())
    batch = mixed_batch(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        outputs = model(batch)
        opt.zero_grad()
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(float(outputs.loss.detach()), 4))
    model.eval()
    gen = model.generate([PHOTOS["coffee"]], steps=4, seed=seed)
    answer = model.answer(batch["images"][:1], ["What is in the picture?"], max_new_tokens=8)
    if out:
        from PIL import Image

        arr = (gen.images[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(out)
    return {
        "losses": losses,
        "image": tuple(gen.images.shape),
        "answer": repr(answer[0]),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """``cheers smoke``: tiny model on CPU, train steps, generate, answer."""
    from cheers_pl.cli_help import make_parser

    parser = make_parser("cheers smoke", main.__doc__)
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps on one fixed batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the batch and the sampling")
    parser.add_argument("--out", default=None, help="write the generated image as PNG here")
    args = parser.parse_args(argv)
    result = run_smoke(steps=args.steps, seed=args.seed, out=args.out)
    print(f"losses (total loss after each of {len(result['losses'])} steps): {result['losses']}")
    saved = f"written to {args.out}" if args.out else "not saved (--out FILE.png saves it)"
    print(f"image (N, C, H, W): {result['image']}, 4 Euler steps; {saved}")
    print(f"answer (random tiny model, expect noise): {result['answer']}")
    print(f"seconds (build, train, generate, answer): {result['seconds']}")
    return 0
