"""Training of every architecture into loadable bundles (aemon.train, aemon.models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aemon.bundle import META_FILE, load_bundle
from aemon.errors import CalibrationError, UsageError
from aemon.train import TrainConfig, add_noise, train_bundle

#: bundle.json fields the contract names.
CONTRACT_FIELDS = {
    "format_version", "arch", "input_shape", "preprocessing", "threshold", "target_fpr", "calibration",
    "training", "created_at", "aemon_version", "model_sha256",
}


@pytest.mark.parametrize(("arch", "denoise"), [("dense", False), ("deep", False), ("conv", False), ("conv", True)])
def test_every_arch_trains_a_loadable_bundle(
    train_tiny, tmp_path: Path, mnist_digits: np.ndarray, arch: str, denoise: bool
) -> None:
    """A one-epoch training on 400 digits writes a bundle with the contract's fields that loads and scores."""
    out = train_tiny(tmp_path / arch, arch=arch, denoise=denoise, src="sample:mnist?limit=400", epochs=1)
    meta = json.loads((out / META_FILE).read_text())
    assert set(meta) >= CONTRACT_FIELDS
    assert meta["arch"] == arch and meta["input_shape"] == [28, 28, 1]
    assert meta["task"] == ("denoise" if denoise else "detect")
    assert meta["preprocessing"] == {"color_mode": "grayscale", "size": [28, 28], "scaling": "unit",
                                     "choices": {"arch": f"given: {arch}", "score": "given: mse"}}
    cal = meta["calibration"]
    assert cal["n"] == 40 and cal["scores"] == sorted(cal["scores"]) and len(cal["scores"]) == 40
    assert meta["threshold"] in cal["scores"]
    training = meta["training"]
    assert training["source"] == "sample:mnist?limit=400" and training["n_total"] == 400
    assert training["n_calibration"] == 40 and training["epochs_run"] == 1
    assert np.isfinite(training["final_loss"])
    assert training["noise_factor"] == (0.5 if denoise else None)
    bundle = load_bundle(out)
    scores = bundle.score(mnist_digits[:8, :, :, None].astype(np.float32) / 255.0)
    assert scores.shape == (8,) and np.all(np.isfinite(scores)) and np.all(scores >= 0)


def test_training_reduces_loss(tiny_bundle: Path) -> None:
    """The tiny bundle's recorded final loss is below the loss of a constant guess."""
    meta = json.loads((tiny_bundle / META_FILE).read_text())
    assert meta["training"]["final_loss"] < 0.69  # binary cross-entropy of predicting 0.5 everywhere
    assert meta["training"]["epochs_run"] == 2


def test_denoise_bundle_records_task(tiny_denoise_bundle: Path) -> None:
    """The denoise fixture bundle says task=denoise and records its noise factor."""
    meta = json.loads((tiny_denoise_bundle / META_FILE).read_text())
    assert meta["task"] == "denoise" and meta["training"]["denoise"] is True
    assert meta["training"]["noise_factor"] == 0.5


@pytest.mark.parametrize(("n", "target_fpr", "least"), [(98, 0.01, 99), (19, 0.05, 20), (7, 0.2, 8), (2, 0.5, 3)])
def test_too_few_images_for_any_honest_threshold(tmp_path: Path, n: int, target_fpr: float, least: int) -> None:
    """Fewer images than any honest threshold needs (99 calibration scores at 1 %; cross-fitting needs 20 images,
    holding out twice the scores needed) are refused, naming the number needed, and nothing is written."""
    from aemon.sources import load_source

    data = load_source(f"sample:mnist?limit={n}")
    with pytest.raises(CalibrationError, match=rf"{n} images are too few .* needs at least {least} normal images"):
        train_bundle(data, TrainConfig(arch="pca", latent_dim=4, target_fpr=target_fpr), tmp_path / "b",
                     verbose=False)
    assert not (tmp_path / "b").exists()


def test_fewer_images_than_a_hold_out_needs_are_cross_fitted(tmp_path: Path) -> None:
    """150 images at the default 1 % target (a hold-out would need 198): every image is calibrated by a model
    fitted without it, so the calibration scores are out-of-fold, higher than the final model's scores of the
    same images (which it fitted), and the bundle's model is fitted on all 150."""
    from aemon.sources import load_source

    data = load_source("sample:mnist?limit=150")
    out = train_bundle(data, TrainConfig(arch="pca", latent_dim=16, score_fn="mse"), tmp_path / "b", verbose=False)
    bundle = load_bundle(out)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["calibration"]["method"] == "cross_fit" and meta["calibration"]["folds"] == 5
    assert meta["calibration"]["n"] == 150 and meta["training"]["n_fit"] == 150
    assert meta["training"]["n_held_out"] == 0 and "cross-fitted" in meta["training"]["calibration_held_out"]
    in_sample = bundle.score(data.x)
    assert np.median(meta["calibration"]["scores"]) > 1.2 * np.median(in_sample)
    assert np.mean(np.array(meta["calibration"]["scores"]) > meta["threshold"]) <= 0.01


def test_exact_repeats_are_used_once(tmp_path: Path) -> None:
    """120 digits each given twice: a repeat in the fitted part and in the calibration part scored as unseen and
    set the threshold far too low (15.6 % of fresh digits flagged at a 1 % target, helper's attack). Each image is
    used once, and the bundle says how many repeats were dropped."""
    from aemon.sources import Dataset, load_source

    digits = load_source("sample:mnist").x[::40][:120]
    data = Dataset(x=np.concatenate([digits, digits[::-1]]), labels=None, source="repeats")
    out = train_bundle(data, TrainConfig(arch="pca", latent_dim=16, score_fn="mse"), tmp_path / "b", verbose=False)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["training"]["n_total"] == 240 and meta["training"]["n_repeats_dropped"] == 120
    assert meta["calibration"]["n"] == 120 and meta["training"]["n_fit"] == 120
    with pytest.raises(UsageError, match=r"cross-fitting fits each fold's PCA on 96 images"):
        train_bundle(data, TrainConfig(arch="pca", latent_dim=100, score_fn="mse"), tmp_path / "c", verbose=False)


def test_a_few_hundred_images_hold_out_what_the_target_needs(tmp_path: Path) -> None:
    """666 images at the default 1 % target: the 10 % split (66) is too small, so exactly 99 are held out,
    said in bundle.json; the share of calibration scores above the threshold stays at or under the target."""
    from aemon.sources import load_source

    data = load_source("sample:mnist?limit=666")
    cfg = TrainConfig(arch="pca", latent_dim=16, target_fpr=0.01, score_fn="mse")
    out = train_bundle(data, cfg, tmp_path / "b", verbose=False)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["training"]["n_calibration"] == 99 and meta["training"]["n_fit"] == 567
    assert meta["calibration"]["method"] == "held_out" and meta["training"]["n_held_out"] == 99
    assert "fewer than the 99" in meta["training"]["calibration_held_out"]
    scores = np.array(meta["calibration"]["scores"])
    assert np.mean(scores > meta["threshold"]) <= 0.01


@pytest.mark.parametrize(
    ("field", "value"),
    [("arch", "transformer"), ("epochs", 0), ("batch_size", 0), ("optimizer", "lbfgs"), ("target_fpr", 0.0),
     ("patience", -1)],
)
def test_bad_config_refused(field: str, value: object) -> None:
    """Impossible training settings are refused before any work is done."""
    cfg = TrainConfig(**{field: value})
    with pytest.raises((UsageError, CalibrationError)):
        cfg.check()


def test_add_noise_stays_in_range() -> None:
    """Noisy inputs stay in [0, 1] and differ from the originals."""
    x = np.full((4, 28, 28, 1), 0.5, np.float32)
    noisy = add_noise(x, 0.5, np.random.default_rng(0))
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0 and not np.allclose(noisy, x)
