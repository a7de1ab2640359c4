"""`cheers eval demo`: the report's fields on a tiny random model, and the sensitivities' pairing."""

import json
from types import SimpleNamespace

import pytest
import torch

from cheers_pl.cli import main
from cheers_pl.eval import demo_eval, heldout
from cheers_pl.eval.detail import detail_ratio, high_frequency_fraction
from cheers_pl.io.export import export_model
from tests.helpers import tiny_random_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = ["data", "demo", "--out", str(out), "--digits", "60", "--texts", "2", "--heldout", "12"]
    assert main([*args, "--reading", "4", "--heldout-reading", "10"]) == 0
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_random_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_model(model, tmp_path_factory.mktemp("model") / "tiny")


def test_eval_demo_command_writes_every_field(exported, demo, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "demo", "--model", str(exported), "--data", str(demo), "--out", str(out)]
    assert main([*args, "--per-digit", "2", "--steps", "2", "--cfg", "2.5", "--shift", "0.7"]) == 0
    result = json.loads((out / "eval.json").read_text())
    for name in demo_eval.METRICS:
        assert isinstance(result[name], float), name
    assert (
        result["settings"] | {"cfg_scale": 2.5, "steps": 2, "shift": 0.7, "per_digit": 2}
        == result["settings"]
    )
    assert result["t2i_images"] == 20 and sum(result["t2i_judged_as"].values()) == 20
    assert 0.0 <= result["t2i_acc"] <= 1.0 and set(result["t2i_per_digit"]) == {str(d) for d in range(10)}
    assert result["read_digit_count"] == 12 and result["read_number_count"] == 10
    assert 0.0 <= result["read_digit_acc"] <= 1.0 and 0.0 <= result["read_number_acc"] <= 1.0
    assert result["read_number_acc"] <= result["read_number_char_acc"] <= 1.0
    assert result["fm_heldout"] > 0 and result["text_heldout"] > 0 and result["detail_ratio"] > 0
    assert result["loss_samples"] == {"generation": 12, "understanding": 22}
    assert result["judge"]["heldout_count"] == 12 and result["model"] == str(exported)
    table = (out / "eval.md").read_text()
    assert "| T2I prompt-following (judge) |" in table and "cfg 2.5, steps 2, shift 0.7" in table
    assert "| image sensitivity |" in table and table in capsys.readouterr().out
    assert (out / "t2i.png").is_file()


def test_missing_data_is_named(exported, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["eval", "demo", "--model", str(exported), "--data", str(tmp_path / "none")])
    assert err.value.code == 2
    assert f"{tmp_path / 'none' / 'heldout'} does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="per_digit must be >= 1"):
        demo_eval.EvalSettings(per_digit=0)


def test_parse_number():
    assert demo_eval.parse_number("It is the number 1234.") == "1234"
    assert demo_eval.parse_number("It is the digit 7.") == "7"
    assert demo_eval.parse_number("no digits here") is None


def test_char_accuracy():
    assert demo_eval.char_accuracy("1234", "1234") == 1.0
    assert demo_eval.char_accuracy("1273", "1234") == 0.5
    assert demo_eval.char_accuracy("12", "1234") == 0.5  # over the longer length
    assert demo_eval.char_accuracy("12345", "1234") == 0.8
    assert demo_eval.char_accuracy(None, "12") == 0.0


def test_identity_shuffle_gives_zero_sensitivity(model, demo):
    gen = heldout.read_samples(demo / "heldout", task="generation")
    und = heldout.read_samples(demo / "heldout_understanding", task="understanding")
    same = list(range(len(gen)))
    p = heldout.prompt_sensitivity(model, gen, batch_size=5, perm=same)
    assert p["prompt_sensitivity"] == 0.0 and p["fm_heldout"] > 0
    i = heldout.image_sensitivity(model, und, batch_size=5, perm=list(range(len(und))))
    assert i["image_sensitivity"] == 0.0 and i["text_heldout"] > 0
    again = heldout.prompt_sensitivity(model, gen, batch_size=5)  # a derangement: a different pairing
    assert again["fm_heldout"] == p["fm_heldout"] and again["fm_shuffled_prompts"] != p["fm_heldout"]


class Recorder:
    """A stand-in model: records what each forward pass gets and draws noise as CheersModel does."""

    def __init__(self, model):
        self.processor, self.image_size = model.processor, model.image_size
        self.placeholder_ids = model.placeholder_ids
        self.calls = []

    def __call__(self, batch, generator):
        z0 = torch.randn(batch["images"].shape, generator=generator)
        rows = [r[m].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        self.calls.append((rows, batch["images"].clone(), z0))
        n = batch["images"].shape[0]
        # FM loss: the mean image brightness; text loss rows: 1 per token of each row
        counts = batch["attention_mask"].sum(-1)
        return SimpleNamespace(loss_fm=batch["images"].mean(), num_gen_images=n,
                               text_loss_rows=counts.float(), text_count_rows=counts)  # fmt: skip


def test_shuffled_prompts_keep_each_image_its_noise(model, demo):
    gen = heldout.read_samples(demo / "heldout", task="generation")[:6]
    rec = Recorder(model)
    perm = [1, 2, 0, 4, 5, 3]
    result = heldout.prompt_sensitivity(rec, gen, batch_size=3, perm=perm)
    (t0, i0, z0), (t1, i1, z1), (s0, j0, y0), (s1, j1, y1) = rec.calls  # true: 2 batches, then shuffled
    assert torch.equal(i0, j0) and torch.equal(i1, j1)  # the same images in the same slots ...
    assert torch.equal(z0, y0) and torch.equal(z1, y1)  # ... with the same noise
    rows = t0 + t1
    assert s0 + s1 == [rows[p] for p in perm]  # only the prompts moved
    assert result["prompt_sensitivity"] == 0.0  # this stand-in's FM loss ignores the prompt
    assert result["fm_heldout"] == pytest.approx(float(torch.cat([i0, i1]).mean()))


def test_spread_and_derangement():
    assert heldout.spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    for n in (2, 3, 10):
        perm = heldout.derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    assert heldout.derangement(7, 1) == heldout.derangement(7, 1)


def test_detail_ratio():
    g = torch.Generator().manual_seed(0)
    wave = 0.5 + 0.5 * torch.cos(torch.arange(32) * 2 * torch.pi / 32)  # one period: a low frequency
    smooth = wave.expand(4, 3, 32, 32).clone()
    noisy = torch.rand(4, 3, 32, 32, generator=g)
    assert float(high_frequency_fraction(torch.zeros(2, 32, 32)).max()) == 0.0
    assert float(high_frequency_fraction(smooth).mean()) < 0.01 < float(high_frequency_fraction(noisy).mean())
    r = detail_ratio(noisy, smooth)
    assert r["detail_ratio"] > 5 and r["detail_ratio"] == pytest.approx(
        r["detail_generated"] / r["detail_real"]
    )
    assert detail_ratio(smooth * 0.5, smooth)["detail_ratio"] == pytest.approx(1.0)  # contrast-free
