"""The three separate component releases as stage-I starting folders.

SigLIP2 (a full ``SiglipModel`` checkpoint: the vision tower is kept and saved as a
``SiglipVisionModel`` folder), Qwen2.5 (checked against its config and linked or copied), and the
FLUX.2 VAE in BFL naming (converted to a diffusers folder by :mod:`cheers_pl.io.bfl_vae`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cheers_pl.io import bfl_vae
from cheers_pl.io.safetensors_folder import read_safetensors_folder


@dataclass
class ComponentFolders:
    """The folders :func:`convert_components` wrote, and what it noticed."""

    siglip: Path | None = None
    qwen: Path | None = None
    vae: Path | None = None
    notes: list[str] = field(default_factory=list)

    def spec(self, **fields: Any):
        """``CheersSpec.pretrained`` over these folders (all three must exist)."""
        from cheers_pl.spec import CheersSpec

        if None in (self.siglip, self.qwen, self.vae):
            raise ValueError("spec() needs all three component folders (siglip, qwen, vae)")
        return CheersSpec.pretrained(str(self.siglip), str(self.qwen), str(self.vae), **fields)


def _header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a folder's safetensors files, read from their headers only."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or not item.is_file():
            continue
        target = dst / item.name
        if target.exists():
            target.unlink()
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)


def convert_siglip(src: str | Path, dst: str | Path) -> tuple[Path, list[str]]:
    """A SigLIP(2) checkpoint folder (full ``SiglipModel``: ``vision_model.*`` + text tower, or a vision
    tower alone) -> a ``SiglipVisionModel`` folder (``save_pretrained``). Returns (dst, notes)."""
    from transformers import SiglipConfig, SiglipVisionConfig, SiglipVisionModel

    src, dst, notes = Path(src), Path(dst), []
    raw = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    if raw is None:
        raise FileNotFoundError(f"siglip: no config.json in {src}")
    if "vision_config" in raw:
        vcfg = SiglipConfig.from_pretrained(src).vision_config
    elif raw.get("model_type") in ("siglip_vision_model", "siglip2_vision_model") or "patch_size" in raw:
        vcfg = SiglipVisionConfig.from_pretrained(src)
    else:
        raise ValueError(f"siglip: {src}/config.json is neither a SigLIP model nor a SigLIP vision config")
    state = read_safetensors_folder(src)
    text = [k for k in state if k.startswith("text_model.") or k in ("logit_scale", "logit_bias")]
    vision = {k[len("vision_model.") :]: v for k, v in state.items() if k.startswith("vision_model.")}
    if not vision:  # a vision tower saved flat (transformers 5 SiglipVisionModel)
        vision = {k: v for k, v in state.items() if k not in text}
    other = sorted(set(state) - set(text) - {"vision_model." + k for k in vision} - set(vision))
    if other:
        raise ValueError(f"siglip: {len(other)} tensors are neither vision nor text tower (e.g. {other[:6]})")
    if text:
        notes.append(f"siglip: dropped the text tower ({len(text)} tensors)")
    if not any(k.startswith("head.") for k in vision) and vcfg.vision_use_head:
        vcfg.vision_use_head = False
        notes.append("siglip: no pooling head in the checkpoint; vision_use_head=False")
    with torch.device("meta"):
        model = SiglipVisionModel(vcfg)
    own = {k for k in model.state_dict()}
    missing, unexpected = sorted(own - set(vision)), sorted(set(vision) - own)
    if missing or unexpected:
        raise ValueError(
            f"siglip: the vision tower does not fit its config: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    model = SiglipVisionModel(vcfg)
    model.load_state_dict(vision, strict=True)
    model.to(next(iter(vision.values())).dtype)
    model.save_pretrained(dst)
    return dst, notes


def prepare_qwen(src: str | Path, dst: str | Path) -> tuple[Path, list[str]]:
    """Check that a Qwen2.5 folder loads as ``Qwen2ForCausalLM`` (names and shapes, from the safetensors
    headers) and hard-link (or copy) its files into ``dst``. Returns (dst, notes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src, dst, notes = Path(src), Path(dst), []
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"qwen: no config.json in {src}")
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    if model_type != "qwen2":
        raise ValueError(f"qwen: {src} has model_type={model_type!r}, expected 'qwen2'")
    cfg = Qwen2Config.from_pretrained(src)
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    shapes = _header_shapes(src)
    missing = sorted(set(reference) - set(shapes))
    if cfg.tie_word_embeddings and missing == ["lm_head.weight"]:
        missing = []
        notes.append("qwen: lm_head saved once (tied to embed_tokens)")
    unexpected = sorted(set(shapes) - set(reference))
    bad = sorted(
        f"{k}: {shapes[k]} vs {reference[k]}"
        for k in set(shapes) & set(reference)
        if shapes[k] != reference[k]
    )
    if missing or unexpected or bad:
        raise ValueError(
            f"qwen: {src} does not load: missing {missing[:6]}, unexpected {unexpected[:6]}, shapes {bad[:3]}"
        )
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        notes.append("qwen: no tokenizer files; give CheersSpec.pretrained a tokenizer= folder")
    _link_or_copy(src, dst)
    return dst, notes


def prepare_vae(src: str | Path, dst: str | Path, config=None) -> tuple[Path, list[str]]:
    """A FLUX.2 VAE: BFL-named weights (a file, or a folder with one) -> a diffusers folder; an
    existing diffusers folder (``config.json`` + diffusers names) is checked and linked."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    weights = bfl_vae._weights_file(src)
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    diffusers_named = any(n.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for n in names)
    if diffusers_named:
        if not (src.is_dir() and (src / "config.json").is_file()):
            raise FileNotFoundError(f"vae: {weights} is diffusers-named but has no config.json beside it")
        kwargs = bfl_vae._read_config(src)
        reference = bfl_vae.meta_autoencoder(**kwargs).state_dict()
        with safe_open(str(weights), framework="pt") as f:
            meta = {n: torch.empty(f.get_slice(n).get_shape(), device="meta") for n in names}
        bfl_vae.check_against(meta, reference, f"vae: {src}")
        _link_or_copy(src, dst)
        return dst, ["vae: already a diffusers folder; linked"]
    return bfl_vae.convert_bfl_vae_folder(weights, dst, config), ["vae: BFL names converted to diffusers"]


def convert_components(
    siglip: str | Path | None = None,
    qwen: str | Path | None = None,
    vae: str | Path | None = None,
    out: str | Path = "components",
    vae_config=None,
) -> ComponentFolders:
    """The three component releases as stage-I start folders under ``out`` (only those given).

    ``out/siglip``: the SigLIP2 vision tower of a full SiglipModel checkpoint; ``out/qwen``: the
    Qwen2.5 folder, verified and linked; ``out/vae``: the FLUX.2 VAE, BFL -> diffusers names.
    ``.spec()`` of the result is the matching ``CheersSpec.pretrained``.
    """
    if siglip is None and qwen is None and vae is None:
        raise ValueError("convert_components: give at least one of siglip=, qwen=, vae=")
    out = Path(out)
    result = ComponentFolders()
    for name, src, fn in (("siglip", siglip, convert_siglip), ("qwen", qwen, prepare_qwen)):
        if src is not None:
            path, notes = fn(src, out / name)
            setattr(result, name, path)
            result.notes += notes
    if vae is not None:
        result.vae, notes = prepare_vae(vae, out / "vae", vae_config)
        result.notes += notes
    return result
