"""The LLM: ``transformers.Qwen2ForCausalLM`` with CHEERS's mixed attention mask.

One sequence holds text and image spans. Attention is causal over text, bidirectional inside
each contiguous image span, and padding is never attended (DESIGN section 2). The mask is one
broadcast boolean (B, 1, Lq, Lk) tensor (True = may attend), handed to the model as a custom 4D
mask, which transformers passes through unchanged; for ``attn_implementation="eager"`` it is
turned into the additive float mask that path needs.

The LM head runs only on positions whose next token is supervised (:meth:`CheersLLM.text_loss`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

from cheers_pl.components.flavor import Flavor, apply_overrides

IGNORE = -100


def image_span_ids(input_ids: Tensor, placeholder_ids: Tensor, tokens_per_image: int) -> Tensor:
    """(B, L) ids -> (B, L) long: batch-global index of each placeholder's image; -1 for text.

    Images are numbered in reading order over the flattened batch (row by row), each taking
    exactly ``tokens_per_image`` placeholders; that is also the order of the batch's images.
    """
    is_img = torch.isin(input_ids, placeholder_ids)
    flat = is_img.flatten()
    index = torch.div(flat.long().cumsum(0) - 1, tokens_per_image, rounding_mode="floor")
    return torch.where(flat, index, torch.full_like(index, -1)).view_as(input_ids)


def mixed_attention_mask(
    q_span: Tensor,
    k_span: Tensor,
    k_valid: Tensor,
    q_index: Tensor | None = None,
    k_index: Tensor | None = None,
) -> Tensor:
    """The CHEERS mask: (B, 1, Lq, Lk) bool, True where query i may attend key j.

    Args:
        q_span, k_span: (B, Lq), (B, Lk) image-span ids (-1 = text), from :func:`image_span_ids`.
        k_valid: (B, Lk) bool, False on padding.
        q_index, k_index: (B, Lq), (B, Lk) or (Lq,), (Lk,) sequence indices for causality;
            default ``arange`` (queries and keys are the same sequence). With a KV cache the
            queries are the last Lq of the Lk keys.

    Rule: (j <= i or i, j in the same image span) and j is not padding; every query also sees
    itself, so a padding row is never empty (an all-False row makes SDPA return NaN).
    """
    lq, lk = q_span.shape[-1], k_span.shape[-1]
    if q_index is None:
        q_index = torch.arange(lk - lq, lk, device=q_span.device)
    if k_index is None:
        k_index = torch.arange(lk, device=k_span.device)
    qi, kj = q_index[..., :, None], k_index[..., None, :]
    same_image = (q_span[:, :, None] == k_span[:, None, :]) & (q_span[:, :, None] >= 0)
    mask = ((kj <= qi) | same_image) & k_valid[:, None, :]
    return (mask | (kj == qi))[:, None]


def positions_from_valid(valid: Tensor, start: Tensor | int = 0) -> Tensor:
    """RoPE position ids (B, L) that skip padding: cumulative count of valid tokens, minus one."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0) + start


class CheersLLM(nn.Module):
    """Qwen2 decoder + tied LM head. Shapes: embeddings (B, L, H) -> hidden (B, L, H)."""

    def __init__(self, model: Qwen2ForCausalLM):
        super().__init__()
        self.model = model
        self.hidden_size = model.config.hidden_size
        self.vocab_size = model.config.vocab_size

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, H) token embeddings."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: Tensor,
        mask: Tensor,
        position_ids: Tensor,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:
        """Run the decoder on (B, Lq, H) embeddings with a (B, 1, Lq, Lk) bool mask.

        Returns (hidden (B, Lq, H) after the final norm, the cache or None).
        """
        if self.model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(inputs_embeds.dtype).min
            )
        out = self.model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache if use_cache else None

    def prefix_cache(self, inputs_embeds: Tensor, valid: Tensor, extra: int) -> StaticCache:
        """KV cache of a text prefix (B, Lp, H), with ``extra`` preallocated slots after it.

        The cache is a ``transformers.StaticCache`` of length Lp + extra: the prefix is written once;
        each later call with ``extra`` query tokens writes their keys and values into the slots after
        the prefix in place (``index_copy_``), and ``cache.crop(-extra)`` rewinds the write position,
        so every denoising step reuses the prefix without a copy. Keys of a call always span all
        Lp + extra slots: a query's mask must be (B, 1, Lq, Lp + extra). The prefix itself attends
        causally among its valid tokens and never to the (still empty) extra slots.
        """
        b, lp = valid.shape
        cache = StaticCache(config=self.model.config, max_cache_len=lp + extra)
        k_valid = torch.cat([valid, valid.new_zeros(b, extra)], 1)
        span = torch.full((b, lp + extra), -1, dtype=torch.long, device=valid.device)
        q_index = torch.arange(lp, device=valid.device)
        mask = mixed_attention_mask(span[:, :lp], span, k_valid, q_index=q_index)
        self(inputs_embeds, mask, positions_from_valid(valid), cache=cache, use_cache=True)
        return cache

    def text_loss(
        self, hidden: Tensor, labels: Tensor, positions: Tensor | None = None, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Token-mean cross-entropy, LM head applied only on supervised positions.

        hidden (B, L, H), labels (B, L) aligned with the inputs (-100 = unsupervised); position i
        predicts labels[i + 1]. ``positions`` (K,) / ``rows`` (K,): the flat indices into B*L of
        the supervised positions and their rows, as ``CheersProcessor.batch_index`` computes them
        on the host (then nothing here waits on the device); found from ``labels`` when None.
        Returns (loss, number of supervised tokens, per-row loss sums (B,), per-row token counts
        (B,)); loss is 0 (still in the graph) when nothing is supervised.
        """
        b, length = labels.shape
        keep = labels[:, 1:] != IGNORE
        count, row_counts = keep.sum(), keep.sum(-1)
        if positions is None:
            rows, cols = keep.nonzero(as_tuple=True)
            positions = rows * length + cols
        if positions.numel() == 0:
            zero = hidden.sum() * 0.0
            return zero, count, zero.detach().expand(b), row_counts
        logits = self.lm_head(hidden.flatten(0, 1).index_select(0, positions))
        target = labels.flatten().index_select(0, positions + 1)
        losses = F.cross_entropy(logits.float(), target, reduction="none")
        row_sums = torch.zeros(b, device=losses.device).index_add_(0, rows, losses.detach())
        return losses.mean(), count, row_sums, row_counts

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., H) -> (..., vocab) over the full vocabulary (decoding, not training)."""
        return self.lm_head(hidden)


# ---------------------------------------------------------------------------------------------
# Flavors: config() -> Qwen2Config; build() -> CheersLLM.
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    # Qwen2's 0.02 is tuned for widths near 1536. At width 64 it makes a quiet network: each
    # attention layer adds ~5% to a token's residual, so image tokens barely see the prompt and
    # answers barely see the image (issue 12: a tiny demo whose T2I and reading stayed at chance).
    # 0.1 ~ 1/sqrt(64) stands in better for a trained LLM whose tokens do exchange information.
    initializer_range=0.1,
)
_PAPER = dict(  # Qwen2.5-1.5B(-Instruct) = the released text_config
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    max_window_layers=21,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def _config(base: dict[str, Any], **overrides: Any) -> Qwen2Config:
    valid = set(Qwen2Config().to_dict()) | {"attn_implementation"}
    kw = apply_overrides(base, overrides, valid, "llm")
    attn = kw.pop("attn_implementation", "sdpa")
    cfg = Qwen2Config(**kw)
    cfg._attn_implementation = attn
    return cfg


def _pretrained_config(path: str, attn_implementation: str = "sdpa") -> Qwen2Config:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"llm: no config.json in {folder} (expected a Qwen2.5 folder)")
    cfg = Qwen2Config.from_pretrained(folder)
    cfg.name_or_path = str(folder)  # the standard field; _build loads weights from it
    cfg._attn_implementation = attn_implementation
    return cfg


def _build(cfg: Qwen2Config) -> CheersLLM:
    """Random weights for a config made from scratch; the folder's weights for one read from a folder."""
    if not cfg.name_or_path:
        return CheersLLM(Qwen2ForCausalLM(cfg))
    model = Qwen2ForCausalLM.from_pretrained(cfg.name_or_path, attn_implementation=cfg._attn_implementation)
    return CheersLLM(model)


FLAVORS = {
    "tiny": Flavor(lambda **o: _config(_TINY, **o), _build, "2 layers, width 64, vocab 512"),
    "paper": Flavor(lambda **o: _config(_PAPER, **o), _build, "Qwen2.5-1.5B"),
    "pretrained": Flavor(_pretrained_config, _build, "transformers folder (path=)"),
}
