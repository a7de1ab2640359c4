"""The digit judge: trained on the demo's training digits, >= 95% on the held-out ones at any size."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from cheers_pl.eval.judge import GAMMA, C, DigitJudge, features
from data_recipes.demo import digit_sizes

TRAIN, HELD = 300, 40  # the demo's defaults: --digits 300 --heldout 40


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def judge(digits):
    return DigitJudge.fit(digits.images[:TRAIN] / 16.0, digits.target[:TRAIN])


@pytest.mark.parametrize("size", [8, 32, 48, 64])
def test_heldout_accuracy_at_every_size(judge, digits, size):
    held = digit_sizes(digits.images[TRAIN : TRAIN + HELD], size)  # (N, size, size) as the model sees them
    rgb = torch.tensor(held).float()[:, None].expand(-1, 3, -1, -1)  # (N, 3, size, size)
    assert judge.accuracy(rgb, digits.target[TRAIN : TRAIN + HELD]) >= 0.95


def test_stored_decision_equals_sklearn(judge, digits):
    x = features(digits.images / 16.0)
    svc = SVC(C=C, gamma=GAMMA).fit(x[:TRAIN], digits.target[:TRAIN])
    assert np.array_equal(judge.predict_features(x), svc.predict(x))


def test_save_load_roundtrip_and_bad_files(judge, digits, tmp_path):
    path = judge.save(tmp_path / "j" / "digits.npz")
    again = DigitJudge.load(path)
    imgs = digits.images[TRAIN:] / 16.0
    assert np.array_equal(again.predict(imgs), judge.predict(imgs))
    with pytest.raises(FileNotFoundError, match="no digit judge at .*nope.npz"):
        DigitJudge.load(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        DigitJudge.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", support_vectors=judge.support_vectors)
    with pytest.raises(ValueError, match=r"partial.npz lacks the array\(s\) \['dual_coef'"):
        DigitJudge.load(tmp_path / "partial.npz")


def test_features_and_bad_shapes(judge):
    black = torch.zeros(2, 3, 32, 32)
    assert np.array_equal(features(black), np.zeros((2, 64)))  # a blank image stays blank
    dim = torch.rand(1, 3, 40, 40) * 0.2
    bright = dim * 5
    assert np.allclose(features(dim), features(bright))  # brightness does not matter
    with pytest.raises(ValueError, match=r"\(N,3,H,W\)"):
        judge.predict(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"got \(8, 8\)"):
        judge.predict(torch.zeros(8, 8))
