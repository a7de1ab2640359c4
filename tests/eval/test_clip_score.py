"""CLIP score through open_clip with local weights: tiny random CLIP, no network."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cheers_pl.eval.clip_score import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    TORCH_BIN_NAME,
    CLIPScorer,
    clip_score_or_none,
    save_folder,
    tiny_clip,
    tiny_clip_config,
    tiny_preprocess_config,
)

PROMPTS = [
    "a red cube on a table",
    "two dogs running on the beach",
    "a watercolor painting of a lighthouse",
    "an astronaut riding a horse",
    "a bowl of ramen, studio lighting",
    "a city skyline at night",
    "a close-up photo of a bee",
    "a blue bicycle leaning on a wall",
]


@pytest.fixture(scope="module")
def model():
    return tiny_clip(seed=0)


@pytest.fixture(scope="module")
def scorer(model):
    return CLIPScorer(model)


@pytest.fixture(scope="module")
def images():
    return torch.rand(len(PROMPTS), 3, 48, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    return save_folder(model, tiny_clip_config(), tiny_preprocess_config(), tmp_path_factory.mktemp("clip"))


def _hand_preprocess(images):
    """Shortest-side bicubic resize to 32, centre crop, OpenAI mean/std: written out independently."""
    h, w = images.shape[-2:]
    s = 32 / min(h, w)
    nh, nw = round(h * s), round(w * s)
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - 32) // 2, (nw - 32) // 2
    x = x[..., top : top + 32, left : left + 32].clamp(0, 1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_tiny_clip_builds_from_config(model):
    cfg = tiny_clip_config()
    assert isinstance(model, open_clip.CLIP)
    assert not model.training
    assert model.visual.image_size == (32, 32)
    assert model.context_length == cfg["text_cfg"]["context_length"] == 77
    assert model.vocab_size == cfg["text_cfg"]["vocab_size"]
    assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, cfg["embed_dim"])
    assert open_clip.get_model_preprocess_cfg(model)["size"] == 32
    # deterministic in the seed, and the global RNG is left alone
    state = torch.random.get_rng_state()
    other = tiny_clip(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    same = zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in same)
    assert not torch.equal(tiny_clip(seed=1).text_projection, model.text_projection)


def test_score_matches_hand_computation(model, scorer, images):
    pre = scorer.preprocess(images)
    assert pre.shape == (len(PROMPTS), 3, 32, 32)
    torch.testing.assert_close(pre, _hand_preprocess(images))
    tokens = open_clip.SimpleTokenizer(context_length=77)(PROMPTS)
    with torch.no_grad():
        img = model.encode_image(pre)
        txt = model.encode_text(tokens)
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    expected = 100 * cos.clamp_min(0)
    got = scorer.score(images, PROMPTS)
    assert got.shape == (len(PROMPTS),)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # both branches of the clamp are exercised by these inputs
    assert (cos > 0).any() and (cos < 0).any()
    assert scorer.mean_score(images, PROMPTS) == pytest.approx(float(expected.mean()), abs=1e-4)


def test_score_independent_of_batch_composition(model, images):
    full = CLIPScorer(model, batch_size=64).score(images, PROMPTS)
    chunked = CLIPScorer(model, batch_size=3).score(images, PROMPTS)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    perm = torch.randperm(len(PROMPTS), generator=torch.Generator().manual_seed(2))
    permuted = CLIPScorer(model).score(images[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(permuted, full[perm], rtol=1e-5, atol=1e-4)
    single = CLIPScorer(model).score(images[5:6], PROMPTS[5:6])
    torch.testing.assert_close(single, full[5:6], rtol=1e-5, atol=1e-4)


def test_uint8_images_match_float(scorer, images):
    as_u8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(scorer.score(as_u8, PROMPTS), scorer.score(as_u8.float() / 255, PROMPTS))


def test_save_folder_from_folder_round_trip(folder, scorer, images):
    assert (folder / SAFETENSORS_NAME).is_file()
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["model_cfg"] == tiny_clip_config() and cfg["preprocess_cfg"]["size"] == 32
    loaded = CLIPScorer.from_folder(folder)
    assert isinstance(loaded.tokenizer, open_clip.SimpleTokenizer)
    assert loaded.image_size == (32, 32)
    torch.testing.assert_close(loaded.score(images, PROMPTS), scorer.score(images, PROMPTS))
    expected = scorer.mean_score(images, PROMPTS)
    assert clip_score_or_none(images, PROMPTS, str(folder)) == pytest.approx(expected)


def test_from_folder_reads_torch_bin(tmp_path, folder, model, scorer, images):
    (tmp_path / CONFIG_NAME).write_text((folder / CONFIG_NAME).read_text())
    torch.save(model.state_dict(), tmp_path / TORCH_BIN_NAME)
    loaded = CLIPScorer.from_folder(tmp_path)
    torch.testing.assert_close(loaded.score(images, PROMPTS), scorer.score(images, PROMPTS))


def test_missing_folder_and_files_name_the_path(tmp_path, folder):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        CLIPScorer.from_folder(missing)
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        clip_score_or_none(torch.rand(1, 3, 32, 32), ["x"], str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        CLIPScorer.from_folder(empty)
    (empty / CONFIG_NAME).write_text((folder / CONFIG_NAME).read_text())
    with pytest.raises(FileNotFoundError, match=SAFETENSORS_NAME):
        CLIPScorer.from_folder(empty)


def test_clip_score_or_none_without_weights():
    assert clip_score_or_none(torch.rand(2, 3, 32, 32), ["a", "b"], None) is None


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 1, 32, 32), (2, 4, 32, 32), (1, 2, 3, 32, 32)])
def test_wrong_image_shape(scorer, shape):
    with pytest.raises(ValueError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        scorer.score(torch.rand(*shape), ["p"] * shape[0])


def test_length_mismatch_names_both_numbers(scorer):
    with pytest.raises(ValueError, match=r"3 images but 2 prompts"):
        scorer.score(torch.rand(3, 3, 32, 32), ["a", "b"])


def test_rejects_bad_inputs(scorer):
    with pytest.raises(TypeError, match="sequence of strings"):
        scorer.score(torch.rand(1, 3, 32, 32), "a single prompt")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.score(torch.rand(1, 3, 32, 32) * 2 - 1, ["x"])
    with pytest.raises(ValueError, match="zero images"):
        scorer.mean_score(torch.rand(0, 3, 32, 32), [])
    assert scorer.score(torch.rand(0, 3, 32, 32), []).shape == (0,)


def test_resize_modes(model):
    wide = torch.rand(1, 3, 16, 64)
    squash = CLIPScorer(model, preprocess_cfg={"size": 32, "resize_mode": "squash"})
    longest = CLIPScorer(model, preprocess_cfg={"size": 32, "resize_mode": "longest"})
    assert squash.preprocess(wide).shape == longest.preprocess(wide).shape == (1, 3, 32, 32)
    # "longest" pads top and bottom with fill_color 0, i.e. (0 - mean) / std after normalisation
    pad = longest.preprocess(wide)[0, :, 0, 0]
    torch.testing.assert_close(pad, -longest.mean.view(3) / longest.std.view(3))
