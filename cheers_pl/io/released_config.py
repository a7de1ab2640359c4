"""A released Cheers ``config.json`` -> the kit's :class:`~cheers_pl.spec.CheersSpec`.

The released config alone determines the model; every size is derived from it as the released
code derives it (``modeling_umm.UMMModel.__init__``), with the released config classes' defaults
(``configuration_umm.py``) for a key a config leaves out:

    text_config                     -> llm overrides (Qwen2)
    vision_representation_config    -> semantic_encoder overrides (SigLIP vision tower)
    vae_encoder_config              -> vae: block_out_channels = ch * ch_mult, layers_per_block =
    vae_decoder_config                 num_res_blocks, latent_channels = z_channels;
                                       decoder_block_out_channels = the decoder's ch * ch_mult
    projector                       <- vision_hidden = SigLIP width, llm_hidden = LLM width
    cfm_head                        <- width_a = LLM width, heads_a / kv_heads_a = the LLM's heads /
                                       KV heads; width_b = SigLIP width, heads_b = SigLIP heads,
                                       kv_heads_b = the LLM's KV heads; out_channels = decoder ch;
                                       depths 7 and 3 (fixed in the released code)

A kit extension, the optional key ``"cheers_pl_spec"``, holds CheersSpec fields (components as
``{"flavor", "path", "overrides"}``) that take precedence: it is how a checkpoint of another
size can say which flavors it was built from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPEC_KEY = "cheers_pl_spec"
_META_KEYS = {
    "model_type",
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "auto_map",
}
# configuration_umm.VAEEncoderConfig / VAEDecoderConfig defaults (FLUX.2's autoencoder)
VAE_DEFAULTS = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 32}
VAE_KEYS = {"resolution", "in_channels", "out_ch", *VAE_DEFAULTS}
_WIDTHS = {"cfm_head": ("width_a", "width_b")}  # the head sizes applied over a named flavor too


def read_released_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a released Cheers folder)")
    return json.loads(path.read_text())


def _text_overrides(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if key in _META_KEYS:
            continue
        if key == "rope_theta":  # transformers 4.x spelling
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": float(value)}
        else:
            out[key] = value
    return out


def _vision_overrides(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k not in _META_KEYS and k != "num_patches"}
    if "num_patches" in cfg and "image_size" in cfg and "patch_size" in cfg:
        derived = (cfg["image_size"] // cfg["patch_size"]) ** 2
        if derived != cfg["num_patches"]:
            raise ValueError(
                f"vision_representation_config: num_patches={cfg['num_patches']} but "
                f"(image_size / patch_size)^2 = {derived}"
            )
    if "model_type" in cfg:
        notes.append(
            f"vision_representation_config.model_type={cfg['model_type']!r} read as a SigLIP vision tower"
        )
    return out


def _vae_part(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    given = {k: v for k, v in (config.get(key) or {}).items() if k not in _META_KEYS}
    unknown = sorted(set(given) - VAE_KEYS)
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; the released VAE config has {sorted(VAE_KEYS)}")
    return {**VAE_DEFAULTS, **given}


def vae_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoencoderKLFlux2`` keywords of the released VAE configs (see the module docstring)."""
    enc, dec = _vae_part(config, "vae_encoder_config"), _vae_part(config, "vae_decoder_config")
    for key in ("num_res_blocks", "z_channels"):
        if enc[key] != dec[key]:
            raise ValueError(
                f"vae_encoder_config.{key}={enc[key]} but vae_decoder_config.{key}={dec[key]}; "
                "the kit's AutoencoderKLFlux2 has one value for both"
            )
    if len(enc["ch_mult"]) != len(dec["ch_mult"]):
        raise ValueError(
            f"vae_encoder_config.ch_mult={enc['ch_mult']} and vae_decoder_config.ch_mult={dec['ch_mult']} "
            "have different numbers of levels"
        )
    levels = len(enc["ch_mult"])
    out: dict[str, Any] = {
        "block_out_channels": [enc["ch"] * m for m in enc["ch_mult"]],
        "layers_per_block": enc["num_res_blocks"],
        "latent_channels": enc["z_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }
    decoder = [dec["ch"] * m for m in dec["ch_mult"]]
    if decoder != out["block_out_channels"]:
        out["decoder_block_out_channels"] = decoder
    for released_key, kit_key, part in (("in_channels", "in_channels", enc), ("out_ch", "out_channels", dec)):
        if released_key in part and part[released_key] != 3:
            out[kit_key] = part[released_key]
    return out


def head_overrides(text: Mapping[str, Any], vision: Mapping[str, Any], config: Mapping[str, Any]):
    """CFM head sizes as ``UMMModel.__init__`` derives them from the text and vision configs."""
    derived = {
        "width_a": text.get("hidden_size"),
        "heads_a": text.get("num_attention_heads"),
        "kv_heads_a": text.get("num_key_value_heads"),
        "width_b": vision.get("hidden_size"),
        "heads_b": vision.get("num_attention_heads"),
        "kv_heads_b": text.get("num_key_value_heads"),  # the released code takes the LLM's KV heads
        "out_channels": _vae_part(config, "vae_decoder_config")["ch"],
        "depth_a": 7,
        "depth_b": 3,
    }
    return {k: v for k, v in derived.items() if v is not None}


def spec_from_released_config(config: Mapping[str, Any]):
    """The kit's :class:`~cheers_pl.spec.CheersSpec` for a released ``config.json``; returns (spec, notes).

    Paper flavors with the sizes of the module docstring as overrides, ``compat="released"``.
    """
    from cheers_pl.spec import COMPONENT_FIELDS, CheersSpec, ComponentSpec

    notes: list[str] = []
    extra = dict(config.get(SPEC_KEY) or {})
    text = _text_overrides(config.get("text_config") or {})
    vision = _vision_overrides(config.get("vision_representation_config") or {}, notes)
    th, vh = text.get("hidden_size"), vision.get("hidden_size")
    derived: dict[str, dict[str, Any]] = {
        "llm": text,
        "semantic_encoder": vision,
        "vae": vae_overrides(config),
        "projector": {k: v for k, v in (("vision_hidden", vh), ("llm_hidden", th)) if v is not None},
        "cfm_head": head_overrides(text, vision, config),
    }
    parts = {}
    for name in COMPONENT_FIELDS:
        given = extra.pop(name, None)
        comp = ComponentSpec(**given) if isinstance(given, Mapping) else (given or ComponentSpec("paper"))
        if comp.flavor == "pretrained":
            if derived.get(name):
                notes.append(f"{name}: flavor 'pretrained' reads its own config; released sizes not applied")
        else:
            sizes = derived.get(name, {})
            if given is not None:  # a flavor the extension names keeps its own VAE and head layout
                keep = _WIDTHS.get(name)
                sizes = {} if name == "vae" else {k: v for k, v in sizes.items() if keep is None or k in keep}
            comp = ComponentSpec(comp.flavor, comp.path, {**sizes, **comp.overrides})
        parts[name] = comp
    extra.setdefault("compat", "released")
    return CheersSpec(**parts, **extra), notes
