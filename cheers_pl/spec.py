"""``CheersSpec``: one dataclass that says how to build a :class:`~cheers_pl.model.CheersModel`.

Each component is named by a registry flavor (plus a local ``path`` for ``pretrained`` and
config ``overrides``); the model's modes are plain string fields. :meth:`CheersSpec.resolve`
reads every component's config (no weights) and checks that the sizes agree, so a bad spec
fails before any heavy work, naming the values and the valid choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cheers_pl import registry

HFI_MODES = ("gated", "none")
PIXEL_RECONSTRUCT_MODES = ("decode", "latent")
COMPAT_MODES = ("kit", "released")
STAGE_B_ROPE_MODES = ("released", "sequential")
FM_LOSS_IMAGES = ("generation", "all")
COMPONENT_FIELDS = ("vae", "semantic_encoder", "llm", "projector", "cfm_head", "tokenizer")


@dataclass
class ComponentSpec:
    """A registry flavor of one component.

    Attributes:
        flavor: registry flavor name ("tiny", "paper", "pretrained", ...).
        path: local folder for the ``pretrained`` flavor.
        overrides: config fields to change (e.g. ``{"num_hidden_layers": 4}``).
    """

    flavor: str = "paper"
    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {**self.overrides, **({"path": self.path} if self.path is not None else {})}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


@dataclass
class CheersSpec:
    """Everything that changes the model; saved in checkpoints so they reload the same variant.

    Attributes:
        vae, semantic_encoder, llm, projector, cfm_head, tokenizer: component flavors.
        hfi: "gated" (the paper's high-frequency injection) or "none" (ablation, Table 5).
        pixel_reconstruct: "decode" (z_t -> D -> SigLIP, the paper) or "latent" (TUNA-style ablation).
        compat: "kit" (clean defaults) or "released" (the authors' released behaviours, DESIGN s.8).
        stage_b_rope: stage-B RoPE layout; None follows ``compat`` ("released" repeats 0..T/2-1 twice).
        fm_loss_images: which images L_FM averages over: "generation" (the paper) or "all" (the
            released code: every image, understanding ones with target 0); None follows ``compat``.
        fm_weight: lambda in L = L_AR + lambda * L_FM.
        cfg_dropout: probability that a generation sample's prompt becomes ``<no_mean>`` in training.
        system_prompt: the chat template's system turn.
        max_length: longest token sequence a sample may have (None: no limit).
    """

    vae: ComponentSpec = field(default_factory=ComponentSpec)
    semantic_encoder: ComponentSpec = field(default_factory=ComponentSpec)
    llm: ComponentSpec = field(default_factory=ComponentSpec)
    projector: ComponentSpec = field(default_factory=ComponentSpec)
    cfm_head: ComponentSpec = field(default_factory=ComponentSpec)
    tokenizer: ComponentSpec = field(default_factory=ComponentSpec)
    hfi: str = "gated"
    pixel_reconstruct: str = "decode"
    compat: str = "kit"
    stage_b_rope: str | None = None
    fm_loss_images: str | None = None
    fm_weight: float = 1.0
    cfg_dropout: float = 0.2
    system_prompt: str = "You are a helpful assistant."
    max_length: int | None = None

    def __post_init__(self) -> None:
        _choice("hfi", self.hfi, HFI_MODES)
        _choice("pixel_reconstruct", self.pixel_reconstruct, PIXEL_RECONSTRUCT_MODES)
        _choice("compat", self.compat, COMPAT_MODES)
        if self.stage_b_rope is not None:
            _choice("stage_b_rope", self.stage_b_rope, STAGE_B_ROPE_MODES)
        if self.fm_loss_images is not None:
            _choice("fm_loss_images", self.fm_loss_images, FM_LOSS_IMAGES)
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout={self.cfg_dropout} must be in [0, 1]")
        if self.fm_weight < 0:
            raise ValueError(f"fm_weight={self.fm_weight} must be >= 0")
        for name in COMPONENT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, dict):  # from YAML / plain dicts
                setattr(self, name, ComponentSpec(**value))

    @property
    def resolved_fm_loss_images(self) -> str:
        if self.fm_loss_images is not None:
            return self.fm_loss_images
        return "all" if self.compat == "released" else "generation"

    @property
    def resolved_stage_b_rope(self) -> str:
        if self.stage_b_rope is not None:
            return self.stage_b_rope
        return "released" if self.compat == "released" else "sequential"

    # -- presets ----------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **fields: Any) -> CheersSpec:
        """Every component tiny: builds and runs on CPU in well under a second."""
        parts = {name: ComponentSpec("tiny") for name in COMPONENT_FIELDS}
        return cls(**{**parts, **fields})

    @classmethod
    def paper(cls, **fields: Any) -> CheersSpec:
        """The paper's sizes with random weights (Qwen2.5-1.5B, SigLIP2 so400m, FLUX.2 VAE)."""
        return cls(**fields)

    @classmethod
    def pretrained(cls, siglip: str, qwen: str, vae: str, tokenizer: str | None = None, **fields: Any):
        """Stage-I start: three local component folders; the tokenizer defaults to the Qwen folder."""
        t = ComponentSpec
        parts = dict(
            vae=t("pretrained", vae), semantic_encoder=t("pretrained", siglip), llm=t("pretrained", qwen),
            tokenizer=t("pretrained", tokenizer or qwen),
        )  # fmt: skip
        return cls(**{**parts, **fields})

    # -- resolution -------------------------------------------------------------------------
    def resolve(self) -> ResolvedSpec:
        """Read every component config (no weights) and check that their sizes agree."""
        vae_cfg = registry.config("vae", self.vae.flavor, **self.vae.kwargs())
        vit_cfg = registry.config(
            "semantic_encoder", self.semantic_encoder.flavor, **self.semantic_encoder.kwargs()
        )
        llm_cfg = registry.config("llm", self.llm.flavor, **self.llm.kwargs())
        proj_cfg = registry.config("projector", self.projector.flavor, **self.projector.kwargs())
        head_kw = {**self.cfm_head.kwargs(), "hfi": self.hfi, "stage_b_rope": self.resolved_stage_b_rope}
        head_cfg = registry.config("cfm_head", self.cfm_head.flavor, **head_kw)
        tok_cfg = registry.config("tokenizer", self.tokenizer.flavor, **self.tokenizer.kwargs())
        resolved = ResolvedSpec(self, vae_cfg, vit_cfg, llm_cfg, proj_cfg, head_cfg, tok_cfg)
        resolved.check()
        return resolved


@dataclass
class ResolvedSpec:
    """The component configs of a spec, with the sizes derived from them."""

    spec: CheersSpec
    vae: Any
    semantic_encoder: Any
    llm: Any
    projector: Any
    cfm_head: Any
    tokenizer: Any

    @property
    def latent_channels(self) -> int:
        """Channels of z1 after the 2x2 patchify (128 at paper size)."""
        return 4 * self.vae.kwargs.get("latent_channels", 32)

    @property
    def vae_downsample(self) -> int:
        """Pixels per z1 position along a side (16 at paper size: /8 VAE, then 2x2 patchify)."""
        blocks = self.vae.kwargs.get("block_out_channels", (128, 256, 512, 512))
        return 2 ** (len(blocks) - 1) * 2

    @property
    def image_size(self) -> int:
        return self.semantic_encoder.image_size

    @property
    def latent_side(self) -> int:
        """z1 is (B, latent_channels, latent_side, latent_side); also the SigLIP token grid side."""
        return self.image_size // self.vae_downsample

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens per image after the 2x2 pixel-unshuffle (256 at paper size)."""
        return (self.latent_side // self.projector.unshuffle) ** 2

    def check(self) -> None:
        """Raise ``ValueError`` naming both values wherever two components disagree."""
        vit, llm, proj, head = self.semantic_encoder, self.llm, self.projector, self.cfm_head
        pairs = [
            (
                "semantic_encoder.patch_size",
                vit.patch_size,
                "the VAE's downsample factor",
                self.vae_downsample,
            ),
            ("projector.vision_hidden", proj.vision_hidden, "semantic_encoder.hidden_size", vit.hidden_size),
            ("projector.llm_hidden", proj.llm_hidden, "llm.hidden_size", llm.hidden_size),
            ("cfm_head.width_a", head.width_a, "llm.hidden_size", llm.hidden_size),
            ("cfm_head.width_b", head.width_b, "semantic_encoder.hidden_size", vit.hidden_size),
            ("cfm_head.out_channels", head.out_channels, "4 x vae.latent_channels", self.latent_channels),
        ]
        for name, value, other, expected in pairs:
            if value != expected:
                raise ValueError(f"spec sizes disagree: {name}={value} but {other}={expected}")
        if self.image_size % self.vae_downsample:
            raise ValueError(
                f"image size {self.image_size} is not a multiple of the VAE's {self.vae_downsample}"
            )
        side = self.latent_side
        if side % proj.unshuffle or side % 2:
            raise ValueError(
                f"token grid {side}x{side} must be divisible by the 2x2 unshuffle / PixelShuffle"
            )
        if math.isqrt(self.tokens_per_image) ** 2 != self.tokens_per_image:
            raise ValueError(f"{self.tokens_per_image} tokens per image is not a square grid")
