"""LLM: the mixed attention mask (by perturbation), padding, supervised-only LM head, loading."""

import pytest
import torch
import torch.nn.functional as F

from cheers_pl import registry
from cheers_pl.components.llm import (
    IGNORE,
    image_span_ids,
    mixed_attention_mask,
    positions_from_valid,
)

IMG = 7  # placeholder id used in these tests
T = 4  # tokens per image


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    return registry.build("llm", "tiny").eval()


def run(llm, embeds, ids, valid):
    span = image_span_ids(ids, torch.tensor([IMG]), T)
    hidden, _ = llm(embeds, mixed_attention_mask(span, span, valid), positions_from_valid(valid))
    return hidden


def sequence():
    # text(3) image(4) text(3): positions 3..6 form one image span
    ids = torch.tensor([[11, 12, 13, IMG, IMG, IMG, IMG, 14, 15, 16]])
    return ids, torch.ones_like(ids, dtype=torch.bool)


def test_span_ids_number_images_in_reading_order():
    ids = torch.tensor(
        [[1, IMG, IMG, IMG, IMG, 2, IMG, IMG, IMG, IMG], [IMG, IMG, IMG, IMG, 3, 3, 3, 3, 3, 3]]
    )
    span = image_span_ids(ids, torch.tensor([IMG]), T)
    assert span.tolist() == [[-1, 0, 0, 0, 0, -1, 1, 1, 1, 1], [2, 2, 2, 2, -1, -1, -1, -1, -1, -1]]


def test_mask_rules():
    ids, valid = sequence()
    valid[0, -1] = False
    span = image_span_ids(ids, torch.tensor([IMG]), T)
    m = mixed_attention_mask(span, span, valid)[0, 0]
    assert m.dtype == torch.bool and m.shape == (10, 10)
    assert m[3, 6] and m[6, 3]  # bidirectional inside the image
    assert not m[2, 3] and m[3, 2]  # text before the image does not see it; the image sees it
    assert m[8, 5] and not m[5, 8]  # causal text after
    assert not m[:, 9][:9].any()  # padding is never a key for others


def test_perturbing_an_image_token_changes_its_image_but_no_earlier_text(llm):
    ids, valid = sequence()
    embeds = llm.embed(ids)
    base = run(llm, embeds, ids, valid)
    bumped = embeds.clone()
    bumped[0, 5] += 1.0  # third token of the image
    out = run(llm, bumped, ids, valid)
    diff = (out - base).abs().amax(-1)[0]
    assert (diff[:3] == 0).all()  # earlier text untouched
    assert (diff[3:5] > 0).all()  # earlier tokens of the same image see it (bidirectional)
    assert (diff[6:] > 0).all()  # later image token and later text see it


def test_perturbing_text_changes_nothing_before_it(llm):
    ids, valid = sequence()
    embeds = llm.embed(ids)
    base = run(llm, embeds, ids, valid)
    bumped = embeds.clone()
    bumped[0, 8] += 1.0
    diff = (run(llm, bumped, ids, valid) - base).abs().amax(-1)[0]
    assert (diff[:8] == 0).all() and (diff[8:] > 0).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_has_no_effect(llm, side):
    ids, valid = sequence()
    base = run(llm, llm.embed(ids), ids, valid)
    pad = torch.full((1, 3), 99)
    pids = torch.cat([ids, pad], 1) if side == "right" else torch.cat([pad, ids], 1)
    pvalid = pids != 99
    embeds = llm.embed(pids)
    embeds[~pvalid] = torch.randn(int((~pvalid).sum()), embeds.shape[-1])  # garbage in padding
    out = run(llm, embeds, pids, pvalid)
    real = out[pvalid].view(1, 10, -1)
    torch.testing.assert_close(real, base, rtol=1e-5, atol=1e-5)


def test_eager_attention_gets_an_additive_mask_and_agrees(llm, tmp_path):
    eager = registry.build("llm", "tiny", attn_implementation="eager").eval()
    eager.load_state_dict(llm.state_dict())
    ids, valid = sequence()
    torch.testing.assert_close(
        run(eager, eager.embed(ids), ids, valid), run(llm, llm.embed(ids), ids, valid), rtol=1e-4, atol=1e-5
    )


def test_supervised_head_equals_full_head_loss(llm):
    torch.manual_seed(1)
    ids = torch.randint(0, 500, (2, 12))
    labels = ids.clone()
    labels[:, :6] = IGNORE
    labels[1, 9] = IGNORE
    valid = torch.ones_like(ids, dtype=torch.bool)
    hidden = run(llm, llm.embed(ids), ids, valid)
    loss, count, row_sums, row_counts = llm.text_loss(hidden, labels)
    full = llm.logits(hidden)[:, :-1].reshape(-1, llm.vocab_size)
    ref = F.cross_entropy(full.double(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert int(count) == int((labels[:, 1:] != IGNORE).sum())
    per_token = F.cross_entropy(
        full.double(), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    torch.testing.assert_close(row_sums.double(), per_token.view(2, -1).sum(-1), rtol=1e-5, atol=1e-5)
    assert row_counts.tolist() == (labels[:, 1:] != IGNORE).sum(-1).tolist()
    none, zero, *_ = llm.text_loss(hidden, torch.full_like(labels, IGNORE))
    assert float(none.detach()) == 0.0 and int(zero) == 0 and none.requires_grad == hidden.requires_grad


def test_paper_parameter_count_is_qwen25_15b():
    with torch.device("meta"):
        m = registry.build("llm", "paper")
    assert sum(p.numel() for p in m.parameters()) == 1_543_714_304
    c = m.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        1536,
        28,
        12,
        2,
    )
    assert c.tie_word_embeddings and c.rope_parameters["rope_theta"] == 1e6


def test_pretrained_round_trip(tmp_path, llm):
    llm.model.save_pretrained(tmp_path / "qwen")
    loaded = registry.build("llm", "pretrained", path=str(tmp_path / "qwen")).eval()
    ids, valid = sequence()
    torch.testing.assert_close(
        run(loaded, loaded.embed(ids), ids, valid), run(llm, llm.embed(ids), ids, valid)
    )


def test_unknown_override_names_valid_keys():
    with pytest.raises(ValueError, match="hidden_sise.*valid keys"):
        registry.config("llm", "tiny", hidden_sise=8)


@torch.no_grad()
def test_prefix_cache_is_reused_in_place_and_matches_a_full_recompute(llm):
    """Two image 'steps' over one static prefix cache: same buffers, prefix untouched, exact hidden."""
    torch.manual_seed(1)
    valid = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    prefix = torch.randn(2, 5, llm.hidden_size)
    cache = llm.prefix_cache(prefix, valid, T)
    layer = cache.layers[0]
    ptr, prefix_keys = layer.keys.data_ptr(), layer.keys[:, :, :5].clone()
    k_span = torch.cat([torch.full((2, 5), -1), torch.zeros(2, T, dtype=torch.long)], 1)
    k_valid = torch.cat([valid, torch.ones(2, T, dtype=torch.bool)], 1)
    img_mask = mixed_attention_mask(torch.zeros(2, T, dtype=torch.long), k_span, k_valid)
    img_pos = valid.sum(-1, keepdim=True) + torch.arange(T)
    full_mask = mixed_attention_mask(k_span, k_span, k_valid)
    full_pos = torch.cat([positions_from_valid(valid), img_pos], 1)
    for _ in range(2):
        tokens = torch.randn(2, T, llm.hidden_size)
        hidden, _ = llm(tokens, img_mask, img_pos, cache=cache, use_cache=True)
        cache.crop(-T)
        reference, _ = llm(torch.cat([prefix, tokens], 1), full_mask, full_pos)
        torch.testing.assert_close(hidden, reference[:, 5:], rtol=1e-5, atol=1e-5)
        assert layer.keys.data_ptr() == ptr  # no new buffer: the image slots were overwritten
        assert torch.equal(layer.keys[:, :, :5], prefix_keys)  # the prefix was never rewritten
