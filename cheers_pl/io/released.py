"""The authors' released Cheers checkpoint <-> the kit's :class:`~cheers_pl.model.CheersModel`.

A released folder is ``config.json`` + safetensors shards (+ ``model.safetensors.index.json``).
What goes where is :mod:`cheers_pl.io.released_names` (one table of name rules, and the two
tensors whose channel order the release packs differently); the spec is derived from
``config.json`` by :mod:`cheers_pl.io.released_config`. This module converts, tensor by tensor
with a report, in both directions.

BFL keeps the quant convs inside the encoder/decoder (``encoder.quant_conv``,
``decoder.post_quant_conv``), so every kit tensor has a released counterpart: at paper size both
sides have 1321 tensors (the LLM's 339 count ``lm_head`` and ``embed_tokens`` separately; the two
BatchNorms' ``num_batches_tracked`` are included). Tensors a release may lack are filled and
reported: the tied LM head / embedding from each other (both saved: checked equal), a BatchNorm
counter with 0, a missing quant conv with the identity (what diffusers' ``use_quant_conv=False``
computes), the pixel decoder's post-quant conv and statistics from the frozen VAE's (D is a copy
of it), and an absent SigLIP pooling head (unused, frozen) from the model's initialisation.

Entry points: :func:`released_to_kit` / :func:`kit_to_released` (state dicts),
:func:`load_released` (a released folder -> a loaded CheersModel), :func:`write_kit_weights`
(released folder -> converted kit folder), :func:`write_released_folder` (a kit model folder ->
released folder) and :func:`main` (``cheers convert``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cheers_pl.io.integrity import seal
from cheers_pl.io.released_config import SPEC_KEY, read_released_config, spec_from_released_config
from cheers_pl.io.released_names import (
    EMBED,
    LM_HEAD,
    RULES,
    SIGLIP_HEAD,
    Rule,
    kit_name_to_released,
    kit_tensor_to_released,
    levels_of,
    released_name_to_kit,
    released_tensor_to_kit,
)
from cheers_pl.io.safetensors_folder import (
    INDEX_FILE,
    read_safetensors_folder,
    save_safetensors_folder,
    unshared,
)

KIT_WEIGHTS = "model.safetensors"
KIT_SPEC = "cheers_spec.json"
KIT_REPORT = "conversion_report.json"
RELEASED_CONFIG = "released_config.json"  # the source config.json, kept for the way back
RELEASED_INDEX = "released_index.json"  # the source shards' weight map, kept for the way back
__all__ = [
    "EMBED", "INDEX_FILE", "KIT_SPEC", "KIT_WEIGHTS", "LM_HEAD", "RULES", "SIGLIP_HEAD", "SPEC_KEY",
    "ConversionReport", "Rule", "kit_name_to_released", "kit_to_released", "load_released",
    "read_released_config", "read_safetensors_folder", "released_name_to_kit", "released_to_kit",
    "save_released_folder", "spec_from_released_config", "write_kit_weights", "write_released_folder",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Report
@dataclass
class ConversionReport:
    """What a conversion did, tensor by tensor.

    Attributes:
        mapped: (released name, kit name) of every tensor carried over.
        filled: (kit name, how) of every kit tensor the release has no tensor for.
        unmapped: released names with no place in the kit (leftovers on the released side).
        missing: kit names (of the reference model) that got no tensor (leftovers on the kit side).
        unexpected: kit names a released tensor mapped to that the reference model does not have.
        mismatched: "kit name: released shape vs kit shape" where the shapes differ.
        problems: other errors (a saved-twice LM head that differs from the embedding).
        notes: remarks (config keys ignored, checks skipped).
    """

    mapped: list[tuple[str, str]] = field(default_factory=list)
    filled: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.unexpected or self.mismatched or self.problems)

    def error(self) -> str:
        """One message naming the leftovers (a few of each kind)."""
        total = len(self.mapped) + len(self.unmapped)
        parts = []
        if self.unmapped and not self.mapped:
            parts.append(
                f"none of its {total} tensors has a released Cheers name; is this a Cheers checkpoint? "
                f"Unexpected keys, e.g. {self.unmapped[:6]}"
            )
        elif self.unmapped:
            parts.append(
                f"{len(self.unmapped)} of {total} released tensors have no place in the kit "
                f"(unexpected keys, e.g. {self.unmapped[:6]})"
            )
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} tensors map to kit names this model does not have "
                f"(e.g. {self.unexpected[:6]}; is the spec the checkpoint's?)"
            )
        if self.missing:
            parts.append(
                f"{len(self.missing)} kit tensors are missing from the checkpoint (e.g. {self.missing[:6]})"
            )
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} tensors have another shape (e.g. {self.mismatched[:4]})")
        parts += self.problems
        return "released checkpoint does not fit: " + "; ".join(parts)

    def summary(self) -> str:
        lines = [
            f"mapped {len(self.mapped)} released tensors to kit names; filled {len(self.filled)}",
            f"leftovers: {len(self.unmapped)} released unmapped, {len(self.missing)} kit missing, "
            f"{len(self.unexpected)} kit unexpected, {len(self.mismatched)} shape mismatches",
        ]
        lines += [f"  filled {name}: {how}" for name, how in self.filled]
        for label, names in (
            ("unmapped", self.unmapped),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
        ):
            if names:
                lines.append(f"  {label}: {names[:10]}{' ...' if len(names) > 10 else ''}")
        lines += [f"  shape: {m}" for m in self.mismatched[:10]]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# State-dict mapping
def _identity_conv(channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(channels, dtype=like.dtype, device=like.device).reshape(channels, channels, 1, 1)
    return eye, torch.zeros(channels, dtype=like.dtype, device=like.device)


def _fill(kit: dict[str, Tensor], report: ConversionReport, reference, tied: bool) -> None:
    """Add what a release may lack (see the module docstring); every fill goes into the report."""

    def wanted(name: str) -> bool:
        return name not in kit and (reference is None or name in reference)

    def put(name: str, tensor: Tensor, how: str) -> None:
        kit[name] = tensor
        report.filled.append((name, how))

    if tied:
        if EMBED in kit and LM_HEAD in kit:
            a, b = kit[EMBED], kit[LM_HEAD]
            if a.is_meta or b.is_meta:
                report.notes.append("lm_head and embed_tokens both saved; not compared (meta tensors)")
            elif a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
                report.problems.append(
                    "lm_head.weight differs from model.language_model.embed_tokens.weight but the LLM "
                    "ties them (tie_word_embeddings=True); load it untied (llm override "
                    "tie_word_embeddings=False) or check the checkpoint"
                )
            else:
                report.notes.append("lm_head and embed_tokens both saved and equal (tied)")
        elif EMBED in kit and wanted(LM_HEAD):
            put(LM_HEAD, kit[EMBED], "tied: the LM head is the token embedding (saved once)")
        elif LM_HEAD in kit and wanted(EMBED):
            put(EMBED, kit[LM_HEAD], "tied: the token embedding is the LM head (saved once)")

    for bn in ("vae.vae.bn.", "pixel_decoder.bn."):
        if bn + "running_mean" in kit and wanted(bn + "num_batches_tracked"):
            put(
                bn + "num_batches_tracked",
                torch.zeros((), dtype=torch.long),
                "0 (BatchNorm counter, unused in eval)",
            )

    conv_out, conv_in = "vae.vae.encoder.conv_out.weight", "vae.vae.decoder.conv_in.weight"
    for conv, src, dim in (("vae.vae.quant_conv", conv_out, 0), ("vae.vae.post_quant_conv", conv_in, 1)):
        if src in kit and wanted(conv + ".weight") and wanted(conv + ".bias"):
            w, b = _identity_conv(kit[src].shape[dim], kit[src])
            put(conv + ".weight", w, "identity 1x1 conv (the release has none: use_quant_conv=False)")
            put(conv + ".bias", b, "zero (identity quant conv)")

    if any(k.startswith("pixel_decoder.decoder.") for k in kit):
        for local in ("post_quant_conv.weight", "post_quant_conv.bias") + tuple(
            f"bn.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")
        ):
            src = "vae.vae." + local
            if src in kit and wanted("pixel_decoder." + local):
                put("pixel_decoder." + local, kit[src], f"copied from {src} (D starts as the VAE's decoder)")

    if reference is not None:
        for name in reference:
            if name.startswith(SIGLIP_HEAD) and wanted(name):
                put(name, reference[name], "the model's initialisation (SigLIP pooling head: unused, frozen)")


def released_to_kit(
    state: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | None = None,
    strict: bool = True,
    tied: bool = True,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """A released-layout state dict -> (CheersModel state dict, report).

    Args:
        state: released names -> tensors (DESIGN section 7).
        reference: the target model's state dict (meta tensors are fine): with it, kit names it
            lacks, names it has that got no tensor, and shape mismatches are leftovers too, and
            an absent SigLIP pooling head is filled from it.
        strict: raise ``ValueError`` naming the leftovers (otherwise they are only reported).
        tied: the LLM ties ``lm_head`` to ``embed_tokens`` (a tensor saved once fills the other;
            saved twice, they must be equal).
    """
    report = ConversionReport()
    levels = levels_of(state, "released")
    kit: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in state.items():
        try:
            new = released_name_to_kit(name, levels)
        except ValueError:
            new = None
        if new is None:
            report.unmapped.append(name)
            continue
        if new in kit:
            raise ValueError(f"released names {origin[new]!r} and {name!r} both map to {new!r}")
        kit[new] = released_tensor_to_kit(name, new, tensor)
        origin[new] = name
        report.mapped.append((name, new))
    _fill(kit, report, reference, tied)
    if reference is not None:
        report.missing = sorted(set(reference) - set(kit))
        report.unexpected = sorted(set(kit) - set(reference))
        report.mismatched = sorted(
            f"{k}: {tuple(kit[k].shape)} vs {tuple(reference[k].shape)}"
            for k in set(kit) & set(reference)
            if tuple(kit[k].shape) != tuple(reference[k].shape)
        )
    report.unmapped.sort()
    if strict and not report.ok:
        raise ValueError(report.error())
    return kit, report


def kit_to_released(kit_state: Mapping[str, Tensor], lm_head: bool = True) -> dict[str, Tensor]:
    """A CheersModel state dict in the released layout (the inverse of :func:`released_to_kit`).

    ``lm_head=False`` saves the tied LM head once (only ``embed_tokens``); the release saves both.
    Raises naming any kit tensor the released layout has no place for (e.g. the latent-mode patch
    embedding of the TUNA-style ablation).
    """
    levels = levels_of(kit_state, "kit")
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    for name, tensor in kit_state.items():
        if name == LM_HEAD and not lm_head:
            continue
        new = kit_name_to_released(name, levels)
        if new is None:
            unknown.append(name)
            continue
        if new in out:
            raise ValueError(f"kit names {origin[new]!r} and {name!r} both map to released {new!r}")
        out[new] = kit_tensor_to_released(name, new, tensor)
        origin[new] = name
    if unknown:
        raise ValueError(
            f"{len(unknown)} kit tensors have no place in the released layout (e.g. {unknown[:6]}); "
            "only the released architecture (hfi gated or none, pixel_reconstruct='decode') converts"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Files
def _tied(spec) -> bool:
    return bool(getattr(spec.resolve().llm, "tie_word_embeddings", True))


def load_released(path: str | Path, dtype: torch.dtype | None = None, strict: bool = True):
    """A released Cheers folder -> (CheersModel in eval mode with its weights, ConversionReport).

    Reads ``config.json`` (:func:`spec_from_released_config`), all safetensors shards, converts
    the names (:func:`released_to_kit`, against the model's own state dict) and loads strictly.
    ``dtype`` casts the model after loading (default: the kit's float32).
    """
    from cheers_pl.model import CheersModel

    spec, notes = spec_from_released_config(read_released_config(path))
    state = read_safetensors_folder(path)
    model = CheersModel(spec)
    kit, report = released_to_kit(state, reference=model.state_dict(), strict=strict, tied=_tied(spec))
    report.notes = notes + report.notes
    model.load_state_dict(kit, strict=strict)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), report


def load_released_folder(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    """A released Cheers folder -> a loaded :class:`~cheers_pl.model.CheersModel` (:func:`load_released`)."""
    return load_released(path, dtype)[0]


def convert_released_state(path: str | Path, strict: bool = True):
    """(kit state dict, spec, report) of a released folder without building the model's weights.

    The names and shapes are checked against the spec's model built on the meta device; only an
    absent SigLIP pooling head (if any) is built for real, to fill it.
    """
    from cheers_pl import registry
    from cheers_pl.model import CheersModel

    spec, notes = spec_from_released_config(read_released_config(path))
    state = read_safetensors_folder(path)
    with torch.device("meta"):
        reference = CheersModel(spec).state_dict()
    kit, report = released_to_kit(state, reference=reference, strict=strict, tied=_tied(spec))
    report.notes = notes + report.notes
    if any(v.is_meta for v in kit.values()):
        resolved = spec.resolve()
        vit = (
            registry.get("semantic_encoder", spec.semantic_encoder.flavor)
            .build(resolved.semantic_encoder)
            .vit
        )
        real = {"semantic_encoder.vit." + k: v for k, v in vit.state_dict().items()}
        kit = {k: (real[k] if v.is_meta else v) for k, v in kit.items()}
    return kit, spec, report


def _cast(state: Mapping[str, Tensor], dtype: str) -> dict[str, Tensor]:
    if dtype == "keep":
        return dict(state)
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def write_kit_weights(src: str | Path, out: str | Path, dtype: str = "keep", strict: bool = True):
    """Convert a released folder into kit weights at ``out``; returns the report.

    ``out`` a folder: ``model.safetensors`` (kit names), ``cheers_spec.json`` (the spec as a dict,
    ``CheersSpec(**json)`` rebuilds it) and ``conversion_report.json``. ``out`` ending in ``.pt`` or
    ``.ckpt``: one torch file ``{"state_dict": {"model." + name: tensor}, "cheers_spec": ...}``,
    which :func:`cheers_pl.stages.weights.read_state_dict` reads.
    """
    from safetensors.torch import save_file

    kit, spec, report = convert_released_state(src, strict)
    kit = _cast(kit, dtype)
    spec_dict = dataclasses.asdict(spec)
    out = Path(out)
    if out.suffix in (".pt", ".ckpt"):
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"state_dict": {"model." + k: v for k, v in kit.items()}, "cheers_spec": spec_dict}
        torch.save(seal({**payload, "conversion_report": report.to_dict()}), out)  # with its integrity hash
        return report
    out.mkdir(parents=True, exist_ok=True)
    save_file(unshared(kit), str(out / KIT_WEIGHTS), {"format": "pt"})
    (out / KIT_SPEC).write_text(json.dumps(spec_dict, indent=2))
    (out / KIT_REPORT).write_text(json.dumps(report.to_dict(), indent=1))
    (out / RELEASED_CONFIG).write_text(json.dumps(read_released_config(src), indent=4))
    index = Path(src) / INDEX_FILE
    if index.is_file():
        (out / RELEASED_INDEX).write_text(index.read_text())
    return report


def save_released_folder(
    state: Mapping[str, Tensor], folder: str | Path, config: Mapping[str, Any], num_shards: int = 1
) -> Path:
    """Write a released-layout state dict as ``num_shards`` safetensors shards + index json + ``config``."""
    return save_safetensors_folder(state, folder, config, num_shards)


def write_released_folder(model_path: str | Path, out: str | Path, config: Mapping[str, Any] | None = None):
    """A kit model (any format :func:`~cheers_pl.io.export.load_any` reads) -> a released folder at ``out``.

    The tensors are :func:`kit_to_released` of the model's, in the dtypes they were saved in. A
    converted folder (``cheers convert SRC``) keeps its source's ``config.json`` and shard layout,
    so converting it back writes the same shards: the same names in the same files, every tensor
    bit for bit, and nothing the conversion only filled in (its report's ``filled``). Any other
    model needs ``config`` (the released ``config.json`` to write).
    """
    from cheers_pl.io.export import load_any

    model_path, out = Path(model_path), Path(out)
    model = load_any(model_path)
    state = kit_to_released(model.state_dict())
    weight_map = None
    if model_path.is_dir() and (model_path / RELEASED_CONFIG).is_file():
        config = config or json.loads((model_path / RELEASED_CONFIG).read_text())
        filled = json.loads((model_path / KIT_REPORT).read_text()).get("filled", [])
        for kit_name, _ in filled:
            state.pop(kit_name_to_released(kit_name, levels_of(model.state_dict(), "kit")) or "", None)
        if (model_path / RELEASED_INDEX).is_file():
            weight_map = json.loads((model_path / RELEASED_INDEX).read_text())["weight_map"]
    if config is None:
        raise ValueError(
            f"{model_path} records no released config.json (not a converted folder); pass config="
        )
    if weight_map is None:
        return save_safetensors_folder(state, out, config)
    return save_safetensors_folder(state, out, config, weight_map=weight_map)


# ---------------------------------------------------------------------------------------------
# CLI
def build_parser() -> argparse.ArgumentParser:
    from cheers_pl.cli_help import make_parser

    parser = make_parser(
        "cheers convert",
        "Convert the released Cheers checkpoint (SRC: config.json + safetensors shards) into "
        "kit weights, and/or the SigLIP2 / Qwen2.5 / FLUX.2-VAE releases into stage-I folders.",
    )
    parser.add_argument("src", nargs="?", help="released Cheers folder")
    parser.add_argument("--out", required=True, help="output folder (or CKPT.pt for a torch file)")
    parser.add_argument(
        "--to-released",
        metavar="MODEL",
        help="the other way: a kit model (converted or exported folder, stage .ckpt) -> a released "
        "folder at --out; a model that is no converted folder needs --released-config",
    )
    parser.add_argument("--released-config", help="the config.json to write with --to-released")
    parser.add_argument(
        "--dtype",
        default="keep",
        choices=["keep", "bfloat16", "float32"],
        help="dtype of the written weights (keep: the released one)",
    )
    parser.add_argument("--allow-leftovers", action="store_true", help="report leftovers instead of failing")
    parser.add_argument("--siglip", help="SigLIP2 checkpoint folder -> OUT/siglip")
    parser.add_argument("--qwen", help="Qwen2.5 folder -> OUT/qwen")
    parser.add_argument("--vae", help="FLUX.2 VAE in BFL naming (file or folder) -> OUT/vae")
    parser.add_argument("--vae-config", help="AutoencoderKLFlux2 config.json (default: FLUX.2's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``cheers convert SRC --out DIR``; ``--to-released MODEL``; ``--siglip/--qwen/--vae`` (components)."""
    from cheers_pl.io.components import convert_components

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to_released is not None:
        config = json.loads(Path(args.released_config).read_text()) if args.released_config else None
        try:
            write_released_folder(args.to_released, args.out, config)
        except (ValueError, OSError) as err:
            parser.exit(2, f"cheers convert: error: {err}\n")
        print(f"wrote the released layout of {args.to_released} to {args.out}")
        return 0
    components = (args.siglip, args.qwen, args.vae)
    if args.src is None and all(c is None for c in components):
        parser.error("give SRC (a released Cheers folder) and/or --siglip/--qwen/--vae")
    try:
        if args.src is not None:
            report = write_kit_weights(args.src, args.out, args.dtype, strict=not args.allow_leftovers)
            print(report.summary())
            print(f"wrote kit weights to {args.out}")
        if any(c is not None for c in components):
            out = Path(args.out) if args.src is None else Path(args.out) / "components"
            folders = convert_components(*components, out=out, vae_config=args.vae_config)
    except OSError as err:  # a missing or unreadable folder or file: one line naming it
        parser.exit(2, f"cheers convert: error: {err}\n")
    if any(c is not None for c in components):
        for name in ("siglip", "qwen", "vae"):
            if getattr(folders, name) is not None:
                print(f"{name}: {getattr(folders, name)}")
        for note in folders.notes:
            print(f"note: {note}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
