"""The processor: chats -> token ids and labels in Qwen's chat template, with image spans expanded.

An image inside a message is written as a bare ``<image>`` (understanding) or ``<image_gen>``
(generation) marker; :class:`CheersProcessor` expands each into the span
``<im_start> + placeholder * tokens_per_image + <im_end>`` whose placeholder positions the model
later fills with projected image features. It also builds generation and answer prompts, the
CFG null prompt, and padded batches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast

from cheers_pl.components.tokenizer import (
    CHAT_END,
    CHAT_START,
    CHEERS_TOKENS,
    ENDOFTEXT,
    IGNORE_INDEX,
    IMAGE,
    IMAGE_GEN,
    SYSTEM_PROMPT,
)

_MARKER = re.compile(f"({re.escape(IMAGE)}|{re.escape(IMAGE_GEN)})")
_ROLES = ("system", "user", "assistant")


class SequenceTooLongError(ValueError):
    """A sequence is longer than the processor's ``max_length`` (and was not, or could not be, truncated)."""


class CheersProcessor:
    """Turns chats into token ids and labels in Qwen's chat template, with image spans expanded.

    Layout of one sample (the system turn is added when the chat does not start with one)::

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\n{content}<|im_end|>\\n
        <|im_start|>assistant\\n{content}<|im_end|>\\n

    Special-token ids are inserted directly; text is tokenized with ``add_special_tokens=False``
    and ``split_special_tokens=True`` (a literal ``<|im_end|>`` in a caption stays text). The role
    header (``"user\\n"``) is tokenized apart from the content so that the label boundary falls
    between tokens; this equals tokenizing the whole template string unless a content starts
    with a newline. In content, ``<image>`` / ``<image_gen>`` become
    ``[im_start_id] + [image_id | image_gen_id] * tokens_per_image + [im_end_id]``.

    Labels are aligned with ``input_ids`` (not shifted; the model shifts) and are
    ``IGNORE_INDEX`` (-100) except on an assistant turn's content tokens and its closing
    ``<|im_end|>``. Inside an assistant turn, the ``<im_start>`` that opens a generated image is
    supervised (the model learns when to start an image), its placeholders are not, and neither
    is its closing ``<im_end>``: that label would be predicted from the last, noisy image position,
    and the sampler appends ``<im_end>`` itself. Understanding spans are never supervised.

    Args:
        tokenizer: a tokenizer with the CHEERS tokens and Qwen's chat tokens (any flavor above).
        tokens_per_image: placeholders per image (256 for a 512x512 image at the paper's size).
        system_prompt: the system turn added when a chat has none.
        cfg_dropout: probability that :meth:`should_drop` says to null a generation prompt.
        max_length: longest allowed sequence; longer ones raise :class:`SequenceTooLongError`
            (:meth:`encode` can truncate training samples instead, see there).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        tokens_per_image: int,
        system_prompt: str = SYSTEM_PROMPT,
        cfg_dropout: float = 0.2,
        max_length: int | None = None,
    ):
        if (
            not isinstance(tokens_per_image, int)
            or isinstance(tokens_per_image, bool)
            or tokens_per_image < 1
        ):
            raise ValueError(f"tokens_per_image must be a positive int, got {tokens_per_image!r}")
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.system_prompt = system_prompt
        self.cfg_dropout = cfg_dropout
        self.max_length = max_length
        self.vocab_size = len(tokenizer)
        self.image_id, self.image_gen_id, self.im_start_id, self.im_end_id, self.null_id = map(
            self._token_id, CHEERS_TOKENS
        )
        self.pad_id = self._token_id(ENDOFTEXT)
        self.chat_start_id = self._token_id(CHAT_START)
        self.chat_end_id = self._token_id(CHAT_END)
        # Tokens that survive CFG dropout (DESIGN section 8: an editing source image survives).
        self._kept_by_null = torch.tensor(
            [self.image_id, self.image_gen_id, self.im_start_id, self.im_end_id]
        )

    def _token_id(self, token: str) -> int:
        """The id of a single added token; fails if the tokenizer lacks it."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or self.tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(
                f"tokenizer has no token {token!r}; build it with a flavor of cheers_pl.components.tokenizer"
            )
        return token_id

    # ---- building blocks: each returns (ids, labels), two lists of equal length -------------

    def _text(self, text: str, supervised: bool) -> tuple[list[int], list[int]]:
        """Plain text, special-token strings included, as ordinary tokens."""
        if not text:
            return [], []
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids, list(ids) if supervised else [IGNORE_INDEX] * len(ids)

    def _image_span(self, marker: str, supervised: bool) -> tuple[list[int], list[int]]:
        """``<im_start> placeholder*tokens_per_image <im_end>``; only a generated image's start is learnt."""
        placeholder = self.image_id if marker == IMAGE else self.image_gen_id
        ids = [self.im_start_id] + [placeholder] * self.tokens_per_image + [self.im_end_id]
        labels = [IGNORE_INDEX] * len(ids)
        if supervised and marker == IMAGE_GEN:
            labels[0] = self.im_start_id
        return ids, labels

    def _content(self, content: str, supervised: bool) -> tuple[list[int], list[int]]:
        """A message's content with its ``<image>`` / ``<image_gen>`` markers expanded."""
        ids, labels = [], []
        for piece in _MARKER.split(content):
            piece_ids, piece_labels = (
                self._image_span(piece, supervised)
                if piece in (IMAGE, IMAGE_GEN)
                else self._text(piece, supervised)
            )
            ids += piece_ids
            labels += piece_labels
        return ids, labels

    def _header(self, role: str) -> list[int]:
        """``<|im_start|>{role}\\n`` (never supervised)."""
        return [self.chat_start_id] + self._text(f"{role}\n", supervised=False)[0]

    def _turn(self, role: str, content: str) -> tuple[list[int], list[int]]:
        """``<|im_start|>{role}\\n{content}<|im_end|>\\n``; an assistant turn is supervised."""
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {_ROLES}")
        if not isinstance(content, str):
            raise TypeError(f"message content must be a str, got {type(content).__name__}")
        supervised = role == "assistant"
        header = self._header(role)
        body_ids, body_labels = self._content(content, supervised)
        newline = self._text("\n", supervised=False)[0]
        ids = header + body_ids + [self.chat_end_id] + newline
        end_label = self.chat_end_id if supervised else IGNORE_INDEX
        labels = [IGNORE_INDEX] * len(header) + body_labels + [end_label] + [IGNORE_INDEX] * len(newline)
        return ids, labels

    def _chat(self, messages: Sequence[dict], open_assistant: bool) -> tuple[list[int], list[int]]:
        """All turns (system prompt first if missing), optionally then ``<|im_start|>assistant\\n``."""
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        ids, labels = [], []
        for message in messages:
            turn_ids, turn_labels = self._turn(message["role"], message["content"])
            ids += turn_ids
            labels += turn_labels
        if open_assistant:
            header = self._header("assistant")
            ids += header
            labels += [IGNORE_INDEX] * len(header)
        return ids, labels

    def _check_length(self, length: int, max_length: int | None = None) -> None:
        limit = self.max_length if max_length is None else max_length
        if limit is not None and length > limit:
            raise SequenceTooLongError(f"sequence has {length} tokens, more than max_length={limit}")

    def _truncate(self, ids: list[int], labels: list[int], limit: int) -> tuple[list[int], list[int]]:
        """The first ``limit`` tokens, if that keeps every image span whole; else SequenceTooLongError."""
        ends = [i for i, t in enumerate(ids) if t == self.im_end_id]  # only image spans hold <im_end>
        if ends and ends[-1] >= limit:
            raise SequenceTooLongError(
                f"sequence has {len(ids)} tokens, more than max_length={limit}, and its last image span "
                f"ends at token {ends[-1] + 1}: not truncated (a cut may not split or drop an image)"
            )
        return ids[:limit], labels[:limit]

    # ---- public API ----------------------------------------------------------------------

    def encode(
        self,
        messages: Sequence[dict],
        num_images: int | None = None,
        cfg_drop: bool = False,
        truncate: bool = False,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training sample.

        Args:
            messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
            num_images: if given, the number of ``<image>`` + ``<image_gen>`` markers it must match.
            cfg_drop: null the whole input except image spans (CFG dropout); labels unchanged.
            truncate: a sequence over the limit keeps its first ``limit`` tokens, provided every
                image span ends within them (text after the last image is cut); otherwise, and
                always when False, it raises :class:`SequenceTooLongError`.
            max_length: the limit for this call (default: the processor's ``max_length``).

        Returns:
            ``input_ids``: LongTensor (L,); ``labels``: LongTensor (L,), -100 where unsupervised;
            with ``truncate``, also ``truncated``: how many tokens were cut (an int, 0 for most).
        """
        if num_images is not None:
            found = sum(len(_MARKER.findall(m["content"])) for m in messages)
            if found != num_images:
                raise ValueError(f"messages have {found} image markers but num_images={num_images}")
        ids, labels = self._chat(messages, open_assistant=False)
        limit = self.max_length if max_length is None else max_length
        full = len(ids)
        if truncate and limit is not None and full > limit:
            ids, labels = self._truncate(ids, labels, limit)
        self._check_length(len(ids), limit)
        input_ids = torch.tensor(ids, dtype=torch.long)
        if cfg_drop:
            input_ids = self.null_like(input_ids)
        out = {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.long)}
        return {**out, "truncated": full - len(ids)} if truncate else out

    def should_drop(self, generator: torch.Generator | None = None) -> bool:
        """True with probability ``cfg_dropout`` (one draw from ``generator``)."""
        return bool(torch.rand((), generator=generator) < self.cfg_dropout)

    def generation_prompt(self, prompt: str) -> torch.Tensor:
        """Ids up to the generated image's placeholders, LongTensor (Lp,).

        ``...<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<im_start>``; the
        sampler appends ``tokens_per_image`` image_gen placeholders and ``<im_end>``. ``<image>``
        markers in ``prompt`` (an editing source) are expanded as in :meth:`encode`.
        """
        ids, _ = self._chat([{"role": "user", "content": prompt}], open_assistant=True)
        ids.append(self.im_start_id)
        self._check_length(len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def answer_prompt(self, question: str, num_images: int = 1) -> torch.Tensor:
        """Ids of an understanding prompt, LongTensor (Lp,), ending with ``<|im_start|>assistant\\n``.

        The user content is ``"<image>" * num_images + "\\n" + question`` (images first).
        """
        content = IMAGE * num_images + "\n" + question
        ids, _ = self._chat([{"role": "user", "content": content}], open_assistant=True)
        self._check_length(len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def null_like(self, ids: torch.Tensor) -> torch.Tensor:
        """The unconditional CFG input of the same length: ``ids`` (..., L) -> (..., L).

        Every token becomes ``<no_mean>`` except ``<image>``, ``<image_gen>``, ``<im_start>`` and
        ``<im_end>`` (so an editing source image survives). Same shape and dtype.
        """
        keep = torch.isin(ids, self._kept_by_null.to(ids.device))
        return torch.where(keep, ids, torch.full_like(ids, self.null_id))

    def collate(
        self, samples: Sequence[dict | torch.Tensor], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad samples into a batch.

        Args:
            samples: dicts with ``input_ids`` (L_i,) and optionally ``labels`` (L_i,), or bare id
                tensors (prompts; their labels are all -100).
            padding_side: ``"right"`` (training) or ``"left"`` (generation prompts).

        Returns:
            ``input_ids`` (B, L) long padded with ``pad_id``, ``attention_mask`` (B, L) bool, False
            on pads, ``labels`` (B, L) long, -100 on pads; L = the longest sample.
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be one of ('right', 'left'), got {padding_side!r}")
        if not samples:
            raise ValueError("collate needs at least one sample")
        rows = [s if isinstance(s, dict) else {"input_ids": s} for s in samples]
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[b, span] = row["input_ids"]
            attention_mask[b, span] = True
            if "labels" in row:
                labels[b, span] = row["labels"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def batch_index(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gather indices of a padded batch, so that the training step needs no host-device sync.

        Computed where the batch is built (CPU, in the loader) and moved with it; the step then
        gathers with ``index_select`` / ``index_copy`` on tensors whose lengths the host knows,
        instead of boolean masks whose result size needs a device round trip. Returns:

        * ``image_positions`` (N*T,) long: flat index into B*L of every image placeholder, in
          reading order (image n owns entries n*T .. n*T + T-1, T = ``tokens_per_image``);
        * ``gen_images`` (G,) long: which of the N images are generation (``<image_gen>``) images;
        * ``text_positions`` (K,) long: flat index into B*L of every position i whose next token
          (labels[b, i+1], not padding) is supervised; ``text_rows`` (K,) long: its row b.

        Raises naming the count when the placeholders are not a whole number of images.
        """
        b, length = input_ids.shape
        placeholders = torch.tensor([self.image_id, self.image_gen_id], device=input_ids.device)
        flat_ids = input_ids.flatten()
        image_positions = torch.isin(flat_ids, placeholders).nonzero().squeeze(1)
        n = image_positions.numel()
        if n % self.tokens_per_image:
            raise ValueError(
                f"the batch has {n} image placeholders, not a multiple of {self.tokens_per_image} per image"
            )
        first = flat_ids[image_positions[:: self.tokens_per_image]]
        gen_images = (first == self.image_gen_id).nonzero().squeeze(1)
        target = labels.masked_fill(~attention_mask.bool(), IGNORE_INDEX)[:, 1:]
        rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
        return {
            "image_positions": image_positions,
            "gen_images": gen_images,
            "text_positions": rows * length + cols,
            "text_rows": rows,
        }

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of ids (L,), special tokens (chat, image, null) skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)
