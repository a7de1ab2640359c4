"""A VLMEvalKit model for CHEERS, duck-typed (VLMEvalKit is not imported, nor needed here).

VLMEvalKit calls ``model.generate(message, dataset)`` with ``message`` a list of
``{"type": "image", "value": path}`` / ``{"type": "text", "value": str}``; :class:`CheersVLM`
answers greedily through ``CheersModel.answer`` after the paper's understanding preprocessing
(longer side to the model's image size keeping the aspect ratio, then padded to a square).

Register it in VLMEvalKit's ``vlmeval/config.py`` (or any module that runs before ``run.py``
looks the name up)::

    from functools import partial
    from cheers_pl.eval.vlmeval import CheersVLM

    supported_VLM["CHEERS"] = partial(CheersVLM, model_path="/path/to/cheers_export")

then ``python run.py --data MMBench_DEV_EN MME --model CHEERS``. An already loaded model works
too: ``CheersVLM(model=my_cheers_model)``.

Limits: one image per question (``answer`` places one image); with several, the first is used
and a warning says so once; a message without an image raises ``NotImplementedError``.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cheers_pl.data.images import decode_image, resize_pad, to_rgb, to_tensor
from cheers_pl.data.schema import SampleError

__all__ = ["CheersVLM", "main"]

_ANSWER_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


def _is_image_path(s: str) -> bool:
    mime, _ = mimetypes.guess_type(s)
    return bool(mime and mime.startswith("image/")) and os.path.isfile(s)


class CheersVLM:
    """VLMEvalKit's model interface over a :class:`~cheers_pl.model.CheersModel`.

    Args:
        model_path: checkpoint / export loaded with ``cheers_pl.io.export.load_any``.
        model: an already built ``CheersModel`` (instead of ``model_path``).
        max_new_tokens: answer length cap (default 512).
        device: where to put the model (default: cuda if available, else where it already is).
        **kw: ``model.answer`` decoding options (``do_sample``, ``temperature``, ``top_k``, ``top_p``);
            the default is greedy decoding, the released understanding evaluation.
    """

    INSTALL_REQ = False
    INTERLEAVE = False
    is_api = False
    allowed_types = ["text", "image"]

    def __init__(
        self,
        model_path: str | None = None,
        model=None,
        max_new_tokens: int = 512,
        device: str | torch.device | None = None,
        **kw: Any,
    ):
        unknown = sorted(set(kw) - set(_ANSWER_KWARGS))
        if unknown:
            raise TypeError(f"CheersVLM: unknown option(s) {unknown}; known: {list(_ANSWER_KWARGS)}")
        if (model is None) == (model_path is None):
            raise ValueError("CheersVLM: pass exactly one of model_path= or model=")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if model is None:
            from cheers_pl.io.export import load_any  # lazy: only needed for model_path

            model = load_any(model_path)
            if device is None and torch.cuda.is_available():
                device = "cuda"
        if not hasattr(model, "answer") or not hasattr(model, "image_size"):
            raise TypeError(f"CheersVLM: {type(model).__name__} is not a CheersModel (no answer/image_size)")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self.answer_kwargs = {"do_sample": False, **kw}
        self.dump_image_func = None
        self._warned_several = False

    # -- VLMEvalKit's hooks ---------------------------------------------------------------------
    def use_custom_prompt(self, dataset: str | None) -> bool:
        """Always False: the dataset builds the prompt."""
        return False

    def build_prompt(self, line, dataset=None):
        raise NotImplementedError("CheersVLM uses the datasets' own prompts (use_custom_prompt is False)")

    def set_dump_image(self, dump_image_func) -> None:
        """VLMEvalKit hands over its dataset's image dumper before inference."""
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset=None):
        if self.dump_image_func is None:
            raise RuntimeError("CheersVLM.dump_image: VLMEvalKit has not called set_dump_image yet")
        return self.dump_image_func(line)

    # -- messages -------------------------------------------------------------------------------
    @staticmethod
    def normalize(message) -> list[dict[str, Any]]:
        """A str, a dict, a list of str (image paths or text) or of dicts -> a list of type/value dicts."""
        if isinstance(message, str):  # as VLMEvalKit: a bare string is the text
            message = [{"type": "text", "value": message}]
        elif isinstance(message, os.PathLike | Image.Image | dict):
            message = [message]
        if not isinstance(message, list | tuple) or not message:
            raise ValueError(f"CheersVLM: message must be a str, a dict or a non-empty list, got {message!r}")
        out = []
        for i, item in enumerate(message):
            if isinstance(item, Image.Image | os.PathLike):
                item = {"type": "image", "value": item}
            elif isinstance(item, str):
                item = {"type": "image" if _is_image_path(item) else "text", "value": item}
            elif not isinstance(item, dict) or "type" not in item or "value" not in item:
                raise ValueError(f"CheersVLM: message item {i} needs 'type' and 'value', got {item!r}")
            if item["type"] not in ("text", "image"):
                raise ValueError(
                    f"CheersVLM: message item {i} has type {item['type']!r}; only text and image"
                )
            if item["type"] == "text" and not isinstance(item["value"], str):
                raise ValueError(f"CheersVLM: message item {i} text value is {type(item['value']).__name__}")
            if item["type"] == "text" and item["value"] == "":
                continue
            out.append(item)
        return out

    def load_image(self, value) -> torch.Tensor:
        """A path (or PIL image) -> (1, 3, S, S) in [0, 1]: longer side to S, padded (the paper)."""
        if isinstance(value, Image.Image):
            img, _ = to_rgb(value)
        else:
            path = Path(value)
            try:
                img, _ = decode_image(path.read_bytes())
            except OSError as err:
                raise ValueError(f"CheersVLM: cannot read image {path}: {err}") from None
            except SampleError as err:
                raise ValueError(f"CheersVLM: cannot decode image {path}: {err}") from None
        size = int(self.model.image_size)
        return to_tensor(resize_pad(img, size))[None]

    # -- generation -----------------------------------------------------------------------------
    def generate(self, message, dataset: str | None = None) -> str:
        """Answer one message (see :meth:`normalize` for the accepted forms); returns the text."""
        return self.generate_inner(self.normalize(message), dataset)

    def generate_inner(self, message, dataset: str | None = None) -> str:
        message = self.normalize(message)
        images = [m["value"] for m in message if m["type"] == "image"]
        question = "\n".join(m["value"] for m in message if m["type"] == "text")
        if not images:
            raise NotImplementedError(
                "CheersVLM: this message has no image; CheersModel.answer answers about one image, "
                "text-only questions are not supported"
            )
        if len(images) > 1 and not self._warned_several:
            warnings.warn(
                f"CheersVLM: a message holds {len(images)} images; CHEERS answers about one, so only "
                "the first is used (warned once)",
                stacklevel=2,
            )
            self._warned_several = True
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        pixels = self.load_image(images[0]).to(device)
        answer = self.model.answer(
            pixels, [question], max_new_tokens=self.max_new_tokens, **self.answer_kwargs
        )
        return answer[0].strip()

    def __repr__(self) -> str:
        return f"CheersVLM(model_path={self.model_path!r}, max_new_tokens={self.max_new_tokens})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cheers-vlm",
        description="Answer one question about one image with CheersVLM (the VLMEvalKit wrapper); "
        "a smoke test before registering it in VLMEvalKit.",
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="checkpoint / export to load")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True, help="question text")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.image):
        parser.exit(2, f"{parser.prog}: error: image not found: {args.image}\n")
    vlm = CheersVLM(model_path=args.model, max_new_tokens=args.max_new_tokens, device=args.device)
    message = [{"type": "image", "value": args.image}, {"type": "text", "value": args.question}]
    print(vlm.generate(message), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
