"""The linear baseline: ``--arch pca`` bundles (aemon.models, aemon.train)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from aemon.bundle import META_FILE, load_bundle
from aemon.cli import main
from aemon.errors import UsageError
from aemon.models import fit_pca
from aemon.sources import load_source
from aemon.train import TrainConfig


def _numpy_scores(fit: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Mean squared error of x against its projection on the top k principal directions of fit, in [0, 1]."""
    flat = fit.reshape(len(fit), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    v = vt[:k]
    xs = x.reshape(len(x), -1).astype(np.float64)
    recon = np.clip((xs - mean) @ v.T @ v + mean, 0.0, 1.0)
    return np.mean(np.square(xs - recon), axis=1)


def test_pca_bundle_round_trip(tiny_pca_bundle: Path, mnist_digits: np.ndarray) -> None:
    """A saved pca bundle loads and scores exactly like a direct numpy projection on the same fitted images."""
    meta = json.loads((tiny_pca_bundle / META_FILE).read_text())
    assert meta["arch"] == "pca" and meta["latent_dim"] == 16 and meta["task"] == "detect"
    training = meta["training"]
    assert training["optimizer"] == "svd" and training["epochs_run"] == 0
    assert training["n_fit"] == 1350 and training["n_calibration"] == 150
    assert 0 < training["explained_variance"] < 1
    data = load_source("sample:mnist?limit=1500")
    order = np.random.default_rng(0).permutation(len(data))  # the split train_bundle makes with seed 0
    fit = data.x[order[150:]]
    x = mnist_digits[::50, :, :, None].astype(np.float32) / 255.0
    bundle = load_bundle(tiny_pca_bundle)
    np.testing.assert_allclose(bundle.score(x), _numpy_scores(fit, x, 16), rtol=1e-4, atol=1e-7)
    codes = bundle.scorer.encode(x)
    assert codes.shape == (len(x), 16)
    # The threshold is calibrated on the held-out images like any other bundle's.
    cal = np.sort(_numpy_scores(fit, data.x[order[:150]], 16))
    np.testing.assert_allclose(meta["calibration"]["scores"], cal, rtol=1e-4, atol=1e-7)


def test_pca_bundle_scores_from_the_cli(capsys, tmp_path: Path, tiny_pca_bundle: Path,
                                        mnist_digits: np.ndarray) -> None:
    """aemon score takes a pca bundle like any other: one record per image with verdict and p-value."""
    npy = tmp_path / "digits.npy"
    np.save(npy, mnist_digits[:5])
    code = main(["score", str(tiny_pca_bundle), str(npy)])
    out, _ = capsys.readouterr()
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5 and {r["verdict"] for r in records} <= {"ok", "anomaly"}
    assert all(r["model"]["name"] == "tiny-pca" and 0 <= r["p_value"] <= 1 for r in records)


def test_fit_pca_gives_orthonormal_components() -> None:
    """fit_pca returns the data mean, orthonormal directions and the share of variance they explain."""
    rng = np.random.default_rng(0)
    x = rng.random((200, 6, 6, 1)).astype(np.float32)
    mean, comps, explained = fit_pca(x, 5)
    assert mean.shape == (36,) and comps.shape == (5, 36)
    np.testing.assert_allclose(comps @ comps.T, np.eye(5), atol=1e-9)
    np.testing.assert_allclose(mean, x.reshape(200, -1).mean(axis=0), atol=1e-6)
    assert 0 < explained < 1
    assert fit_pca(x, 36)[2] == pytest.approx(1.0)
    with pytest.raises(UsageError, match="at most 36 components"):
        fit_pca(x, 37)


def test_pca_refuses_impossible_settings(capsys, tmp_path: Path) -> None:
    """--denoise and more components than pixels are refused with one error line and exit 2."""
    with pytest.raises(UsageError, match="without --denoise"):
        TrainConfig(arch="pca", denoise=True).check()
    code = main(["train", "--data", "sample:mnist?limit=300", "--arch", "pca", "--latent-dim",
                 str(math.prod((28, 28)) + 1), "--target-fpr", "0.1", "--out", str(tmp_path / "b")])
    _, err = capsys.readouterr()
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "lower --latent-dim" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_too_few_images_for_the_default_size_says_what_to_do(capsys, tmp_path: Path) -> None:
    """--arch pca on 30 images: the default 32 components do not fit; the refusal said only 'lower
    --latent-dim', which the user never gave. It names the value, its default and the ways out."""
    code = main(["train", "--data", "sample:mnist?limit=30", "--arch", "pca", "--target-fpr", "0.2",
                 "--out", str(tmp_path / "b")])
    _, err = capsys.readouterr()
    assert code == 2 and "32 unless given" in err and "--arch auto" in err, err
    assert not (tmp_path / "b").exists()
