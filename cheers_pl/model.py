"""``CheersModel``: the whole of CHEERS assembled from one :class:`~cheers_pl.spec.CheersSpec`.

Data flow for an image (paper size in brackets):

    x (N,3,512,512) --VAE--> z1 (N,128,32,32);  z_t = t z1 + (1-t) z0
    z_t --D--> pixels --S--> detail (N,1024,1152) --ViT--> features --projector--> (N,256,1536)

The projected tokens replace the image placeholders of the token sequence; the LLM runs with the
mixed mask; text loss on supervised positions; for generation images the LLM hidden states at
their 256 positions go through the cascaded flow-matching head with the HFI detail of the same
z_t, and the predicted velocity is regressed onto z1 - z0.

Batch format (a dict), shared with the data module:
    input_ids (B, L) long, attention_mask (B, L) bool (False = padding), labels (B, L) long
    (-100 = unsupervised), images (N, 3, H, W) float in [0, 1] or absent: one per image span,
    in reading order over the flattened batch. A span of ``<image>`` placeholders is an
    understanding image (t = 1), of ``<image_gen>`` a generation image (t ~ U(0, 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cheers_pl import flow, registry
from cheers_pl.components.llm import IGNORE, image_span_ids, mixed_attention_mask, positions_from_valid
from cheers_pl.components.pixel_decoder import PixelDecoder
from cheers_pl.components.processor import CheersProcessor
from cheers_pl.components.semantic_encoder import SemanticEncoder
from cheers_pl.dummy_image import add_dummy_images, released_fm_positions
from cheers_pl.spec import CheersSpec, ResolvedSpec


@dataclass
class CheersOutput:
    """Losses of one mixed batch. ``gate`` (n_gen, S, S) is the HFI map of each generation image."""

    loss: Tensor
    loss_text: Tensor
    loss_fm: Tensor
    num_text_tokens: Tensor
    num_gen_images: int
    num_und_images: int
    gate: Tensor | None = None
    t: Tensor | None = None
    text_loss_rows: Tensor | None = None  # (B,) summed token losses per sample, detached
    text_count_rows: Tensor | None = None  # (B,) supervised tokens per sample
    v: Tensor | None = None  # (M, C, S, S) the velocity of each regressed image, detached
    target: Tensor | None = None  # (M, C, S, S) its regression target, detached
    logits: Tensor | None = None  # (B, L, V) with ``forward(..., return_logits=True)``


@dataclass
class GenerationOutput:
    """``images`` (B,3,H,W) in [0,1]; ``latents`` (B,C,S,S) = z1; ``gates`` (steps,B,S,S); ``t`` (steps,)."""

    images: Tensor
    latents: Tensor
    gates: Tensor | None = None
    t: Tensor | None = None


@dataclass
class AnswerOutput:
    """``texts``: one answer per question; ``ids``: its generated token ids (L_i,), stop token excluded."""

    texts: list[str]
    ids: list[Tensor]


def build_processor(spec: CheersSpec, resolved: ResolvedSpec | None = None) -> CheersProcessor:
    """The spec's tokenizer and processor alone (cheap: no model weights); checks the vocabulary fits."""
    resolved = resolved or spec.resolve()
    tokenizer = registry.get("tokenizer", spec.tokenizer.flavor).build(resolved.tokenizer)
    if len(tokenizer) > resolved.llm.vocab_size:
        raise ValueError(
            f"spec sizes disagree: the tokenizer has {len(tokenizer)} tokens but llm.vocab_size="
            f"{resolved.llm.vocab_size}"
        )
    return CheersProcessor(
        tokenizer, resolved.tokens_per_image, spec.system_prompt, spec.cfg_dropout, spec.max_length
    )


IDLE_PASS = ("auto", "always", "never")


class CheersModel(nn.Module):
    """CHEERS: unified vision tokenizer + Qwen2 LLM + cascaded flow-matching head.

    ``idle_pass`` (an attribute, not a spec field: it changes no loss or gradient): see
    :meth:`forward`; "auto" (default) runs the idle modules only under torch.distributed.
    """

    idle_pass: str = "auto"

    def __init__(self, spec: CheersSpec | None = None):
        super().__init__()
        spec = spec or CheersSpec()
        resolved = spec.resolve()  # configs and size checks, before any weight exists
        self.spec, self.resolved = spec, resolved
        self.image_size, self.tokens_per_image = resolved.image_size, resolved.tokens_per_image
        self.latent_channels, self.latent_side = resolved.latent_channels, resolved.latent_side

        self.processor = build_processor(spec, resolved)

        self.vae = registry.get("vae", spec.vae.flavor).build(resolved.vae)
        vit = (
            registry.get("semantic_encoder", spec.semantic_encoder.flavor)
            .build(resolved.semantic_encoder)
            .vit
        )
        self.semantic_encoder = SemanticEncoder(vit, spec.pixel_reconstruct, self.latent_channels)
        self.pixel_decoder = PixelDecoder.from_vae(self.vae) if spec.pixel_reconstruct == "decode" else None
        self.projector = registry.get("projector", spec.projector.flavor).build(resolved.projector)
        self.llm = registry.get("llm", spec.llm.flavor).build(resolved.llm)
        self.cfm_head = registry.get("cfm_head", spec.cfm_head.flavor).build(resolved.cfm_head)

        p = self.processor
        self.register_buffer("placeholder_ids", torch.tensor([p.image_id, p.image_gen_id]), persistent=False)

    # -- fast paths ---------------------------------------------------------------------------
    @property
    def fast(self) -> bool:
        """Whether the VAE and the pixel decoder D run their CPU fast path (default True).

        :mod:`cheers_pl.components.fast_conv`: each nearest-upsample + 3x3 conv as four 2x2 convs,
        GroupNorm + SiLU with in-place activation, and glibc's malloc told to keep freed memory
        (contiguous layout: channels-last measured no faster and less accurate on CPU). Same
        outputs up to float rounding; ``fast = False`` runs the plain diffusers modules (the
        straightforward reference of ``make bench`` and the tests)."""
        return bool(self.vae.fast)

    @fast.setter
    def fast(self, on: bool) -> None:
        self.vae.fast = bool(on)
        if self.pixel_decoder is not None:
            self.pixel_decoder.fast = bool(on)

    @property
    def compile_decoders(self) -> bool:
        """Whether the fast decoders (VAE decoder and D) also go through ``torch.compile`` (default
        False: on CPU the convolutions dominate and it measured no gain; its first call compiles
        for tens of seconds, and it falls back to eager with one line where compiling fails)."""
        return bool(self.vae.compile_decoder)

    @compile_decoders.setter
    def compile_decoders(self, on: bool) -> None:
        self.vae.compile_decoder = bool(on)
        if self.pixel_decoder is not None:
            self.pixel_decoder.compile_decoder = bool(on)

    # -- shared pieces ------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        """Raise naming the expected size unless images is (N, 3, image_size, image_size)."""
        want = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images must be (N, {want[0]}, {want[1]}, {want[2]}), got {tuple(images.shape)}"
            )

    def visual_tokens(self, z_t: Tensor) -> tuple[Tensor, Tensor]:
        """z_t (N,C,S,S) -> (LLM tokens (N, tokens_per_image, H_llm), HFI detail (N, S*S, D_vit))."""
        x = self.pixel_decoder(z_t) if self.pixel_decoder is not None else z_t
        features, detail = self.semantic_encoder(x)
        return self.projector(features), detail

    def check_placeholders(self, input_ids: Tensor, n_images: int, n_slots: int | None = None) -> None:
        """Raise naming both counts unless the batch has ``tokens_per_image`` placeholders per image.

        ``n_slots``: the number of placeholders when the caller knows it (no device read here)."""
        if n_slots is None:
            n_slots = int(torch.isin(input_ids, self.placeholder_ids).sum())
        if n_slots != n_images * self.tokens_per_image:
            raise ValueError(
                f"the batch has {n_slots} image placeholders ({n_slots / self.tokens_per_image:g} images of "
                f"{self.tokens_per_image} tokens) but {n_images} images were given"
            )

    def place_images(
        self, input_ids: Tensor, tokens: Tensor | None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Embeddings (B,L,H) with the image placeholders replaced by ``tokens`` (N,T,H); and span ids.

        ``positions`` (N*T,): the placeholders' flat indices into B*L (``batch_index``); with them
        the tokens are written by ``index_copy`` (no host sync), else by a boolean scatter.
        """
        span = image_span_ids(input_ids, self.placeholder_ids, self.tokens_per_image)
        embeds = self.llm.embed(input_ids)
        if tokens is not None:
            tokens = tokens.to(embeds.dtype)
            if positions is None:
                embeds = embeds.masked_scatter((span >= 0)[..., None], tokens)
            else:
                embeds = embeds.flatten(0, 1).index_copy(0, positions, tokens.flatten(0, 1)).view_as(embeds)
        return embeds, span

    def batch_index(self, batch: dict) -> dict[str, Tensor]:
        """The batch's gather indices (see ``CheersProcessor.batch_index``): the loader's, if it sent
        them (then the step has no host-device sync), else computed here from the batch."""
        keys = ("image_positions", "gen_images", "text_positions", "text_rows")
        if all(k in batch for k in keys):
            return {k: batch[k] for k in keys}
        return self.processor.batch_index(batch["input_ids"], batch["attention_mask"], batch["labels"])

    # -- training ----------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, Tensor], generator: torch.Generator | None = None, return_logits: bool = False
    ) -> CheersOutput:
        """Losses of a mixed batch (see the module docstring for the batch format).

        Optional batch keys give what is otherwise drawn from ``generator``: ``z0`` (N,C,S,S) the
        noise and ``t`` (N,) the flow time of each image (an understanding image's t is 1 unless
        given), and, under ``dummy_image="released"``, ``dummy_z0`` (D,C,S,S) the noise of the D
        dummy images (:mod:`cheers_pl.dummy_image`). ``return_logits`` also returns the logits
        of every position (B, L, V). With the loader's gather indices in the batch
        (``CheersProcessor.batch_index``) and no dummy image, nothing here reads a device value on
        the host: every size is known from tensor shapes.

        Idle pass (``idle_pass``; "auto": on when a process group of more than one rank is up):
        every trainable module runs on every batch, so that data-parallel ranks whose batches hold
        other tasks run the same modules and collectives (:meth:`_idle_pass`). It changes no
        loss value and adds exactly zero to every gradient.
        """
        dummies = None
        idle = self.idle_pass_on()
        if self.spec.resolved_dummy_image == "released":
            batch = add_dummy_images(batch, self.processor, self.image_size)
            dummies = batch["dummy_images"]
        input_ids, valid, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
        images = batch.get("images")
        n_img = 0 if images is None else images.shape[0]
        index = self.batch_index(batch)
        positions, gen = index["image_positions"], index["gen_images"]
        self.check_placeholders(input_ids, n_img, n_slots=positions.shape[0])
        n_gen, n_tok = gen.shape[0], self.tokens_per_image
        tokens = detail = None
        if n_img:
            self.check_images(images)
            is_gen = torch.zeros(n_img, dtype=torch.bool, device=images.device).index_fill(0, gen, True)
            z1 = self.vae.encode(images)
            z0 = batch.get("z0")
            if z0 is None:
                z0 = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
            t = batch.get("t")
            if t is None:
                t_gen = flow.sample_t(n_img, generator=generator, device=z1.device)
                t = torch.where(is_gen, t_gen, torch.ones_like(t_gen))
                if dummies is not None:
                    t = t.index_fill(0, dummies, 0.0)  # the release's dummy: a black image at t = 0
            z0, t = z0.to(z1), t.to(z1.device, torch.float32)
            tokens, detail = self.visual_tokens(flow.interpolate(z1, z0, t))
        elif idle:
            idle_tokens, detail = self._idle_vision(input_ids.device)
        embeds, span = self.place_images(input_ids, tokens, positions)
        if idle and not n_img:  # the vision path feeds the LLM as a real image would, times 0
            embeds = embeds + (0.0 * idle_tokens.float().mean()).to(embeds.dtype)
        if dummies is not None and dummies.numel():  # a dummy is attended causally, like text
            slots = positions.view(n_img, n_tok)[dummies].flatten()
            span = span.flatten().index_fill(0, slots, -1).view_as(span)
        mask = mixed_attention_mask(span, span, valid)
        hidden, _ = self.llm(embeds, mask, positions_from_valid(valid))
        loss_text, n_text, row_sums, row_counts = self.llm.text_loss(
            hidden, labels.masked_fill(~valid, IGNORE), index["text_positions"], index["text_rows"]
        )

        loss_fm, gate, v, target = hidden.sum() * 0.0, None, None, None
        rule = self.spec.resolved_fm_loss_images
        if n_gen or (n_img and rule != "generation"):
            # "generation": the paper's loss over generation images; "all": the released rule
            # (every image, some at their row's first positions); "every_image": every image at
            # its own positions. Understanding images (t = 1) have target 0.
            rows = gen if rule == "generation" else torch.arange(n_img, device=gen.device)
            at = positions
            if rule == "all":
                at = released_fm_positions(input_ids, valid, positions, gen, n_tok)
            h_img = hidden.flatten(0, 1).index_select(0, at).view(n_img, n_tok, -1)
            v, gate_all = self.cfm_head(h_img[rows], t[rows], detail[rows])
            moving = (t < 1) if rule == "all" else is_gen  # the release masks its target by t < 1
            target = torch.where(moving.view(-1, 1, 1, 1), flow.velocity_target(z1, z0), torch.zeros_like(z1))
            target = target[rows]
            loss_fm = F.mse_loss(v.float(), target.float())
            if gate_all is not None and n_gen:
                gate = gate_all[gen] if rule != "generation" else gate_all
            v, target = v.detach(), target.detach()
        elif idle:
            loss_fm = loss_fm + self._idle_head(hidden, detail)
        if idle and index["text_positions"].numel() == 0:  # an untied LM head gets no text loss
            loss_text = loss_text + 0.0 * self.llm.lm_head(hidden.flatten(0, 1)[:1]).float().mean()
        loss = loss_text + self.spec.fm_weight * loss_fm
        t_out = t if n_img else None
        n_und = n_img - n_gen - (0 if dummies is None else dummies.numel())
        out = CheersOutput(loss, loss_text, loss_fm, n_text, n_gen, n_und, gate, t_out, row_sums, row_counts)
        out.v, out.target = v, target
        if return_logits:
            out.logits = self.llm.logits(hidden)
        return out

    def idle_pass_on(self) -> bool:
        """Whether :meth:`forward` runs the idle modules (``idle_pass``: "auto", "always", "never")."""
        if self.idle_pass not in IDLE_PASS:
            raise ValueError(f"idle_pass={self.idle_pass!r}; valid choices are {list(IDLE_PASS)}")
        if self.idle_pass == "auto":
            dist = torch.distributed
            return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return self.idle_pass == "always"

    def _idle_vision(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The vision path on one black image at t = 1 (no noise drawn): (tokens (1,T,H), detail (1,T,D)).

        For a batch without images, so that the VAE encoder, pixel decoder, SigLIP and projector
        run (FSDP gathers their units in forward) and get a gradient (DDP and ZeRO wait for one)."""
        black = torch.zeros(1, 3, self.image_size, self.image_size, device=device)
        return self.visual_tokens(self.vae.encode(black))

    def _idle_head(self, hidden: Tensor, detail: Tensor) -> Tensor:
        """0 x the CFM head's output on one image's worth of hidden states: a zero loss (scalar) whose
        graph holds every head parameter. hidden (B, L, H); detail (N, T, D) of any image (or the
        idle one). The head reads the LLM's output as a real pass does, so the backward reaches the
        head before the LLM on every rank (FSDP's reduce-scatters come in the same order)."""
        h = hidden.flatten(0, 1)[:1].expand(self.tokens_per_image, -1)[None]
        t = torch.ones(1, device=hidden.device)
        v, _ = self.cfm_head(h, t, detail[:1])
        return 0.0 * v.float().mean()

    # -- generation ---------------------------------------------------------------------------
    def _prompt_rows(self, prompts: list[str], cfg: bool) -> dict[str, Tensor]:
        if not prompts:
            raise ValueError("generate: the prompt list is empty")
        rows = [self.processor.generation_prompt(p) for p in prompts]
        for prompt, row in zip(prompts, rows, strict=True):
            if bool(torch.isin(row, self.placeholder_ids.cpu()).any()):
                raise ValueError(
                    f"generate: prompt {prompt!r} holds an image marker; text-to-image takes text only"
                )
        if cfg:
            rows += [self.processor.null_like(r) for r in rows]
        return self.processor.collate([{"input_ids": r, "labels": r} for r in rows], padding_side="left")

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        cfg_scale: float = 9.5,
        steps: int = 80,
        shift: float = 0.5,
        seed: int | None = 0,
        return_gates: bool = False,
        last_dt: str = "released",
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        gates_dir: str | None = None,
        cfg_interval: tuple[float, float] | None = None,
        noise: Tensor | None = None,
        dummy_images: Tensor | None = None,
    ) -> GenerationOutput:
        """Text-to-image with Euler sampling and CFG (v = v_u + s (v_c - v_u); no CFG when s == 1).

        ``noise`` (B, C, S, S): the initial z (default: drawn from ``generator`` / ``seed``); the
        result's ``latents`` are the final z before the VAE decode. Under
        ``spec.dummy_image == "released"`` both prefixes (conditional and null) start with a dummy
        image's tokens, encoded clean and attended causally: ``dummy_images`` (B, 3, H, W) in
        [0, 1], or uniform 8-bit noise drawn after the initial z (the released processor's dummy).

        The text prefix does not attend to the image, so its KV cache is computed once and reused at
        every step without a copy (a static cache: each step overwrites the image slots in place,
        :meth:`CheersLLM.prefix_cache`); D(z_t), SigLIP and the projector run once per step for
        both CFG rows, and the two LLM rows are batched. ``use_cache=False`` recomputes the whole
        sequence at every step (the reference the cached path is tested against). ``gates_dir``
        also saves every step's HFI gate map of each prompt there as PNG (implies ``return_gates``).
        ``cfg_interval=(lo, hi)`` applies CFG only at steps whose (shifted) t lies in [lo, hi]; at
        the other steps only the conditional rows run (the unconditional ones are skipped, using a
        conditional-only prefix cache built on first need). None (the default): CFG at every step.
        :func:`generate_reference` is the straightforward sampler this one is tested against.
        """
        if cfg_interval is not None and not (len(cfg_interval) == 2 and cfg_interval[0] <= cfg_interval[1]):
            raise ValueError(f"cfg_interval must be (lo, hi) with lo <= hi, got {cfg_interval!r}")
        return_gates = return_gates or gates_dir is not None
        device = self.placeholder_ids.device
        t_grid, dt = flow.sampling_schedule(steps, shift, last_dt)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        b, use_cfg = len(prompts), cfg_scale != 1.0
        rows = {k: v.to(device) for k, v in self._prompt_rows(prompts, use_cfg).items()}
        ids, valid = rows["input_ids"], rows["attention_mask"]
        z = self._initial_noise(noise, b, generator)
        prefix_embeds, valid = self._t2i_prefix(ids, valid, b, dummy_images, generator)
        r, lp, n_tok = ids.shape[0], prefix_embeds.shape[1], self.tokens_per_image
        text_span = torch.full(valid.shape, -1, dtype=ids.dtype, device=device)
        img_span = torch.zeros(r, n_tok, dtype=ids.dtype, device=device)
        k_span, k_valid = (
            torch.cat([text_span, img_span], 1),
            torch.cat([valid, torch.ones_like(img_span).bool()], 1),
        )
        img_pos = valid.sum(-1, keepdim=True) + torch.arange(n_tok, device=device)
        if use_cache:
            cache = self.llm.prefix_cache(prefix_embeds, valid, n_tok)
            img_mask = mixed_attention_mask(img_span, k_span, k_valid)
        else:
            full_mask = mixed_attention_mask(k_span, k_span, k_valid)
            full_pos = torch.cat([positions_from_valid(valid), img_pos], 1)

        gates: list[Tensor] = []

        cond_cache: list = []  # the conditional rows' own prefix cache, for steps outside cfg_interval

        def cond_only(z_t: Tensor, t: float) -> tuple[Tensor, Tensor | None]:
            tokens, detail = self.visual_tokens(z_t)
            tokens = tokens.to(prefix_embeds.dtype)  # as in training; one dtype in the KV cache
            if use_cache:
                if not cond_cache:
                    cond_cache.append(self.llm.prefix_cache(prefix_embeds[:b], valid[:b], n_tok))
                hidden, _ = self.llm(tokens, img_mask[:b], img_pos[:b], cache=cond_cache[0], use_cache=True)
                cond_cache[0].crop(-n_tok)
            else:
                hidden, _ = self.llm(torch.cat([prefix_embeds[:b], tokens], 1), full_mask[:b], full_pos[:b])
                hidden = hidden[:, lp:]
            return self.cfm_head(hidden, torch.full((b,), t, device=device), detail)

        def velocity(z_t: Tensor, t: float, _: int) -> Tensor:
            if use_cfg and cfg_interval is not None and not cfg_interval[0] <= t <= cfg_interval[1]:
                v, gate = cond_only(z_t, t)
                if return_gates and gate is not None:
                    gates.append(gate)
                return v
            tokens, detail = self.visual_tokens(z_t)
            tokens = tokens.to(prefix_embeds.dtype)  # as in training; one dtype in the KV cache
            if use_cfg:
                tokens, detail = tokens.repeat(2, 1, 1), detail.repeat(2, 1, 1)
            if use_cache:
                hidden, _ = self.llm(tokens, img_mask, img_pos, cache=cache, use_cache=True)
                cache.crop(-n_tok)
            else:
                hidden, _ = self.llm(torch.cat([prefix_embeds, tokens], 1), full_mask, full_pos)
                hidden = hidden[:, lp:]
            v, gate = self.cfm_head(hidden, torch.full((r,), t, device=device), detail)
            if return_gates and gate is not None:
                gates.append(gate[:b])
            return flow.cfg_combine(v[:b], v[b:], cfg_scale) if use_cfg else v

        z = flow.euler_sample(velocity, z, t_grid.to(device), dt)
        images = self.vae.decode(z).clamp(0, 1)
        gate_stack = torch.stack(gates) if gates else None
        if gates_dir is not None and gate_stack is not None:
            from cheers_pl.analysis.hfi import save_gate_maps

            save_gate_maps(gate_stack, gates_dir)
        return GenerationOutput(images.float(), z, gate_stack, t_grid.float())

    def _initial_noise(self, noise: Tensor | None, b: int, generator: torch.Generator | None) -> Tensor:
        """The sampler's initial z (B, C, S, S): ``noise`` checked, or drawn from ``generator``."""
        shape = (b, self.latent_channels, self.latent_side, self.latent_side)
        device = self.placeholder_ids.device
        if noise is None:
            return torch.randn(shape, generator=generator, device=device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {shape} (B, C, S, S), got {tuple(noise.shape)}")
        return noise.to(device, torch.float32)

    def _t2i_prefix(
        self, ids: Tensor, valid: Tensor, b: int, dummy_images: Tensor | None, generator
    ) -> tuple[Tensor, Tensor]:
        """Prefix embeddings (R, Lp', H) and validity (R, Lp') of the text-to-image rows (R = b or 2b).

        Under ``dummy_image="released"`` each row starts with its dummy image's T tokens (the same
        one for a prompt's conditional and null row), encoded clean (t = 1)."""
        embeds = self.llm.embed(ids)
        if self.spec.resolved_dummy_image != "released":
            if dummy_images is not None:
                raise ValueError("dummy_images given but spec.dummy_image is 'none' (compat kit)")
            return embeds, valid
        if dummy_images is None:
            size = (b, 3, self.image_size, self.image_size)
            dummy_images = torch.randint(0, 256, size, generator=generator, device=ids.device) / 255.0
        self.check_images(dummy_images)
        if dummy_images.shape[0] != b:
            raise ValueError(f"dummy_images: {dummy_images.shape[0]} images for {b} prompts")
        tokens, _ = self.visual_tokens(self.vae.encode(dummy_images.to(ids.device)))
        tokens = tokens.to(embeds.dtype).repeat(ids.shape[0] // b, 1, 1)
        ones = torch.ones(tokens.shape[:2], dtype=valid.dtype, device=valid.device)
        return torch.cat([tokens, embeds], 1), torch.cat([ones, valid], 1)

    @torch.no_grad()
    def velocity(
        self,
        prompts: list[str],
        z_t: Tensor,
        t: Tensor | float,
        cfg_scale: float = 1.0,
        dummy_images: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The sampler's velocity at one state: z_t (B, C, S, S) at t (B,) or a float -> v (B, C, S, S).

        What one step of :meth:`generate` computes (CFG when ``cfg_scale != 1``, the dummy image
        under ``dummy_image="released"``), over the whole sequence without a cache."""
        b, use_cfg = len(prompts), cfg_scale != 1.0
        device, n_tok = self.placeholder_ids.device, self.tokens_per_image
        if (
            tuple(z_t.shape[1:]) != (self.latent_channels, self.latent_side, self.latent_side)
            or z_t.shape[0] != b
        ):
            raise ValueError(
                f"z_t must be ({b}, {self.latent_channels}, {self.latent_side}, {self.latent_side}), "
                f"got {tuple(z_t.shape)}"
            )
        rows = {k: v.to(device) for k, v in self._prompt_rows(prompts, use_cfg).items()}
        prefix, valid = self._t2i_prefix(
            rows["input_ids"], rows["attention_mask"], b, dummy_images, generator
        )
        r = prefix.shape[0]
        tokens, detail = self.visual_tokens(z_t.to(device))
        tokens, detail = tokens.to(prefix.dtype).repeat(r // b, 1, 1), detail.repeat(r // b, 1, 1)
        span = torch.cat(
            [torch.full(valid.shape, -1, device=device), torch.zeros(r, n_tok, device=device)], 1
        )
        k_valid = torch.cat([valid, torch.ones(r, n_tok, dtype=torch.bool, device=device)], 1)
        mask = mixed_attention_mask(span.long(), span.long(), k_valid)
        hidden, _ = self.llm(torch.cat([prefix, tokens], 1), mask, positions_from_valid(k_valid))
        t = torch.as_tensor(t, dtype=torch.float32, device=device).expand(b).repeat(r // b)
        v, _ = self.cfm_head(hidden[:, -n_tok:], t, detail)
        return flow.cfg_combine(v[:b], v[b:], cfg_scale) if use_cfg else v

    # -- understanding ------------------------------------------------------------------------
    @torch.no_grad()
    def answer(
        self,
        images: Tensor,
        questions: list[str],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_k: int = 20,
        top_p: float = 0.8,
        generator: torch.Generator | None = None,
        return_ids: bool = False,
    ) -> list[str] | AnswerOutput:
        """Answer one question per image; images (B,3,H,W) in [0,1] at the model's image size.

        Greedy by default (the released understanding evaluation); sampling uses temperature,
        top-k and top-p. Decoding uses the KV cache; each row stops at ``<|im_end|>``. Returns the
        texts, or with ``return_ids`` an :class:`AnswerOutput` holding the texts and the token ids.
        """
        self.check_images(images)
        if len(questions) != images.shape[0]:
            raise ValueError(f"answer: {images.shape[0]} images but {len(questions)} questions")
        p, device = self.processor, self.placeholder_ids.device
        rows = [p.answer_prompt(q, 1) for q in questions]
        batch = p.collate([{"input_ids": x, "labels": x} for x in rows], padding_side="left")
        ids, valid = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        self.check_placeholders(ids, images.shape[0])
        tokens, _ = self.visual_tokens(self.vae.encode(images.to(device)))
        embeds, span = self.place_images(ids, tokens)
        hidden, cache = self.llm(
            embeds, mixed_attention_mask(span, span, valid), positions_from_valid(valid), None, True
        )
        pos = valid.sum(-1, keepdim=True) - 1
        stop = torch.tensor([p.chat_end_id, p.pad_id], device=device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        out: list[Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.llm.logits(hidden[:, -1]).float()
            nxt = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, p.pad_id), nxt)
            out.append(nxt)
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
            valid = torch.cat([valid, torch.ones_like(done)[:, None]], 1)
            pos = pos + 1
            mask = valid[:, None, None, :]
            hidden, cache = self.llm(self.llm.embed(nxt[:, None]), mask, pos, cache, True)
        gen = torch.stack(out, 1) if out else ids.new_zeros(ids.shape[0], 0)
        rows = [_until(row, stop) for row in gen]
        texts = [p.decode(row) for row in rows]
        return AnswerOutput(texts, [row.cpu() for row in rows]) if return_ids else texts


@torch.no_grad()
def generate_reference(
    model: CheersModel,
    prompts: list[str],
    cfg_scale: float = 9.5,
    steps: int = 80,
    shift: float = 0.5,
    seed: int | None = 0,
    last_dt: str = "released",
    cfg_interval: tuple[float, float] | None = None,
) -> GenerationOutput:
    """The straightforward text-to-image sampler, as the released code runs it; no shortcuts.

    At every Euler step the conditional and the unconditional pass run one after the other, each
    recomputing its own D(z_t), SigLIP and projector and the LLM over the whole sequence (text
    prefix + ``<image_gen>`` placeholders, the image tokens scattered in) with no KV cache. The
    noise is the same draw as :meth:`CheersModel.generate` (z of shape (B, C, S, S) from a generator
    seeded with ``seed``), so both return the same latents up to float rounding. This is the
    baseline of ``make bench`` (sampler speed-up) and of ``tests/test_sampler.py`` (equality).
    """
    device = model.placeholder_ids.device
    p, n_tok = model.processor, model.tokens_per_image
    t_grid, dt = flow.sampling_schedule(steps, shift, last_dt)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if not prompts:
        raise ValueError("generate_reference: the prompt list is empty")
    placeholders = torch.full((n_tok,), p.image_gen_id, dtype=torch.long)
    cond = [torch.cat([p.generation_prompt(x), placeholders]) for x in prompts]

    def sequence(rows: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        batch = p.collate([{"input_ids": r, "labels": r} for r in rows], padding_side="left")
        ids, valid = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        span = image_span_ids(ids, model.placeholder_ids, n_tok)
        return ids, mixed_attention_mask(span, span, valid), positions_from_valid(valid)

    passes = [sequence(cond)]
    if cfg_scale != 1.0:
        passes.append(sequence([p.null_like(r) for r in cond]))
    shape = (len(prompts), model.latent_channels, model.latent_side, model.latent_side)
    z = torch.randn(shape, generator=generator, device=device)

    def one_pass(z_t: Tensor, t: float, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        tokens, detail = model.visual_tokens(z_t)
        embeds, span = model.place_images(ids, tokens)
        hidden, _ = model.llm(embeds, mask, pos)
        h_img = hidden[span >= 0].view(z_t.shape[0], n_tok, -1)
        v, _ = model.cfm_head(h_img, torch.full((z_t.shape[0],), t, device=device), detail)
        return v

    for t, step in zip(t_grid.tolist(), dt.tolist(), strict=True):
        v_c = one_pass(z, t, *passes[0])
        in_interval = cfg_interval is None or cfg_interval[0] <= t <= cfg_interval[1]
        if len(passes) == 2 and in_interval:
            v = flow.cfg_combine(v_c, one_pass(z, t, *passes[1]), cfg_scale)
        else:
            v = v_c
        z = z + v * step
    images = model.vae.decode(z).clamp(0, 1)
    return GenerationOutput(images.float(), z, None, t_grid.float())


def _until(row: Tensor, stop: Tensor) -> Tensor:
    hits = torch.isin(row, stop).nonzero()
    return row[: int(hits[0])] if len(hits) else row


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator) -> Tensor:
    """Next token (B,) from logits (B, V): argmax, or temperature / top-k / top-p sampling."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def parameter_summary(model: nn.Module) -> list[tuple[str, int, int]]:
    """(child name, parameters, trainable parameters) for each top-level child of ``model``."""
    rows = []
    for name, child in model.named_children():
        params = list(child.parameters())
        rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    return rows
