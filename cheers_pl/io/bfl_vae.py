"""The FLUX.2 autoencoder's two namings: Black Forest Labs' own module layout and diffusers'.

BFL's ``flux2`` autoencoder (the ``ae.safetensors`` / ``flux2-vae.sft`` release, and the VAE inside
the released Cheers checkpoint) is the LDM-style module tree; diffusers' ``AutoencoderKLFlux2``
holds the same tensors under other names. Names are VAE-local (no ``vae.`` prefix); ``n`` is the
number of resolution levels (4 for FLUX.2), ``n-1-i`` because BFL numbers the decoder's levels
from the highest resolution up and diffusers in the order they run::

    diffusers                                        BFL
    quant_conv.*                                     encoder.quant_conv.*
    post_quant_conv.*                                decoder.post_quant_conv.*
    bn.{running_mean,running_var,num_batches_tracked} bn.* (BFL files may lack num_batches_tracked)
    {encoder,decoder}.conv_in / conv_out             same
    {encoder,decoder}.conv_norm_out                  {encoder,decoder}.norm_out
    encoder.down_blocks.i.resnets.j.X                encoder.down.i.block.j.X
    encoder.down_blocks.i.downsamplers.0.conv        encoder.down.i.downsample.conv
    decoder.up_blocks.i.resnets.j.X                  decoder.up.(n-1-i).block.j.X
    decoder.up_blocks.i.upsamplers.0.conv            decoder.up.(n-1-i).upsample.conv
    {enc,dec}.mid_block.resnets.{0,1}.X              {enc,dec}.mid.block_{1,2}.X
    {enc,dec}.mid_block.attentions.0.group_norm      {enc,dec}.mid.attn_1.norm
    {enc,dec}.mid_block.attentions.0.to_{q,k,v}      {enc,dec}.mid.attn_1.{q,k,v}
    {enc,dec}.mid_block.attentions.0.to_out.0        {enc,dec}.mid.attn_1.proj_out

with resnet parts X in ``norm1, conv1, norm2, conv2`` and ``conv_shortcut`` <-> ``nin_shortcut``.
The one reshape: BFL's attention q/k/v/proj_out are 1x1 convs, weight (C, C, 1, 1); diffusers'
are Linear layers, weight (C, C) (diffusers' own FLUX.2 converter drops the two unit dims).

:func:`convert_bfl_vae_folder` turns a BFL file into a folder ``AutoencoderKLFlux2.from_pretrained``
reads (and so the kit's ``vae`` ``pretrained`` flavor).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PARAM = r"(weight|bias)"
_RES_TO_BFL = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_RES_TO_DIFFUSERS = {v: k for k, v in _RES_TO_BFL.items()}
_ATTN_TO_BFL = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTN_TO_DIFFUSERS = {v: k for k, v in _ATTN_TO_BFL.items()}
_BN = r"(running_mean|running_var|num_batches_tracked)"
_DIFF_RES = "|".join(_RES_TO_BFL)
_BFL_RES = "|".join(_RES_TO_DIFFUSERS)
_DIFF_ATTN = r"group_norm|to_q|to_k|to_v|to_out\.0"
_BFL_ATTN = "|".join(_ATTN_TO_DIFFUSERS)

# diffusers-name patterns (fullmatch)
_D = {
    "quant": re.compile(rf"quant_conv\.{PARAM}"),
    "post_quant": re.compile(rf"post_quant_conv\.{PARAM}"),
    "bn": re.compile(rf"bn\.{_BN}"),
    "io": re.compile(rf"(encoder|decoder)\.(conv_in|conv_out)\.{PARAM}"),
    "norm_out": re.compile(rf"(encoder|decoder)\.conv_norm_out\.{PARAM}"),
    "down_res": re.compile(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.({_DIFF_RES})\.{PARAM}"),
    "down_conv": re.compile(rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{PARAM}"),
    "up_res": re.compile(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.({_DIFF_RES})\.{PARAM}"),
    "up_conv": re.compile(rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{PARAM}"),
    "mid_res": re.compile(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.({_DIFF_RES})\.{PARAM}"),
    "mid_attn": re.compile(rf"(encoder|decoder)\.mid_block\.attentions\.0\.({_DIFF_ATTN})\.{PARAM}"),
}
# BFL-name patterns (fullmatch)
_B = {
    "quant": re.compile(rf"encoder\.quant_conv\.{PARAM}"),
    "post_quant": re.compile(rf"decoder\.post_quant_conv\.{PARAM}"),
    "bn": re.compile(rf"bn\.{_BN}"),
    "io": re.compile(rf"(encoder|decoder)\.(conv_in|conv_out)\.{PARAM}"),
    "norm_out": re.compile(rf"(encoder|decoder)\.norm_out\.{PARAM}"),
    "down_res": re.compile(rf"encoder\.down\.(\d+)\.block\.(\d+)\.({_BFL_RES})\.{PARAM}"),
    "down_conv": re.compile(rf"encoder\.down\.(\d+)\.downsample\.conv\.{PARAM}"),
    "up_res": re.compile(rf"decoder\.up\.(\d+)\.block\.(\d+)\.({_BFL_RES})\.{PARAM}"),
    "up_conv": re.compile(rf"decoder\.up\.(\d+)\.upsample\.conv\.{PARAM}"),
    "mid_res": re.compile(rf"(encoder|decoder)\.mid\.block_([12])\.({_BFL_RES})\.{PARAM}"),
    "mid_attn": re.compile(rf"(encoder|decoder)\.mid\.attn_1\.({_BFL_ATTN})\.{PARAM}"),
}
_D_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.")
_B_UP = re.compile(r"decoder\.up\.(\d+)\.")


def _levels(names, pattern: re.Pattern) -> int | None:
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(found) + 1 if found else None


def count_up_blocks(names, naming: str) -> int | None:
    """Decoder levels found in ``names`` (``naming`` "bfl" or "diffusers"); None without decoder blocks."""
    return _levels(names, _B_UP if naming == "bfl" else _D_UP)


def _flip(i: str, n: int | None, name: str) -> int:
    if n is None:
        raise ValueError(f"{name}: the number of decoder levels is needed to renumber it (num_up_blocks)")
    if int(i) >= n:
        raise ValueError(f"{name}: decoder level {i} but num_up_blocks={n}")
    return n - 1 - int(i)


def diffusers_name_to_bfl(name: str, num_up_blocks: int | None = None) -> str | None:
    """The BFL name of a VAE-local diffusers name; None if it is no FLUX.2 VAE tensor name."""
    for kind, pattern in _D.items():
        m = pattern.fullmatch(name)
        if m is None:
            continue
        g = m.groups()
        if kind == "quant":
            return f"encoder.quant_conv.{g[0]}"
        if kind == "post_quant":
            return f"decoder.post_quant_conv.{g[0]}"
        if kind in ("bn", "io"):
            return name
        if kind == "norm_out":
            return f"{g[0]}.norm_out.{g[1]}"
        if kind == "down_res":
            return f"encoder.down.{g[0]}.block.{g[1]}.{_RES_TO_BFL[g[2]]}.{g[3]}"
        if kind == "down_conv":
            return f"encoder.down.{g[0]}.downsample.conv.{g[1]}"
        if kind == "up_res":
            level = _flip(g[0], num_up_blocks, name)
            return f"decoder.up.{level}.block.{g[1]}.{_RES_TO_BFL[g[2]]}.{g[3]}"
        if kind == "up_conv":
            return f"decoder.up.{_flip(g[0], num_up_blocks, name)}.upsample.conv.{g[1]}"
        if kind == "mid_res":
            return f"{g[0]}.mid.block_{int(g[1]) + 1}.{_RES_TO_BFL[g[2]]}.{g[3]}"
        if kind == "mid_attn":
            return f"{g[0]}.mid.attn_1.{_ATTN_TO_BFL[g[1]]}.{g[2]}"
    return None


def bfl_name_to_diffusers(name: str, num_up_blocks: int | None = None) -> str | None:
    """The diffusers name of a VAE-local BFL name; None if it is no FLUX.2 VAE tensor name."""
    for kind, pattern in _B.items():
        m = pattern.fullmatch(name)
        if m is None:
            continue
        g = m.groups()
        if kind == "quant":
            return f"quant_conv.{g[0]}"
        if kind == "post_quant":
            return f"post_quant_conv.{g[0]}"
        if kind in ("bn", "io"):
            return name
        if kind == "norm_out":
            return f"{g[0]}.conv_norm_out.{g[1]}"
        if kind == "down_res":
            return f"encoder.down_blocks.{g[0]}.resnets.{g[1]}.{_RES_TO_DIFFUSERS[g[2]]}.{g[3]}"
        if kind == "down_conv":
            return f"encoder.down_blocks.{g[0]}.downsamplers.0.conv.{g[1]}"
        if kind == "up_res":
            level = _flip(g[0], num_up_blocks, name)
            return f"decoder.up_blocks.{level}.resnets.{g[1]}.{_RES_TO_DIFFUSERS[g[2]]}.{g[3]}"
        if kind == "up_conv":
            return f"decoder.up_blocks.{_flip(g[0], num_up_blocks, name)}.upsamplers.0.conv.{g[1]}"
        if kind == "mid_res":
            return f"{g[0]}.mid_block.resnets.{int(g[1]) - 1}.{_RES_TO_DIFFUSERS[g[2]]}.{g[3]}"
        if kind == "mid_attn":
            return f"{g[0]}.mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[g[1]]}.{g[2]}"
    return None


def is_attention_weight(bfl_name: str) -> bool:
    """True for BFL's 1x1-conv attention weights (q, k, v, proj_out), Linear weights in diffusers."""
    m = _B["mid_attn"].fullmatch(bfl_name)
    return m is not None and m.group(2) != "norm" and m.group(3) == "weight"


def _check_attention_shape(bfl_name: str, tensor: Tensor, side: str) -> None:
    """Raise naming the tensor and both shapes unless an attention weight is (C, C, 1, 1) / (C, C)."""
    shape, c = tuple(tensor.shape), tensor.shape[0] if tensor.ndim else 0
    want = (c, c, 1, 1) if side == "bfl" else (c, c)
    if shape != want:
        other = "a 1x1 conv, BFL" if side == "bfl" else "a Linear, diffusers"
        raise ValueError(f"attention weight {bfl_name} has shape {shape}; expected {want} ({other} naming)")


def bfl_tensor_to_diffusers(bfl_name: str, tensor: Tensor) -> Tensor:
    """(C, C, 1, 1) -> (C, C) for attention weights; every other tensor unchanged.

    A misshapen attention weight raises naming it and both shapes (no silent reshape)."""
    if not is_attention_weight(bfl_name):
        return tensor
    _check_attention_shape(bfl_name, tensor, "bfl")
    return tensor.reshape(tensor.shape[0], tensor.shape[1])


def diffusers_tensor_to_bfl(bfl_name: str, tensor: Tensor) -> Tensor:
    """(C, C) -> (C, C, 1, 1) for attention weights; every other tensor unchanged."""
    if not is_attention_weight(bfl_name):
        return tensor
    _check_attention_shape(bfl_name, tensor, "diffusers")
    return tensor.reshape(*tensor.shape, 1, 1)


def _convert(state: Mapping[str, Tensor], to_bfl: bool, num_up_blocks: int | None) -> dict[str, Tensor]:
    src, dst = ("diffusers", "BFL") if to_bfl else ("BFL", "diffusers")
    if num_up_blocks is None:
        num_up_blocks = count_up_blocks(state, "diffusers" if to_bfl else "bfl")
    name_fn = diffusers_name_to_bfl if to_bfl else bfl_name_to_diffusers
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    for name, tensor in state.items():
        new = name_fn(name, num_up_blocks)
        if new is None:
            unknown.append(name)
            continue
        if new in out:
            raise ValueError(f"{src} names {origin[new]!r} and {name!r} both map to {dst} name {new!r}")
        origin[new] = name
        bfl_name = new if to_bfl else name
        out[new] = (diffusers_tensor_to_bfl if to_bfl else bfl_tensor_to_diffusers)(bfl_name, tensor)
    if unknown:
        raise ValueError(
            f"{len(unknown)} tensor name(s) are not {src}-named FLUX.2 VAE tensors (e.g. {unknown[:6]}); "
            f"names must be VAE-local ({'encoder.down_blocks.0...' if to_bfl else 'encoder.down.0...'})"
        )
    return out


def bfl_to_diffusers(state: Mapping[str, Tensor], num_up_blocks: int | None = None) -> dict[str, Tensor]:
    """A BFL-named FLUX.2 VAE state dict in diffusers' ``AutoencoderKLFlux2`` naming.

    ``num_up_blocks`` (decoder levels) is read from the names when not given. Raises naming any
    tensor that is no BFL VAE name, and if two names would land on one.
    """
    return _convert(state, to_bfl=False, num_up_blocks=num_up_blocks)


def diffusers_to_bfl(state: Mapping[str, Tensor], num_up_blocks: int | None = None) -> dict[str, Tensor]:
    """The exact inverse of :func:`bfl_to_diffusers`: an ``AutoencoderKLFlux2`` state dict in BFL naming."""
    return _convert(state, to_bfl=True, num_up_blocks=num_up_blocks)


# ---------------------------------------------------------------------------------------------
# Folder conversion
def _read_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """``AutoencoderKLFlux2`` keywords: {} (the FLUX.2 defaults), a dict, or a JSON file / folder."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return {k: v for k, v in config.items() if not k.startswith("_")}
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no VAE config at {path}")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _weights_file(src: str | Path) -> Path:
    path = Path(src)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no BFL VAE weights at {path}")
    files = sorted(p for ext in ("*.safetensors", "*.sft") for p in path.glob(ext))
    if len(files) != 1:
        raise FileNotFoundError(
            f"{path}: expected exactly one .safetensors/.sft file of BFL VAE weights, "
            f"found {[f.name for f in files]}"
        )
    return files[0]


def meta_autoencoder(**kwargs: Any):
    """``AutoencoderKLFlux2(**kwargs)`` on the meta device: names and shapes, no memory."""
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        return AutoencoderKLFlux2(**kwargs)


def check_against(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], what: str) -> None:
    """Raise naming missing, unexpected and mis-shaped tensors of ``state`` against ``reference``."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
        for k in set(state) & set(reference)
        if tuple(state[k].shape) != tuple(reference[k].shape)
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what}: {len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:5]}), {len(shapes)} of another shape (e.g. {shapes[:3]})"
        )


def bfl_state_to_diffusers_folder(
    bfl_state: Mapping[str, Tensor], dst: str | Path, config: Mapping[str, Any] | str | Path | None = None
) -> Path:
    """Write a BFL-named VAE state dict as a diffusers ``AutoencoderKLFlux2`` folder (see the module doc).

    A state without ``bn.num_batches_tracked`` (BFL's files) gets a zero counter; one without the
    quant convs gets ``use_quant_conv`` / ``use_post_quant_conv`` = False, as diffusers' converter
    would. The result is checked against the config's model (names and shapes) before writing.
    """
    from safetensors.torch import save_file

    kwargs = _read_config(config)
    state = bfl_to_diffusers(bfl_state)
    if "bn.running_mean" in state and "bn.num_batches_tracked" not in state:
        state["bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if "quant_conv.weight" not in state:
        kwargs.setdefault("use_quant_conv", False)
    if "post_quant_conv.weight" not in state:
        kwargs.setdefault("use_post_quant_conv", False)
    model = meta_autoencoder(**kwargs)
    check_against(state, model.state_dict(), "BFL VAE weights vs the AutoencoderKLFlux2 config")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_config(dst)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / DIFFUSERS_WEIGHTS), {"format": "pt"})
    return dst


def convert_bfl_vae_folder(
    src: str | Path, dst: str | Path, config: Mapping[str, Any] | str | Path | None = None
) -> Path:
    """A BFL-named FLUX.2 VAE safetensors file (or a folder holding one) -> a diffusers folder at ``dst``.

    ``config``: ``AutoencoderKLFlux2`` keywords (a dict, a ``config.json`` or a folder with one);
    None means diffusers' defaults, which are FLUX.2's VAE. Returns ``dst``, which
    ``AutoencoderKLFlux2.from_pretrained`` and the kit's ``vae`` ``pretrained`` flavor read.
    """
    from safetensors.torch import load_file

    return bfl_state_to_diffusers_folder(load_file(str(_weights_file(src))), dst, config)
