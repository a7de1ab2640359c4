"""``CheersSpec``: one dataclass that says how to build a :class:`~cheers_pl.model.CheersModel`.

Each component is named by a registry flavor (plus a local ``path`` for ``pretrained`` and
config ``overrides``); the model's modes are plain string fields. :meth:`CheersSpec.resolve`
reads every component's config (no weights) and checks that the sizes agree, so a bad spec
fails before any heavy work, naming the values and the valid choices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from cheers_pl import registry

HFI_MODES = ("gated", "none")
PIXEL_RECONSTRUCT_MODES = ("decode", "latent")
COMPAT_MODES = ("kit", "released")
STAGE_B_ROPE_MODES = ("released", "sequential")
FM_LOSS_IMAGES = ("generation", "all", "every_image")
DUMMY_IMAGE_MODES = ("none", "released")
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

    def __post_init__(self) -> None:
        if not isinstance(self.flavor, str):
            raise ValueError(f"flavor={self.flavor!r} must be a flavor name (a string)")
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise ValueError(f"path={self.path!r} must be a folder path or null")
        if self.overrides is None:
            self.overrides = {}
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides={self.overrides!r} must be a mapping of config field: value")

    def kwargs(self) -> dict[str, Any]:
        return {**self.overrides, **({"path": self.path} if self.path is not None else {})}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"spec.{name}={value!r} is not valid; choose one of {list(choices)}")


def _component(name: str, value: Any) -> ComponentSpec:
    """``value`` (a ComponentSpec or a plain dict from YAML / a saved spec) as a ComponentSpec."""
    if isinstance(value, ComponentSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"spec.{name}={value!r} must be a mapping like {{flavor: tiny}}")
    valid = [f.name for f in fields(ComponentSpec)]
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"spec.{name}: unknown key(s) {unknown}; valid keys are {valid}")
    try:
        return ComponentSpec(**value)
    except ValueError as err:
        raise ValueError(f"spec.{name}.{err}") from None


_MISSING = object()


def _default(cfg: Any, key: str) -> Any:
    kwargs = getattr(cfg, "kwargs", None)  # VAEConfig keeps the diffusers arguments in a dict
    if isinstance(kwargs, dict):
        return kwargs.get(key, _MISSING)
    return getattr(cfg, key, _MISSING)


def _type_fits(default: Any, value: Any) -> bool:
    """Whether an override ``value`` has the type of the flavor's ``default`` (numbers, flags, lists)."""
    if value is None or default is None or default is _MISSING:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def _kind_config(kind: str, comp: ComponentSpec, **extra: Any) -> Any:
    """``registry.config`` of one component; errors name ``spec.<kind>`` and what was wrong.

    Override values are checked against the type of the flavor's own value first (numbers,
    flags, lists), since some config classes store a wrong type silently and fail at build.
    """
    if comp.overrides:
        base = registry.config(kind, comp.flavor, **({"path": comp.path} if comp.path is not None else {}))
        for key, value in comp.overrides.items():
            default = _default(base, key)
            if not _type_fits(default, value):
                raise ValueError(
                    f"spec.{kind}.overrides.{key}={value!r} has the wrong type: the {comp.flavor} flavor's "
                    f"value is {default!r} ({type(default).__name__})"
                )
    try:
        return registry.config(kind, comp.flavor, **{**comp.kwargs(), **extra})
    except TypeError as err:  # a flavor whose config takes only some keys (``pretrained``: path)
        raise ValueError(
            f"spec.{kind}: flavor {comp.flavor!r} does not take {sorted(comp.kwargs())} ({err})"
        ) from None


@dataclass
class CheersSpec:
    """Everything that changes the model; saved in checkpoints so they reload the same variant.

    Attributes:
        vae, semantic_encoder, llm, projector, cfm_head, tokenizer: component flavors.
        hfi: "gated" (the paper's high-frequency injection) or "none" (ablation, Table 5).
        pixel_reconstruct: "decode" (z_t -> D -> SigLIP, the paper) or "latent" (TUNA-style ablation).
        compat: "kit" (clean defaults) or "released" (the authors' released behaviours, DESIGN s.8).
        stage_b_rope: stage-B RoPE layout; None follows ``compat`` ("released" repeats 0..T/2-1 twice).
        fm_loss_images: which positions L_FM regresses, averaged: "generation" (the paper: each
            generation image's own positions); "all" (the released rule: every image, in reading
            order, a generation image at its own positions, the one image of a row without a
            generation image at that row's FIRST T positions, target 0 at t = 1 and z1 - z0 below);
            "every_image" (every image at its own positions, understanding ones with target 0);
            None follows ``compat``.
        dummy_image: "released" prepends one image's projected tokens, causally attended and
            unsupervised, to every row without an image: in training a black image at t = 0
            (which also enters L_FM under "all"), in text-to-image sampling to the conditional and
            the null prefix (given, or uniform noise, encoded clean); "none" (the kit). None
            follows ``compat``.
        fm_weight: lambda in L = L_AR + lambda * L_FM.
        cfg_dropout: probability that a generation sample's prompt becomes ``<no_mean>`` in training.
        system_prompt: the chat template's system turn.
        max_length: a sample's token budget: training skips (or, with ``data.too_long: truncate``,
            cuts) longer samples, and prompts longer than it are refused. Every stage YAML sets
            one; None means no limit of the model's own, but the data loader still skips samples
            over ``data.transforms.MAX_LENGTH_CEILING`` (32768) tokens.
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
    dummy_image: str | None = None
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
        if self.dummy_image is not None:
            _choice("dummy_image", self.dummy_image, DUMMY_IMAGE_MODES)
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"spec.cfg_dropout={self.cfg_dropout} must be in [0, 1]")
        if self.fm_weight < 0:
            raise ValueError(f"spec.fm_weight={self.fm_weight} must be >= 0")
        if self.max_length is not None and (isinstance(self.max_length, bool) or self.max_length < 1):
            raise ValueError(f"spec.max_length={self.max_length!r} must be >= 1 or null (no limit)")
        for name in COMPONENT_FIELDS:  # plain dicts from YAML or a saved spec
            setattr(self, name, _component(name, getattr(self, name)))

    @property
    def resolved_fm_loss_images(self) -> str:
        if self.fm_loss_images is not None:
            return self.fm_loss_images
        return "all" if self.compat == "released" else "generation"

    @property
    def resolved_dummy_image(self) -> str:
        if self.dummy_image is not None:
            return self.dummy_image
        return "released" if self.compat == "released" else "none"

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
        vae_cfg = _kind_config("vae", self.vae)
        vit_cfg = _kind_config("semantic_encoder", self.semantic_encoder)
        llm_cfg = _kind_config("llm", self.llm)
        proj_cfg = _kind_config("projector", self.projector)
        head_cfg = _kind_config(
            "cfm_head", self.cfm_head, hfi=self.hfi, stage_b_rope=self.resolved_stage_b_rope
        )
        tok_cfg = _kind_config("tokenizer", self.tokenizer)
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
                " (2 x 2^(len(vae.block_out_channels) - 1): the VAE, then the 2x2 patchify)",
            ),
            ("projector.vision_hidden", proj.vision_hidden, "semantic_encoder.hidden_size", vit.hidden_size),
            ("projector.llm_hidden", proj.llm_hidden, "llm.hidden_size", llm.hidden_size),
            ("cfm_head.width_a", head.width_a, "llm.hidden_size", llm.hidden_size),
            ("cfm_head.width_b", head.width_b, "semantic_encoder.hidden_size", vit.hidden_size),
            ("cfm_head.out_channels", head.out_channels, "4 x vae.latent_channels", self.latent_channels),
        ]
        for name, value, other, expected, *why in pairs:
            if value != expected:
                raise ValueError(f"spec sizes disagree: {name}={value} but {other}={expected}{''.join(why)}")
        if self.image_size % self.vae_downsample:
            raise ValueError(
                f"spec sizes disagree: semantic_encoder.image_size={self.image_size} is not a multiple of "
                f"the VAE's downsample factor {self.vae_downsample}"
            )
        side = self.latent_side
        if side % proj.unshuffle or side % 2:
            raise ValueError(
                f"spec sizes disagree: token grid {side}x{side} (semantic_encoder.image_size="
                f"{self.image_size} / {self.vae_downsample}) must be divisible by projector.unshuffle="
                f"{proj.unshuffle} and by the 2x2 PixelShuffle"
            )
        if math.isqrt(self.tokens_per_image) ** 2 != self.tokens_per_image:
            raise ValueError(f"{self.tokens_per_image} tokens per image is not a square grid")
