"""The convsmall architecture and the topk score function (aemon.models, aemon.scoring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aemon.bundle import META_FILE, load_bundle
from aemon.errors import UsageError
from aemon.models import build
from aemon.scoring import SCORE_FUNCTIONS, fit_state, reconstruction_error


def test_convsmall_has_a_latent_dim_bottleneck() -> None:
    """convsmall's encoder gives a flat code of --latent-dim numbers and its decoder gives the image back."""
    model = build("convsmall", (28, 28, 1), latent_dim=12)
    assert model.get_layer("encoder").output.shape[1:] == (12,)
    assert model.output.shape[1:] == (28, 28, 1)
    with pytest.raises(UsageError, match="divisible by 4"):
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


def _state(kind: str, rng: np.random.Generator, shape=(28, 28, 1)) -> dict:
    """A local score's state learnt from random images reconstructed with a little noise."""
    normal = rng.random((40, *shape)).astype(np.float32)
    return fit_state(kind, normal, np.clip(normal + rng.normal(0, 0.05, normal.shape), 0, 1))


@pytest.mark.parametrize("kind", [kind for kind, fn in SCORE_FUNCTIONS.items() if fn.uses_reconstruction])
def test_perfect_reconstruction_scores_lowest(kind: str) -> None:
    """Every score function of a reconstruction ranks a perfect one below a blurred one and a wrong one
    (``nearest`` scores the image alone: tests/test_gradients.py)."""
    rng = np.random.default_rng(0)
    x = (rng.random((1, 28, 28, 1)) > 0.8).astype(np.float32)
    blurred = np.clip(x * 0.7 + 0.1, 0, 1)
    wrong = 1 - x
    state = _state(kind, rng)
    scores = [reconstruction_error(x, r, kind, state)[0] for r in (x, blurred, wrong)]
    assert scores[0] < scores[1] < scores[2]
    with pytest.raises(ValueError, match="unknown score function"):
        reconstruction_error(x, x, "psnr")


@pytest.mark.parametrize("shape", [(28, 28, 1), (96, 72, 3)])
@pytest.mark.parametrize("kind", SCORE_FUNCTIONS)
def test_numpy_and_tensorflow_scores_agree(kind: str, shape: tuple[int, int, int]) -> None:
    """Every score function's TensorFlow form (used inside the compiled call) matches its numpy form,
    grey and colour, square and not (local scores pool 96x72 to a 64x64 grid)."""
    import tensorflow as tf

    from aemon.scoring import _tf_error

    rng = np.random.default_rng(1)
    x = rng.random((6, *shape)).astype(np.float32)
    recon = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    recon[0] = x[0]  # one perfect reconstruction
    recon[1] = 1 - x[1]  # one completely wrong
    state = _state(kind, rng, shape)
    consts = {k: tf.constant(v) for k, v in state.items()}
    got = _tf_error(tf.constant(x), tf.constant(recon), kind, consts).numpy()
    np.testing.assert_allclose(got, reconstruction_error(x, recon, kind, state), rtol=1e-4, atol=1e-4)


def _moments_by_definition(image: np.ndarray) -> list[float]:
    """The shape term's six moments of one image ``(H, W, C)``, straight from their definitions."""
    img = image.mean(axis=-1).astype(np.float64)
    h, w = img.shape
    y, x = np.mgrid[0:h, 0:w]
    y, x = y / h, x / w
    mass = img.sum() + 1e-3
    cy, cx = (img * y).sum() / mass, (img * x).sum() / mass
    vy, vx = (img * (y - cy) ** 2).sum() / mass, (img * (x - cx) ** 2).sum() / mass
    cov = (img * (y - cy) * (x - cx)).sum() / mass
    return [np.log(mass / (h * w)), cy, cx, 0.5 * np.log(vy + 1e-6), 0.5 * np.log(vx + 1e-6),
            cov / np.sqrt(vy * vx + 1e-9)]


@pytest.mark.parametrize("shape", [(28, 28, 1), (37, 53, 3)])
def test_shape_moments_from_sums_match_their_definitions(shape: tuple[int, int, int]) -> None:
    """Both forms of the moments (built from a few weighted sums) agree with the definitions, on noise, a
    blank, a full and a one-pixel image, and a bright corner (far from the centre)."""
    import tensorflow as tf

    from aemon.scoring import _moments_np, _moments_tf

    x = np.random.default_rng(2).random((6, *shape)).astype(np.float32)
    x[1], x[2], x[3], x[4] = 0.0, 1.0, 0.0, 0.0
    x[3, 5, 7], x[4, -4:, -3:] = 1.0, 1.0
    expected = np.array([_moments_by_definition(image) for image in x])
    np.testing.assert_allclose(_moments_np(x), expected, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(_moments_tf(tf.constant(x)).numpy()[[0, 1, 2, 4]], expected[[0, 1, 2, 4]],
                               rtol=1e-4, atol=1e-4)
    # One lit pixel has no spread: float32 sums leave a residue of ~1e-9 beside the 1e-6 floor.
    np.testing.assert_allclose(_moments_tf(tf.constant(x)).numpy()[3], expected[3], atol=1e-2)


def test_shape_moments_of_a_line_at_the_edge_of_a_large_image_are_finite() -> None:
    """A one-pixel line along the edge of a 1000x700 image has no spread across it: in float32 the spread
    from sums came out slightly negative and the correlation NaN (69 of 96 such lines)."""
    import tensorflow as tf

    from aemon.scoring import _moments_tf

    x = np.zeros((16, 1000, 700, 1), np.float32)
    for i in range(8):
        x[i, :, 699 - i] = 1.0 - 0.08 * i
        x[8 + i, 999 - i, :] = 1.0 - 0.08 * i
    assert np.isfinite(_moments_tf(tf.constant(x)).numpy()).all()


def test_local_score_points_at_the_defect() -> None:
    """zmax finds a small defect where mse barely moves, and its map peaks where the defect is."""
    from aemon.scoring import Scorer

    rng = np.random.default_rng(2)
    texture = lambda n: np.clip(0.5 + 0.15 * rng.standard_normal((n, 64, 64, 1)), 0, 1).astype(np.float32)  # noqa: E731
    normal = texture(60)
    # A reconstruction that keeps the mean level but not the texture: every image errs everywhere.
    flat = np.full_like(normal, 0.5)
    state = fit_state("zmax", normal, flat)
    clean, damaged = texture(20), texture(20)
    damaged[:, 40:46, 10:16] = 0.0  # a dark 6x6 spot, under 1 % of the pixels
    recon = np.full_like(clean, 0.5)
    z_clean = reconstruction_error(clean, recon, "zmax", state)
    z_damaged = reconstruction_error(damaged, recon, "zmax", state)
    assert z_damaged.min() > z_clean.max()
    mse_clean, mse_damaged = reconstruction_error(clean, recon, "mse"), reconstruction_error(damaged, recon, "mse")
    assert mse_damaged.min() < mse_clean.max()  # the global score mixes them up
    model = build("pca", (64, 64, 1), latent_dim=1)  # any model: where() uses the given reconstructions
    where = Scorer(model, "zmax", state=state).where(damaged, recon)
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in where]
    assert all(38 <= r <= 48 and 8 <= c <= 18 for r, c in peaks), peaks
    with pytest.raises(ValueError, match="needs the state"):
        Scorer(model, "zmax")


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
