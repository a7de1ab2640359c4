"""CheersModel: mixed-batch losses, overfitting, the cached CFG sampler, answering, bad input."""

import time

import pytest
import torch

from cheers_pl import flow
from cheers_pl.components.llm import mixed_attention_mask, positions_from_valid
from cheers_pl.model import CheersModel
from cheers_pl.smoke import mixed_batch, photo
from cheers_pl.spec import CheersSpec, ComponentSpec
from tests.helpers import randomize_zero_inits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CheersModel(CheersSpec.tiny())
    randomize_zero_inits(m)
    return m.eval()


@pytest.fixture(scope="module")
def batch(model):
    return mixed_batch(model)


def test_forward_reports_every_loss(model, batch):
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out.num_gen_images == 1 and out.num_und_images == 1
    assert out.loss_text > 0 and out.loss_fm > 0
    torch.testing.assert_close(out.loss, out.loss_text + model.spec.fm_weight * out.loss_fm)
    assert out.gate.shape == (1, model.latent_side, model.latent_side)
    assert out.t[0] == 1.0 and 0 < out.t[1] < 1  # understanding at t = 1, generation sampled


def test_gradients_reach_trainable_modules_and_not_the_vae(batch):
    torch.manual_seed(0)
    m = CheersModel(CheersSpec.tiny())
    randomize_zero_inits(m)
    m(batch).loss.backward()
    assert all(p.grad is None for p in m.vae.parameters())
    for name in ("pixel_decoder", "semantic_encoder", "projector", "llm", "cfm_head"):
        grads = [
            p.grad for n, p in getattr(m, name).named_parameters() if p.requires_grad and "head." not in n
        ]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_tiny_model_overfits_one_mixed_batch(batch):
    torch.manual_seed(0)
    m = CheersModel(CheersSpec.tiny())
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    first = last = None
    for _ in range(40):
        out = m(batch, generator=torch.Generator().manual_seed(0))  # the same t and noise every step
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        first = first or (float(out.loss_text.detach()), float(out.loss_fm.detach()))
        last = (float(out.loss_text.detach()), float(out.loss_fm.detach()))
    assert last[0] < 0.2 * first[0], (first, last)
    assert last[1] < 0.5 * first[1], (first, last)


def test_cached_sampler_equals_full_recompute(model):
    prompts = ["a cup of coffee", "a photo of a cat sitting"]  # different lengths: left padding
    a = model.generate(prompts, cfg_scale=4.0, steps=3, seed=1, use_cache=True)
    b = model.generate(prompts, cfg_scale=4.0, steps=3, seed=1, use_cache=False)
    assert a.images.shape == (2, 3, model.image_size, model.image_size)
    assert a.images.min() >= 0 and a.images.max() <= 1
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)


def test_cfg_is_vu_plus_s_times_difference(model):
    # one Euler step: z = z0 + dt * (v_u + s (v_c - v_u)) is affine in s
    z = {
        s: model.generate(["a cup of coffee"], cfg_scale=s, steps=1, seed=3).latents for s in (0.0, 1.0, 3.0)
    }
    torch.testing.assert_close(z[3.0] - z[1.0], 2 * (z[1.0] - z[0.0]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(z[1.0], z[0.0])  # conditional and null prompts differ


def test_generate_is_seeded_and_returns_gates(model):
    a = model.generate(["a cat"], steps=2, seed=5, return_gates=True)
    b = model.generate(["a cat"], steps=2, seed=5)
    torch.testing.assert_close(a.images, b.images)
    assert a.gates.shape == (2, 1, model.latent_side, model.latent_side) and b.gates is None


def test_answer_is_greedy_and_padding_invariant(model):
    img = torch.stack([photo("chelsea", model.image_size), photo("coffee", model.image_size)])
    qs = ["What is this?", "What is in the picture, in a few words?"]
    both = model.answer(img, qs, max_new_tokens=6)
    alone = [model.answer(img[i : i + 1], [qs[i]], max_new_tokens=6)[0] for i in range(2)]
    assert both == alone and all(isinstance(a, str) for a in both)


def test_hfi_none_has_no_gate_and_latent_mode_has_no_decoder(batch):
    m = CheersModel(CheersSpec.tiny(hfi="none"))
    assert not any("hfi_gate.gate" in n for n, _ in m.named_parameters())
    assert m(batch).gate is None
    lat = CheersModel(CheersSpec.tiny(pixel_reconstruct="latent"))
    assert lat.pixel_decoder is None and hasattr(lat.semantic_encoder, "latent_patch_embedding")
    assert torch.isfinite(lat(batch).loss)


def test_bad_images_are_refused_with_the_numbers(model, batch):
    bad = dict(batch, images=torch.rand(2, 3, 24, 24))
    with pytest.raises(ValueError, match="32, 32"):
        model(bad)
    with pytest.raises(ValueError, match="1 images were given"):
        model(dict(batch, images=batch["images"][:1]))
    with pytest.raises(ValueError, match="empty"):
        model.generate([])


def test_bad_specs_fail_before_any_weight_is_built():
    start = time.perf_counter()
    bad = CheersSpec.paper(cfm_head=ComponentSpec("paper", overrides={"width_a": 1152}))
    with pytest.raises(ValueError, match="cfm_head.width_a=1152 but llm.hidden_size=1536"):
        CheersModel(bad)
    assert time.perf_counter() - start < 5  # a paper-size build would take far longer
    with pytest.raises(ValueError, match=r"hfi='off'.*\['gated', 'none'\]"):
        CheersSpec.tiny(hfi="off")
    with pytest.raises(KeyError, match="valid flavors"):
        CheersModel(CheersSpec.tiny(llm=ComponentSpec("huge")))


def test_stage_i_start_from_three_pretrained_folders(tmp_path, model):
    model.llm.model.save_pretrained(tmp_path / "qwen")
    model.processor.tokenizer.save_pretrained(tmp_path / "qwen")
    model.semantic_encoder.vit.save_pretrained(tmp_path / "siglip")
    model.vae.vae.save_pretrained(tmp_path / "vae")
    spec = CheersSpec.pretrained(str(tmp_path / "siglip"), str(tmp_path / "qwen"), str(tmp_path / "vae"))
    spec.projector = spec.cfm_head = ComponentSpec("tiny")
    loaded = CheersModel(spec)
    for name in ("llm", "semantic_encoder", "vae"):
        ref = getattr(model, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert set(ref) == set(got)
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    assert loaded.processor.image_gen_id == model.processor.image_gen_id
    # D starts as a copy of the frozen VAE decoder
    torch.testing.assert_close(loaded.pixel_decoder.decoder.state_dict(), loaded.vae.vae.decoder.state_dict())


def test_generate_refuses_image_markers_in_prompts(model):
    with pytest.raises(ValueError, match="image marker"):
        model.generate(["<image>\nmake it blue"], steps=1)


def test_paper_model_assembles_on_meta_with_the_published_sizes():
    with torch.device("meta"):
        m = CheersModel(CheersSpec.paper())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(m.llm) == 1_543_714_304 and count(m.semantic_encoder) == 428_772_800
    assert count(m.pixel_decoder) == count(m.vae.vae.decoder) + count(m.vae.vae.post_quant_conv)
    assert m.tokens_per_image == 256 and m.processor.image_id == 151665
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"vae", "semantic_encoder"}  # the VAE, and SigLIP's unused pooling head


def test_fm_loss_over_every_image_adds_understanding_images_with_target_zero(batch):
    torch.manual_seed(0)
    paper = CheersModel(CheersSpec.tiny())
    randomize_zero_inits(paper)
    released = CheersModel(CheersSpec.tiny(fm_loss_images="every_image"))
    released.load_state_dict(paper.state_dict())
    assert CheersSpec.tiny(compat="released").resolved_fm_loss_images == "all"
    a = paper(batch, generator=torch.Generator().manual_seed(0))
    b = released(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.loss_text, b.loss_text)
    # recompute by hand: head on both images, target z1 - z0 for the generation image, 0 for the other
    g = torch.Generator().manual_seed(0)
    z1 = paper.vae.encode(batch["images"])
    z0 = torch.randn(z1.shape, generator=g)
    t = flow.sample_t(2, generator=g)
    t = torch.tensor([1.0, float(t[1])])
    tokens, detail = paper.visual_tokens(flow.interpolate(z1, z0, t))
    embeds, span = paper.place_images(batch["input_ids"], tokens)
    valid = batch["attention_mask"]
    hidden, _ = paper.llm(embeds, mixed_attention_mask(span, span, valid), positions_from_valid(valid))
    v, _ = paper.cfm_head(hidden[span >= 0].view(2, paper.tokens_per_image, -1), t, detail)
    per_image = (v - torch.stack([torch.zeros_like(z1[0]), z1[1] - z0[1]])).square().flatten(1).mean(1)
    torch.testing.assert_close(a.loss_fm, per_image[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.loss_fm, per_image.mean(), rtol=1e-4, atol=1e-6)
    assert b.gate.shape[0] == 1  # gate maps are still those of the generation images


def test_generate_saves_the_gate_maps_as_png_on_request(model, tmp_path):
    out = model.generate(["a cat", "a cup"], steps=3, seed=0, gates_dir=str(tmp_path / "gates"))
    files = sorted(p.name for p in (tmp_path / "gates").glob("*.png"))
    assert out.gates.shape[:2] == (3, 2) and len(files) == 6 and files[0] == "sample00_step000.png"


@pytest.mark.parametrize("task", ["understanding", "generation", "text"])
def test_idle_pass_gives_every_trainable_parameter_a_zero_gradient_and_changes_no_loss(task):
    """A rank whose batch holds one task only still runs every module (issue 14, item 11): the
    vision path on a text batch, the CFM head on an understanding or text batch. The loss is
    the same and every gradient the same, the idle modules' exactly zero."""
    from tests.ddp_worker import task_batch

    torch.manual_seed(0)
    m = CheersModel(CheersSpec.tiny())
    randomize_zero_inits(m)
    m.vae.requires_grad_(False)
    head = getattr(m.semantic_encoder.vit, "head", None)
    if head is not None:
        head.requires_grad_(False)
    batch = task_batch(m, task)
    results = {}
    for mode in ("never", "always"):
        m.idle_pass = mode
        m.zero_grad(set_to_none=True)
        out = m(batch, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results[mode] = (out, grads)
    (plain, g0), (idle, g1) = results["never"], results["always"]
    assert idle.loss.item() == plain.loss.item() and idle.loss_fm.item() == plain.loss_fm.item()
    missing = sorted(n for n, g in g1.items() if g is None)
    assert not missing, f"no gradient on {task}: {missing[:5]}"
    idle_names = [n for n, g in g0.items() if g is None]
    assert idle_names or task == "generation"  # without the idle pass some modules sit out
    for name, g in g1.items():
        if g0[name] is None:
            assert not g.any(), name  # exactly zero
        else:
            assert torch.equal(g, g0[name]), name
