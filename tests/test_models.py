"""The convsmall architecture and the topk score function (aemon.models, aemon.scoring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aemon.bundle import META_FILE, load_bundle
from aemon.models import build
from aemon.scoring import SCORE_FUNCTIONS, reconstruction_error


def test_convsmall_has_a_latent_dim_bottleneck() -> None:
    """convsmall's encoder gives a flat code of --latent-dim numbers and its decoder gives the image back."""
    model = build("convsmall", (28, 28, 1), latent_dim=12)
    assert model.get_layer("encoder").output.shape[1:] == (12,)
    assert model.output.shape[1:] == (28, 28, 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        build("convsmall", (30, 30, 1))


def test_convsmall_bundle_with_topk_score(train_tiny, tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """A convsmall bundle scored by topk trains, stores both names and scores like a direct numpy top-k."""
    out = train_tiny(tmp_path / "cs", arch="convsmall", latent_dim=16, score_fn="topk",
                     src="sample:mnist?limit=400", epochs=1)
    meta = json.loads((out / META_FILE).read_text())
    assert (meta["arch"], meta["latent_dim"], meta["score_fn"]) == ("convsmall", 16, "topk")
    bundle = load_bundle(out)
    x = mnist_digits[:10, :, :, None].astype(np.float32) / 255.0
    recon = bundle.scorer.reconstruct(x)
    errors = np.sort(np.square(x - recon).reshape(10, -1), axis=1)
    np.testing.assert_allclose(bundle.score(x), errors[:, -40:].mean(axis=1), rtol=1e-6)
    assert bundle.scorer.encode(x).shape == (10, 16)


@pytest.mark.parametrize("kind", SCORE_FUNCTIONS)
def test_perfect_reconstruction_scores_lowest(kind: str) -> None:
    """Every score function ranks a perfect reconstruction below a blurred one and a wrong one."""
    rng = np.random.default_rng(0)
    x = (rng.random((1, 28, 28, 1)) > 0.8).astype(np.float32)
    blurred = np.clip(x * 0.7 + 0.1, 0, 1)
    wrong = 1 - x
    scores = [reconstruction_error(x, r, kind)[0] for r in (x, blurred, wrong)]
    assert scores[0] < scores[1] < scores[2]
    with pytest.raises(ValueError, match="unknown score function"):
        reconstruction_error(x, x, "psnr")


@pytest.mark.parametrize("kind", SCORE_FUNCTIONS)
def test_numpy_and_tensorflow_scores_agree(kind: str) -> None:
    """Every score function's TensorFlow form (used inside the compiled call) matches its numpy form."""
    import tensorflow as tf

    from aemon.scoring import _tf_error

    rng = np.random.default_rng(1)
    x = rng.random((6, 28, 28, 1)).astype(np.float32)
    recon = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    recon[0] = x[0]  # one perfect reconstruction
    recon[1] = 1 - x[1]  # one completely wrong
    got = _tf_error(tf.constant(x), tf.constant(recon), kind).numpy()
    np.testing.assert_allclose(got, reconstruction_error(x, recon, kind), rtol=2e-5, atol=1e-7)


def test_conv_is_the_lecture_network() -> None:
    """--arch conv is exactly the seed's network: its convolution widths, pools and upsamplings in order."""
    model = build("conv", (28, 28, 1))
    kinds = []
    for part in ("encoder", "decoder"):
        for layer in model.get_layer(part).layers[1:]:
            name = type(layer).__name__
            kinds.append(f"{name}{layer.filters}" if name == "Conv2D" else name)
    assert kinds == ["Conv2D16", "MaxPooling2D", "Conv2D16", "MaxPooling2D", "Conv2D8", "Conv2D8",
                     "Conv2D8", "Conv2D8", "UpSampling2D", "Conv2D16", "Conv2D16", "UpSampling2D", "Conv2D1"]
    assert model.get_layer("decoder").layers[-1].activation.__name__ == "sigmoid"
    assert model.get_layer("encoder").output.shape[1:] == (7, 7, 8)
