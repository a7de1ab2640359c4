"""Fixtures shared by the tokenizer and processor tests (each tokenizer is built once per session)."""

import pytest

from cheers_pl.components.processor import CheersProcessor
from cheers_pl.components.tokenizer import FLAVORS
from tests.components.text_cases import N


@pytest.fixture(scope="session")
def paper():
    return FLAVORS["paper"]()


@pytest.fixture(scope="session")
def qwen_package():
    return FLAVORS["qwen-package"]()


@pytest.fixture(scope="session")
def tiny():
    return FLAVORS["tiny"]()


@pytest.fixture(scope="session")
def proc(paper):
    return CheersProcessor(paper, tokens_per_image=N)
