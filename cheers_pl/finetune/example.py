"""A small "own data" folder to try the fine-tuning walk-through on (README: fine-tune on your own data).

    python -m cheers_pl.finetune.example --out my_data

writes what a user brings, in the layouts the recipes read::

    my_data/photos/<colour>/<shape>_<k>.png   16 pictures: 4 colours x 2 shapes x 2, 64 x 64
    my_data/captions.jsonl    {"image": "red/square_0.png", "caption": "a red square on white"}
    my_data/chats.jsonl       LLaVA records: "<image>\\nWhat colour is the shape?" -> "It is red."

``cheers data imagefolder`` turns the first two into text-to-image shards, ``cheers data llava``
the chats into understanding shards.
"""

from __future__ import annotations

import json
from pathlib import Path

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe")
QUESTION = "What colour is the shape?"


def write_example(root: str | Path, size: int = 64, seed: int = 0) -> Path:
    """Write the folder (see the module docstring) under ``root``; returns ``root``."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    captions, chats = [], []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for k in range(2):
                a = np.full((size, size, 3), 245, np.uint8)
                q = size // 4
                if shape == "square":
                    a[q : 3 * q, q : 3 * q] = rgb
                else:
                    a[:, q // 2 * (k + 1) : q // 2 * (k + 1) + q] = rgb
                a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
                rel = f"{color}/{shape}_{k}.png"
                (root / "photos" / color).mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(root / "photos" / rel)
                captions.append({"image": rel, "caption": f"a {color} {shape} on white"})
                turns = [
                    {"from": "human", "value": f"<image>\n{QUESTION}"},
                    {"from": "gpt", "value": f"It is {color}."},
                ]
                chats.append({"id": f"{color}-{shape}-{k}", "image": rel, "conversations": turns})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return root


def main(argv: list[str] | None = None) -> int:
    from cheers_pl.cli_help import make_parser

    parser = make_parser(
        "python -m cheers_pl.finetune.example",
        "Write a small own-data folder (photos/, captions.jsonl, chats.jsonl) for the fine-tuning "
        "walk-through.",
    )
    parser.add_argument("--out", required=True, help="the folder to write (created if missing)")
    args = parser.parse_args(argv)
    out = write_example(args.out)
    print(f"wrote 16 photos, {out / 'captions.jsonl'} and {out / 'chats.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
