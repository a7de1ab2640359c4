"""The processor: chat template, image-span expansion, labels, CFG dropout, prompts, collation."""

import pytest
import torch

from cheers_pl.components.processor import CheersProcessor, SequenceTooLongError
from cheers_pl.components.tokenizer import (
    CHAT_END,
    IGNORE_INDEX,
    IMAGE,
    IMAGE_GEN,
    PAPER_TOKENIZER_DIR,
)
from tests.components.text_cases import CHAT, N
from tests.helpers import chat_template_ids

# ---- processor: layout ------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["paper", "tiny"])
def test_text_chat_equals_chat_template(flavor, request):
    tokenizer = request.getfixturevalue(flavor)
    p = CheersProcessor(tokenizer, tokens_per_image=N)
    with_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    for messages in (CHAT, with_system, CHAT[:1]):
        assert p.encode(messages)["input_ids"].tolist() == chat_template_ids(tokenizer, messages)
    prompt = p.generation_prompt("A cat drinking coffee.")
    expected = chat_template_ids(tokenizer, [{"role": "user", "content": "A cat drinking coffee."}], True)
    assert prompt.tolist() == [*expected, p.im_start_id]


def test_processor_token_ids(proc):
    assert (proc.image_id, proc.image_gen_id, proc.im_start_id, proc.im_end_id, proc.null_id) == (
        151665,
        151666,
        151667,
        151668,
        151669,
    )
    assert (proc.pad_id, proc.chat_start_id, proc.chat_end_id) == (151643, 151644, 151645)


def test_image_expansion(proc):
    ids = proc.encode([{"role": "user", "content": f"{IMAGE}\nWhat is this?"}], num_images=1)["input_ids"]
    assert (ids == proc.image_id).sum() == N
    start = (ids == proc.image_id).nonzero()[0].item()
    assert ids[start - 1] == proc.im_start_id
    assert ids[start : start + N].eq(proc.image_id).all()
    assert ids[start + N] == proc.im_end_id
    assert (ids == proc.im_start_id).sum() == 1 and (ids == proc.im_end_id).sum() == 1
    with pytest.raises(ValueError, match=r"1 image markers.*num_images=2"):
        proc.encode([{"role": "user", "content": f"{IMAGE} hi"}], num_images=2)
    two = [{"role": "user", "content": f"{IMAGE}{IMAGE} edit"}, {"role": "assistant", "content": IMAGE_GEN}]
    assert (proc.encode(two, num_images=3)["input_ids"] == proc.image_id).sum() == 2 * N


def test_labels_supervise_only_the_answer(proc, paper):
    answer = "A grey cat sleeping on a red sofa."
    messages = [{"role": "user", "content": f"{IMAGE}Describe."}, {"role": "assistant", "content": answer}]
    sample = proc.encode(messages)
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.shape == labels.shape and labels.dtype == torch.long
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    assert paper.decode(labels[supervised]) == answer + CHAT_END
    assert (labels[ids == proc.image_id] == IGNORE_INDEX).all()
    # everything before the answer (system turn, user turn, assistant header) is unsupervised
    first = supervised.nonzero()[0].item()
    assert paper.decode(ids[:first]).endswith("Describe.<|im_end|>\n<|im_start|>assistant\n")


def test_labels_of_a_generated_image(proc):
    messages = [
        {"role": "user", "content": "Draw a rocket."},
        {"role": "assistant", "content": f"Here it is: {IMAGE_GEN}"},
    ]
    sample = proc.encode(messages, num_images=1)
    ids, labels = sample["input_ids"], sample["labels"]
    gen = (ids == proc.image_gen_id).nonzero().flatten()
    assert len(gen) == N
    start, end = gen[0] - 1, gen[-1] + 1
    assert ids[start] == proc.im_start_id and labels[start] == proc.im_start_id  # learns to start an image
    assert (labels[gen] == IGNORE_INDEX).all()
    assert ids[end] == proc.im_end_id and labels[end] == IGNORE_INDEX  # predicted from a noisy position
    assert labels[end + 1] == proc.chat_end_id
    # a user-side generated image (e.g. in a prompt) is not supervised at all
    user_side = proc.encode([{"role": "user", "content": IMAGE_GEN}])
    assert (user_side["labels"] == IGNORE_INDEX).all()


def test_cfg_drop(proc):
    messages = [
        {"role": "user", "content": f"Make the cat blue. {IMAGE}"},
        {"role": "assistant", "content": IMAGE_GEN},
    ]
    kept = torch.tensor([proc.image_id, proc.image_gen_id, proc.im_start_id, proc.im_end_id])
    plain, dropped = proc.encode(messages), proc.encode(messages, cfg_drop=True)
    assert dropped["input_ids"].shape == plain["input_ids"].shape
    assert torch.equal(dropped["labels"], plain["labels"])
    survives = torch.isin(plain["input_ids"], kept)
    assert torch.equal(dropped["input_ids"][survives], plain["input_ids"][survives])
    assert (dropped["input_ids"][~survives] == proc.null_id).all()
    assert (survives.sum() == 2 * (N + 2)).item()  # the source image survives too


def test_null_like_keeps_image_spans(proc):
    ids = torch.stack([proc.generation_prompt("a red car"), proc.generation_prompt("a red bus")])
    ids = torch.cat([ids, torch.full((2, N), proc.image_gen_id), torch.full((2, 1), proc.im_end_id)], dim=1)
    null = proc.null_like(ids)
    assert null.shape == ids.shape and null.dtype == ids.dtype
    assert (null[:, -N - 2 :] == ids[:, -N - 2 :]).all()
    assert (null[:, : -N - 2] == proc.null_id).all()


def test_should_drop_frequency(paper):
    p = CheersProcessor(paper, tokens_per_image=N, cfg_dropout=0.2)
    g = torch.Generator().manual_seed(0)
    rate = sum(p.should_drop(g) for _ in range(4000)) / 4000
    assert abs(rate - 0.2) < 0.025
    draws = [p.should_drop(torch.Generator().manual_seed(seed)) for seed in range(100)]
    assert draws == [p.should_drop(torch.Generator().manual_seed(seed)) for seed in range(100)]
    never = CheersProcessor(paper, tokens_per_image=N, cfg_dropout=0.0)
    always = CheersProcessor(paper, tokens_per_image=N, cfg_dropout=1.0)
    assert not any(never.should_drop() for _ in range(100))
    assert all(always.should_drop() for _ in range(100))


def test_prompts(proc, paper):
    gen = proc.generation_prompt("A rocket.")
    assert gen.dtype == torch.long and gen[-1] == proc.im_start_id
    assert proc.image_gen_id not in gen.tolist()
    answer = proc.answer_prompt("How many cats?", num_images=2)
    tail = [proc.chat_start_id, *paper("assistant\n", add_special_tokens=False)["input_ids"]]
    assert answer[-len(tail) :].tolist() == tail
    assert (answer == proc.image_id).sum() == 2 * N
    # images come first in the user turn, then a newline and the question
    user = proc.decode(answer)
    assert user.endswith("user\n\nHow many cats?\nassistant\n")
    assert paper.decode(answer).count("<im_start>" + "<image>" * N + "<im_end>") == 2


def test_collate(proc):
    short = proc.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    long = proc.encode(
        [{"role": "user", "content": f"{IMAGE} Describe it."}, {"role": "assistant", "content": "A cat."}]
    )
    ls, ll = len(short["input_ids"]), len(long["input_ids"])
    assert ll > ls
    batch = proc.collate([short, long])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, ll)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool
    assert torch.equal(batch["input_ids"][0, :ls], short["input_ids"])
    assert (batch["input_ids"][0, ls:] == proc.pad_id).all()
    assert batch["attention_mask"][0, :ls].all() and not batch["attention_mask"][0, ls:].any()
    assert torch.equal(batch["labels"][0, :ls], short["labels"])
    assert (batch["labels"][0, ls:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].all() and torch.equal(batch["labels"][1], long["labels"])

    prompts = [proc.generation_prompt("a cat"), proc.generation_prompt("a cat drinking hot coffee")]
    left = proc.collate(prompts, padding_side="left")
    lp, width = len(prompts[0]), left["input_ids"].shape[1]
    assert width == len(prompts[1])
    assert torch.equal(left["input_ids"][0, width - lp :], prompts[0])
    assert (left["input_ids"][0, : width - lp] == proc.pad_id).all()
    assert not left["attention_mask"][0, : width - lp].any() and left["attention_mask"][0, width - lp :].all()
    assert (left["labels"] == IGNORE_INDEX).all()
    assert (left["input_ids"][:, -1] == proc.im_start_id).all()
    with pytest.raises(ValueError, match="right.*left"):
        proc.collate(prompts, padding_side="middle")


def test_decode_skips_special_tokens(proc):
    ids = proc.encode([{"role": "user", "content": f"{IMAGE}A cat."}], cfg_drop=False)["input_ids"]
    text = proc.decode(ids)
    assert "A cat." in text and "<" not in text


def test_special_token_text_in_content_stays_text(proc):
    ids = proc.encode([{"role": "user", "content": f"literal {CHAT_END} and <im_start> here"}])["input_ids"]
    assert (ids == proc.chat_end_id).sum() == 2  # the system and user turns' own
    assert (ids == proc.im_start_id).sum() == 0


# ---- processor: errors ------------------------------------------------------------------------


def test_max_length(paper):
    messages = [{"role": "user", "content": IMAGE * 5}]
    length = len(CheersProcessor(paper, tokens_per_image=N).encode(messages)["input_ids"])
    p = CheersProcessor(paper, tokens_per_image=N, max_length=30)
    assert len(p.encode([{"role": "user", "content": "Hi"}])["input_ids"]) <= 30
    with pytest.raises(SequenceTooLongError, match=rf"{length} tokens.*max_length=30") as info:
        p.encode(messages)
    assert isinstance(info.value, ValueError)
    with pytest.raises(SequenceTooLongError):
        p.answer_prompt("How many?", num_images=5)


def test_truncate_cuts_text_after_the_last_image_and_keeps_every_span(paper):
    long_answer = "word " * 200
    messages = [
        {"role": "user", "content": f"{IMAGE}\nDescribe."},
        {"role": "assistant", "content": long_answer},
    ]
    full = CheersProcessor(paper, tokens_per_image=N).encode(messages)
    p = CheersProcessor(paper, tokens_per_image=N, max_length=40)
    cut = p.encode(messages, num_images=1, truncate=True)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 40
    assert cut["truncated"] == len(full["input_ids"]) - 40
    assert cut["input_ids"].tolist() == full["input_ids"][:40].tolist()
    assert cut["labels"].tolist() == full["labels"][:40].tolist()
    assert (cut["input_ids"] == p.image_id).sum() == N and (cut["input_ids"] == p.im_end_id).sum() == 1
    assert p.encode([{"role": "user", "content": "Hi"}], truncate=True)["truncated"] == 0


def test_truncate_never_cuts_into_or_drops_an_image_span(paper):
    p = CheersProcessor(paper, tokens_per_image=N, max_length=30)
    generation = [{"role": "user", "content": "a " * 100}, {"role": "assistant", "content": IMAGE_GEN}]
    with pytest.raises(SequenceTooLongError, match="image span ends at token"):
        p.encode(generation, num_images=1, truncate=True)  # the image comes after the long prompt
    with pytest.raises(SequenceTooLongError, match="max_length=30"):
        p.encode([{"role": "user", "content": IMAGE * 5}], num_images=5, truncate=True)


def test_a_per_call_max_length_overrides_the_processor_s(paper):
    p = CheersProcessor(paper, tokens_per_image=N)  # no limit of its own
    with pytest.raises(SequenceTooLongError, match="max_length=10"):
        p.encode([{"role": "user", "content": "word " * 50}], max_length=10)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "256"])
def test_tokens_per_image_must_be_positive_int(paper, bad):
    with pytest.raises(ValueError, match="tokens_per_image"):
        CheersProcessor(paper, tokens_per_image=bad)


def test_bad_inputs(proc):
    with pytest.raises(ValueError, match="role"):
        proc.encode([{"role": "robot", "content": "beep"}])
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(PAPER_TOKENIZER_DIR), local_files_only=True)
    with pytest.raises(ValueError, match="<image>"):
        CheersProcessor(bare, tokens_per_image=N)
