"""CLIP score of generated images against their prompts, through ``open_clip`` with local weights.

Score convention (the one torchmetrics' ``CLIPScore`` uses): for every image/prompt pair,
``100 * max(cos(image_emb, text_emb), 0)``, where both embeddings come from the same CLIP model.

Weights are only ever read from a local folder laid out the way open_clip's hub loader expects::

    folder/
        open_clip_config.json          {"model_cfg": {...}, "preprocess_cfg": {...}}
        open_clip_model.safetensors    (preferred) or open_clip_pytorch_model.bin

Nothing is downloaded. With no folder given, :func:`clip_score_or_none` returns ``None`` so the caller can
report the metric as unavailable instead of inventing a number.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

# open_clip (and the torchvision/timm it pulls in) takes seconds to import, so it is imported inside the
# functions that need it: importing this module, or clip_score_or_none(..., weights=None), stays cheap.

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "TORCH_BIN_NAME",
    "CLIPScorer",
    "clip_score_or_none",
    "save_folder",
    "tiny_clip",
    "tiny_clip_config",
    "tiny_preprocess_config",
]

CONFIG_NAME = "open_clip_config.json"
SAFETENSORS_NAME = "open_clip_model.safetensors"
TORCH_BIN_NAME = "open_clip_pytorch_model.bin"

_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "random": "bicubic"}
_RESIZE_MODES = ("shortest", "longest", "squash")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    return size[-2], size[-1]


class CLIPScorer:
    """Scores image/prompt pairs with an open_clip model.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (anything with ``encode_image``/``encode_text``).
            It is put in eval mode; its device is the scoring device.
        tokenizer: callable ``list[str] -> LongTensor (N, context_length)``. ``None`` means open_clip's
            ``SimpleTokenizer`` (BPE vocab shipped inside the package, works offline) with the model's
            context length; only allowed for plain ``open_clip.CLIP`` models, since other text towers
            need their own tokenizer.
        preprocess_cfg: open_clip preprocess dict (``size``, ``mean``, ``std``, ``interpolation``,
            ``resize_mode``, ``fill_color``). ``None`` means the one attached to the model
            (``open_clip.get_model_preprocess_cfg``), falling back to open_clip's defaults per key.
        batch_size: images/prompts encoded per forward pass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        preprocess_cfg: dict[str, Any] | None = None,
        batch_size: int = 64,
    ) -> None:
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        if tokenizer is None:
            if not isinstance(model, open_clip.CLIP):
                raise ValueError(
                    f"no tokenizer given for a {type(model).__name__}; only open_clip.CLIP defaults to "
                    "SimpleTokenizer (use CLIPScorer.from_folder or pass open_clip.get_tokenizer(...))"
                )
            tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
        self.tokenizer = tokenizer
        base = open_clip.transform.PreprocessCfg()
        cfg = open_clip.transform.merge_preprocess_dict(
            base, open_clip.get_model_preprocess_cfg(model) if preprocess_cfg is None else preprocess_cfg
        )
        self.preprocess_cfg: dict[str, Any] = cfg
        self.image_size: tuple[int, int] = _pair(cfg["size"])
        self.mean = torch.tensor([float(m) for m in cfg["mean"]]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in cfg["std"]]).view(1, -1, 1, 1)
        if self.mean.shape[1] != 3 or self.std.shape[1] != 3:
            raise ValueError(f"preprocess mean/std must have 3 entries, got {cfg['mean']} / {cfg['std']}")
        interp = str(cfg.get("interpolation", "bicubic"))
        if interp not in _INTERPOLATIONS:
            raise ValueError(
                f"unsupported interpolation {interp!r}; expected one of {sorted(_INTERPOLATIONS)}"
            )
        self.interpolation = _INTERPOLATIONS[interp]
        self.resize_mode = str(cfg.get("resize_mode", "shortest"))
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r}; expected one of {_RESIZE_MODES}")
        self.fill = float(cfg.get("fill_color", 0)) / 255.0
        self.batch_size = batch_size

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_folder(
        cls, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> CLIPScorer:
        """Builds a scorer from a local open_clip folder (see the module docstring); never downloads.

        The model is built by ``open_clip.create_model("local-dir:<path>")`` (config from
        ``open_clip_config.json``), then the weights file is loaded strictly with
        ``open_clip.load_checkpoint`` (``weights_only=True`` for ``.bin``). The tokenizer is
        ``open_clip.get_tokenizer("local-dir:<path>")``: ``SimpleTokenizer`` unless the config's ``text_cfg``
        names an ``hf_tokenizer_name``, in which case the tokenizer files must be in the folder too.

        Raises:
            FileNotFoundError: the folder, its config or its weights file is missing (the message names it).
        """
        import open_clip

        folder, weights = _locate(path)
        name = f"local-dir:{folder}"
        with _quiet_random_init_warning():
            model = open_clip.create_model(
                name,
                load_weights=False,  # we pick and load the weights file ourselves, below
                pretrained_image=False,  # never fetch tower-only base weights (timm / HF)
                pretrained_text=False,
                device=device,
            )
        open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True, device="cpu")
        tokenizer = open_clip.get_tokenizer(name)
        return cls(model, tokenizer=tokenizer, batch_size=batch_size)

    # ------------------------------------------------------------------ scoring

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """Tensor-side CLIP preprocessing (no PIL round trip).

        Args:
            images: (N, 3, H, W) float in [0, 1] (or uint8 in [0, 255]).

        Returns:
            (N, 3, S_h, S_w) float32, resized to the model's input size with the model's interpolation
            (bicubic for standard CLIP; antialiased), cropped/padded per ``resize_mode``, clamped to [0, 1]
            and normalised with the model's mean/std.
        """
        _check_images(images)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = self._resize(x.clamp(0.0, 1.0))
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std

    @torch.inference_mode()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-pair CLIP score.

        Args:
            images: (N, 3, H, W) float in [0, 1] (uint8 in [0, 255] also accepted); any H, W.
            prompts: N strings, ``prompts[i]`` describing ``images[i]``.

        Returns:
            (N,) float32 on CPU, each ``100 * max(cos(image_emb_i, text_emb_i), 0)``, in [0, 100].

        Raises:
            ValueError: images not (N, 3, H, W), values outside [0, 1], or ``len(prompts) != N``.
        """
        _check_images(images)
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of strings (one per image), not a single string")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; they must pair up")
        out = []
        for start in range(0, len(prompts), self.batch_size):
            img = images[start : start + self.batch_size].to(self.device)
            txt = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            img_emb = self.model.encode_image(self.preprocess(img), normalize=True).float()
            txt_emb = self.model.encode_text(txt, normalize=True).float()
            out.append((100.0 * (img_emb * txt_emb).sum(dim=-1)).clamp_min(0.0).cpu())
        if not out:
            return torch.zeros(0)
        return torch.cat(out)

    def mean_score(self, images: Tensor, prompts: Sequence[str]) -> float:
        """Mean of :meth:`score` over the N pairs (a Python float). Raises ValueError for N == 0."""
        if images.ndim >= 1 and images.shape[0] == 0:
            raise ValueError("mean CLIP score of zero images is undefined")
        return float(self.score(images, prompts).mean())

    # ------------------------------------------------------------------ internals

    def _interp(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)

    def _resize(self, x: Tensor) -> Tensor:
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash" or (h, w) == (th, tw):
            return self._interp(x, (th, tw)).clamp(0.0, 1.0)
        if self.resize_mode == "shortest":  # cover the target, then centre-crop
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = self._interp(x, (nh, nw))
            top, left = (nh - th) // 2, (nw - tw) // 2
            return x[..., top : top + th, left : left + tw].clamp(0.0, 1.0)
        # "longest": fit inside the target, then centre-pad with fill_color
        scale = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
        x = self._interp(x, (nh, nw)).clamp(0.0, 1.0)
        top, left = (th - nh) // 2, (tw - nw) // 2
        return F.pad(x, (left, tw - nw - left, top, th - nh - top), value=self.fill)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {images.dtype}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                    " (map [-1, 1] outputs with (x + 1) / 2)"
                )


def _locate(path: str | Path) -> tuple[Path, Path]:
    """(folder, weights file) of a local open_clip folder, or FileNotFoundError naming what is missing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP weights folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"CLIP config not found: {folder / CONFIG_NAME}")
    for name in (SAFETENSORS_NAME, TORCH_BIN_NAME):
        if (folder / name).is_file():
            return folder, folder / name
    raise FileNotFoundError(
        f"CLIP weights not found in {folder}: expected {SAFETENSORS_NAME} or {TORCH_BIN_NAME}"
    )


def check_clip_folder(path: str | Path) -> Path:
    """``path`` if it is a usable local open_clip folder, else FileNotFoundError naming what is missing
    (for commands that check their inputs before training)."""
    return _locate(path)[0]


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip logs "initialized randomly" when built with load_weights=False; we load them right after."""
    root, flt = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def save_folder(
    model: torch.nn.Module, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None, path: str | Path
) -> Path:
    """Writes ``model`` as a local open_clip folder (the inverse of :meth:`CLIPScorer.from_folder`).

    Args:
        model: the open_clip model; its ``state_dict`` goes to ``open_clip_model.safetensors``.
        model_cfg: the config it was built from (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...).
        preprocess_cfg: its preprocessing dict; ``None`` takes the one attached to the model.
        path: folder to create (parents too); existing files of the same name are overwritten.

    Returns:
        The folder path.
    """
    import open_clip

    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if preprocess_cfg is None:
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    config = {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": copy.deepcopy(dict(preprocess_cfg))}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # clone: safetensors refuses tensors that share storage, and wants contiguous CPU tensors
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / SAFETENSORS_NAME))
    return folder


def tiny_clip_config() -> dict[str, Any]:
    """Model config of a tiny open_clip ``CLIP`` (32 px ViT, 2+2 layers, width 64, 32-d embeddings).

    Uses the real CLIP BPE vocab size and context length, so the stock ``SimpleTokenizer`` fits it.
    """
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def tiny_preprocess_config() -> dict[str, Any]:
    """open_clip's default preprocessing (OpenAI mean/std, bicubic, shortest-side) at the tiny 32 px size."""
    import open_clip

    return open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(), {"size": 32})


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny open_clip ``CLIP`` from :func:`tiny_clip_config`, in eval mode.

    Deterministic in ``seed`` and leaves the global RNG state untouched. Its preprocess config
    (:func:`tiny_preprocess_config`) is attached the way ``open_clip.create_model`` attaches it.
    """
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**tiny_clip_config())
    open_clip.set_model_preprocess_cfg(model, tiny_preprocess_config())
    return model.eval()


@functools.lru_cache(maxsize=2)
def _cached_scorer(folder: str, weights_mtime_ns: int, device: str) -> CLIPScorer:
    del weights_mtime_ns  # part of the cache key only: a rewritten weights file is reloaded
    return CLIPScorer.from_folder(folder, device=device)


def clip_score_or_none(
    images: Tensor, prompts: Sequence[str], weights: str | Path | None, device: str | torch.device = "cpu"
) -> float | None:
    """Mean CLIP score, or ``None`` when no weights folder is given.

    Args:
        images: (N, 3, H, W) in [0, 1].
        prompts: N strings.
        weights: local open_clip folder (see :meth:`CLIPScorer.from_folder`), or ``None``; with ``None``
            nothing is loaded and the caller should print "unavailable (no CLIP weights given)".
        device: where to run the CLIP model.

    Returns:
        The mean score in [0, 100], or ``None``. The scorer for a folder is cached (two most recent).
    """
    if weights is None:
        return None
    folder, weights_file = _locate(weights)
    scorer = _cached_scorer(str(folder.resolve()), weights_file.stat().st_mtime_ns, str(torch.device(device)))
    return scorer.mean_score(images, prompts)
