"""Name and tensor rules between the released Cheers layout and the kit's CheersModel.

One table of prefix rules (DESIGN section 7), released prefix -> kit prefix; the rest of the name
is the same except inside the two VAE groups, which are in BFL's FLUX.2 naming there and
diffusers' naming in the kit (:mod:`cheers_pl.io.bfl_vae`: attention 1x1-conv weights reshaped to
Linear weights)::

    lm_head.                                   llm.model.lm_head.       (tied to embed_tokens)
    model.language_model.                      llm.model.model.
    model.vision_representation.               semantic_encoder.vit.
    model.vae_model.                 (BFL)     vae.vae.                 (diffusers)
    model.vae_decoder_projector.     (BFL)     pixel_decoder.           (decoder.*, bn.*; BFL's
                                               decoder.post_quant_conv is pixel_decoder.post_quant_conv)
    model.und_projector.                       projector.
    model.time_embed.                          cfm_head.time_embed.
    model.gen_projector.diffusion_head_a.N.    cfm_head.stage_a_blocks.N.
    model.gen_projector.diffusion_head_b.      cfm_head.stage_a_final.
    model.hi_gate.                             cfm_head.hfi_gate.
    model.hi_projector.diffusion_head_a.N.     cfm_head.stage_b_blocks.N.
    model.hi_projector.diffusion_head_b.       cfm_head.stage_b_final.

Two tensors change their channel order on the way (:data:`CHANNEL_ORDER`). The release packs a
2x2 space-to-channel as channel ``q*D + c`` (q = 2*dy + dx, D the per-position width: ``unfold``
then ``permute``); PyTorch's ``F.pixel_unshuffle`` / ``nn.PixelShuffle``, which the kit's modules
use, pack ``c*4 + q``. So the projector's first Linear reads its input columns, and stage A's final
Linear writes its output rows, in another order: the converter permutes them, both ways, and the
kit's modules keep PyTorch's order for the models the kit trains itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from cheers_pl.io import bfl_vae

EMBED = "llm.model.model.embed_tokens.weight"
LM_HEAD = "llm.model.lm_head.weight"
SIGLIP_HEAD = "semantic_encoder.vit.head."


@dataclass(frozen=True)
class Rule:
    """A released prefix <-> a kit prefix; ``vae``: a group in BFL (released) / diffusers (kit) naming."""

    released: str
    kit: str
    vae: str | None = None  # "vae" (the whole autoencoder) or "pixel" (decoder + bn only)


RULES: tuple[Rule, ...] = (
    Rule("lm_head.", "llm.model.lm_head."),
    Rule("model.language_model.", "llm.model.model."),
    Rule("model.vision_representation.", "semantic_encoder.vit."),
    Rule("model.vae_model.", "vae.vae.", "vae"),
    Rule("model.vae_decoder_projector.", "pixel_decoder.", "pixel"),
    Rule("model.und_projector.", "projector."),
    Rule("model.time_embed.", "cfm_head.time_embed."),
    Rule("model.gen_projector.diffusion_head_a.", "cfm_head.stage_a_blocks."),
    Rule("model.gen_projector.diffusion_head_b.", "cfm_head.stage_a_final."),
    Rule("model.hi_gate.", "cfm_head.hfi_gate."),
    Rule("model.hi_projector.diffusion_head_a.", "cfm_head.stage_b_blocks."),
    Rule("model.hi_projector.diffusion_head_b.", "cfm_head.stage_b_final."),
)
# kit name -> the dimension whose 2x2-packed channels are in the release's q*D + c order
CHANNEL_ORDER: dict[str, int] = {
    "projector.mlp.0.weight": 1,  # input columns: the unshuffled SigLIP features
    "cfm_head.stage_a_final.linear.weight": 0,  # output rows: read by the stage A -> B PixelShuffle
    "cfm_head.stage_a_final.linear.bias": 0,
}
PACKED = 4  # 2x2 positions per packed channel group

# VAE-local names each group may hold: BFL side (released) and diffusers side (kit)
_GROUP_BFL = {"vae": ("encoder.", "decoder.", "bn."), "pixel": ("decoder.", "bn.")}
_GROUP_DIFFUSERS = {
    "vae": ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn."),
    "pixel": ("decoder.", "post_quant_conv.", "bn."),
}


def _rule_for(name: str, side: str) -> Rule | None:
    for rule in sorted(RULES, key=lambda r: -len(getattr(r, side))):
        if name.startswith(getattr(rule, side)):
            return rule
    return None


def released_name_to_kit(name: str, levels: Mapping[str, int | None] | None = None) -> str | None:
    """The kit name of one released name, or None. ``levels``: decoder levels per VAE group."""
    rule = _rule_for(name, "released")
    if rule is None:
        return None
    rest = name[len(rule.released) :]
    if rule.vae is None:
        return rule.kit + rest if rest else None
    if not rest.startswith(_GROUP_BFL[rule.vae]):
        return None
    local = bfl_vae.bfl_name_to_diffusers(rest, (levels or {}).get(rule.vae))
    return None if local is None else rule.kit + local


def kit_name_to_released(name: str, levels: Mapping[str, int | None] | None = None) -> str | None:
    """The released name of one kit name, or None (the inverse of :func:`released_name_to_kit`)."""
    rule = _rule_for(name, "kit")
    if rule is None:
        return None
    rest = name[len(rule.kit) :]
    if rule.vae is None:
        return rule.released + rest if rest else None
    if not rest.startswith(_GROUP_DIFFUSERS[rule.vae]):
        return None
    local = bfl_vae.diffusers_name_to_bfl(rest, (levels or {}).get(rule.vae))
    return None if local is None else rule.released + local


def levels_of(names: Iterable[str], side: str) -> dict[str, int | None]:
    """Decoder levels of each VAE group found in ``names`` (``side`` "released" or "kit")."""
    names = list(names)
    naming = "bfl" if side == "released" else "diffusers"
    return {
        r.vae: bfl_vae.count_up_blocks(
            [n[len(getattr(r, side)) :] for n in names if n.startswith(getattr(r, side))], naming
        )
        for r in RULES
        if r.vae
    }


def _vae_local(name: str, side: str) -> str | None:
    """The VAE-local part of a name inside a VAE group, else None."""
    rule = _rule_for(name, side)
    if rule is None or rule.vae is None:
        return None
    return name[len(rule.released if side == "released" else rule.kit) :]


# -- channel orders ----------------------------------------------------------------------------
def kit_order(n: int) -> Tensor:
    """Index (n,): kit channel ``c*4 + q`` takes released channel ``q*D + c`` (D = n / 4)."""
    d = n // PACKED
    return (torch.arange(PACKED)[None, :] * d + torch.arange(d)[:, None]).reshape(-1)


def released_order(n: int) -> Tensor:
    """Index (n,): released channel ``q*D + c`` takes kit channel ``c*4 + q`` (:func:`kit_order` inverted)."""
    d = n // PACKED
    return (torch.arange(d)[None, :] * PACKED + torch.arange(PACKED)[:, None]).reshape(-1)


def _reorder(kit_name: str, tensor: Tensor, order) -> Tensor:
    dim = CHANNEL_ORDER.get(kit_name)
    if dim is None:
        return tensor
    n = tensor.shape[dim]
    if n % PACKED:
        raise ValueError(
            f"{kit_name}: dimension {dim} of shape {tuple(tensor.shape)} has {n} channels, not 4 (2x2) "
            "packed groups"
        )
    return tensor.index_select(dim, order(n).to(tensor.device))


def released_tensor_to_kit(released_name: str, kit_name: str, tensor: Tensor) -> Tensor:
    """One released tensor as the kit's: BFL attention reshape, the release's channel orders undone."""
    local = _vae_local(released_name, "released")
    if local is not None:
        try:
            tensor = bfl_vae.bfl_tensor_to_diffusers(local, tensor)
        except ValueError as err:
            raise ValueError(f"{released_name}: {err}") from None
    return _reorder(kit_name, tensor, kit_order)


def kit_tensor_to_released(kit_name: str, released_name: str, tensor: Tensor) -> Tensor:
    """One kit tensor in the released layout (the inverse of :func:`released_tensor_to_kit`)."""
    tensor = _reorder(kit_name, tensor, released_order)
    local = _vae_local(released_name, "released")
    if local is not None:
        try:
            tensor = bfl_vae.diffusers_tensor_to_bfl(local, tensor)
        except ValueError as err:
            raise ValueError(f"{kit_name}: {err}") from None
    return tensor
