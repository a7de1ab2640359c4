"""``DigitJudge``: a digit classifier that is not the model, to score text-to-image prompt-following.

An RBF support-vector machine (scikit-learn ``SVC(C=10, gamma=0.05)``, one-vs-one) trained on the
demo's training digits only (``load_digits`` images 0 .. ``--digits``-1, 8x8, ink 0..16). Any
image is brought to the same features: grayscale (the channel mean), area-downsampled to 8x8
(``adaptive_avg_pool2d``: a 64 px digit, nearest-upscaled from 8x8, comes back exactly; at 32 or
48 px nearly), flattened to 64 values and divided by its maximum (so a dim generated digit
scores like a bright one; a black image stays black). Training takes well under a second and is
deterministic (libsvm has no random step without probability estimates).

Stored as ``.npz`` of plain arrays (read with ``allow_pickle=False``: no code in the file); the
decision is recomputed here from the support vectors, the dual coefficients and intercepts, as
libsvm computes it (checked against scikit-learn when fitting). The demo recipe writes it to
``data/demo/judge/digits.npz`` and its held-out accuracy into ``data/demo/manifest.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SIDE = 8  # the feature grid (the source digits' resolution)
C, GAMMA = 10.0, 0.05
KEYS = ("support_vectors", "dual_coef", "intercept", "n_support", "classes", "gamma")


def features(images: Tensor | np.ndarray) -> np.ndarray:
    """Images (N,3,H,W) or (N,H,W) in [0,1] (any H, W >= 1) -> features (N, 64) float64.

    Grayscale, area-downsampled to 8x8, each row divided by its maximum (floored at 1e-3).
    """
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 4:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"judge: images must be (N,3,H,W), (N,1,H,W) or (N,H,W), got {tuple(x.shape)}")
        x = x.mean(1)
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"judge: images must be (N,3,H,W), (N,1,H,W) or (N,H,W), got {tuple(x.shape)}")
    small = F.adaptive_avg_pool2d(x[:, None], SIDE).flatten(1).double().numpy()
    return small / np.maximum(small.max(1, keepdims=True), 1e-3)


class DigitJudge:
    """A one-vs-one RBF SVM over :func:`features`; ``predict`` takes images at any size.

    Arrays: ``support_vectors`` (S, 64), ``dual_coef`` (K-1, S), ``intercept`` (K(K-1)/2,),
    ``n_support`` (K,) support vectors per class (in class order), ``classes`` (K,), ``gamma``.
    """

    def __init__(self, support_vectors, dual_coef, intercept, n_support, classes, gamma):
        self.support_vectors = np.asarray(support_vectors, dtype=np.float64)
        self.dual_coef = np.asarray(dual_coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.n_support = np.asarray(n_support, dtype=np.int64)
        self.classes = np.asarray(classes, dtype=np.int64)
        self.gamma = float(gamma)
        k, s = len(self.classes), len(self.support_vectors)
        shapes_ok = (
            self.support_vectors.ndim == 2
            and self.support_vectors.shape[1] == SIDE * SIDE
            and self.dual_coef.shape == (k - 1, s)
            and self.intercept.shape == (k * (k - 1) // 2,)
            and self.n_support.shape == (k,)
            and int(self.n_support.sum()) == s
        )
        if not shapes_ok:
            raise ValueError(
                f"judge arrays disagree: support_vectors {self.support_vectors.shape}, dual_coef "
                f"{self.dual_coef.shape}, intercept {self.intercept.shape}, n_support {self.n_support.shape} "
                f"(sum {int(self.n_support.sum())}), classes {self.classes.shape}"
            )

    # -- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, images: Tensor | np.ndarray, labels) -> DigitJudge:
        """Train on ``images`` (N,3,H,W) / (N,H,W) in [0,1] with integer ``labels`` (N,)."""
        from sklearn.svm import SVC

        x, y = features(images), np.asarray(labels, dtype=np.int64)
        if len(x) != len(y):
            raise ValueError(f"judge: {len(x)} images but {len(y)} labels")
        svc = SVC(C=C, gamma=GAMMA, kernel="rbf").fit(x, y)
        judge = cls(svc.support_vectors_, svc.dual_coef_, svc.intercept_, svc.n_support_, svc.classes_, GAMMA)
        if not np.array_equal(judge.predict_features(x), svc.predict(x)):
            raise RuntimeError("judge: the stored decision disagrees with scikit-learn's SVC")
        return judge

    # -- prediction ------------------------------------------------------------------------------
    def votes(self, x: np.ndarray) -> np.ndarray:
        """One-vs-one votes (N, K) of features ``x`` (N, 64), libsvm's rule (class i wins on > 0)."""
        d2 = ((x[:, None, :] - self.support_vectors[None]) ** 2).sum(-1)
        kernel = np.exp(-self.gamma * d2)  # (N, S)
        k = len(self.classes)
        start = np.concatenate([[0], np.cumsum(self.n_support)])
        votes = np.zeros((len(x), k), dtype=np.int64)
        p = 0
        for i in range(k):
            for j in range(i + 1, k):
                si, sj = slice(start[i], start[i + 1]), slice(start[j], start[j + 1])
                dec = (
                    kernel[:, si] @ self.dual_coef[j - 1, si]
                    + kernel[:, sj] @ self.dual_coef[i, sj]
                    + self.intercept[p]
                )
                votes[:, i] += dec > 0
                votes[:, j] += dec <= 0
                p += 1
        return votes

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """Classes (N,) of features (N, 64); ties go to the lower class, as in libsvm."""
        return self.classes[self.votes(x).argmax(1)]

    def predict(self, images: Tensor | np.ndarray) -> np.ndarray:
        """Digits (N,) int64 of images (N,3,H,W) / (N,H,W) in [0,1], any size."""
        return self.predict_features(features(images))

    def accuracy(self, images: Tensor | np.ndarray, labels) -> float:
        """Fraction of ``images`` judged as their ``labels`` (N,)."""
        labels = np.asarray(labels, dtype=np.int64)
        return float((self.predict(images) == labels).mean())

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the arrays to ``path`` (.npz, no pickled objects); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k) for k in KEYS[:-1]}
        with open(path, "wb") as f:  # np.savez_compressed(str) would append .npz
            np.savez_compressed(f, **arrays, gamma=np.float64(self.gamma))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DigitJudge:
        """A judge saved by :meth:`save`; raises naming the file and what is wrong with it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no digit judge at {path}; the demo recipe writes it (cheers data demo --out DIR)"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in KEYS if k not in data.files]
                if missing:
                    raise ValueError(f"digit judge {path} lacks the array(s) {missing} (has {data.files})")
                arrays = {k: data[k] for k in KEYS}
        except (OSError, ValueError) as err:
            if str(path) in str(err):
                raise
            raise ValueError(f"digit judge {path} cannot be read: {err}") from None
        try:
            return cls(**{**arrays, "gamma": float(arrays["gamma"])})
        except ValueError as err:
            raise ValueError(f"digit judge {path}: {err}") from None
