"""Gradient-orientation histograms and the ``nearest`` score built on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aemon.gradients import BINS, features, features_tf, grid_of
from aemon.scoring import fit_state, lookup, reconstruction_error


def _bins_of(f: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The histogram summed over every cell: ``(BINS,)``."""
    gh, gw, _, _ = grid_of(*shape)
    return f.reshape(gh, gw, BINS).sum(axis=(0, 1))


@pytest.mark.parametrize(("image", "expected"), [
    # A vertical edge: the gradient points across it (0°), all in bin 0.
    (np.tile((np.arange(28) >= 14).astype(np.float32), (28, 1)), {0: 1.0}),
    # A horizontal edge: 90°, exactly between bins 4 (80°) and 5 (100°).
    (np.tile((np.arange(28) >= 14).astype(np.float32)[:, None], (1, 28)), {4: 0.5, 5: 0.5}),
])
def test_edges_fall_in_their_orientation_bins(image: np.ndarray, expected: dict[int, float]) -> None:
    """An edge's gradients land in the bins of its orientation, shared equally when it lies between two."""
    share = _bins_of(features(image[None, :, :, None])[0], (28, 28))
    share /= share.sum()
    want = np.zeros(BINS)
    for j, value in expected.items():
        want[j] = value
    np.testing.assert_allclose(share, want, atol=1e-5)


def test_an_angle_between_bins_is_shared_in_proportion() -> None:
    """A diagonal ramp (45°, a quarter of the way from bin 2 at 40° to bin 3 at 60°) puts three times as much
    in bin 2 as in bin 3; only the border rows and columns, with one of the two differences 0, fall elsewhere."""
    ramp = np.add.outer(np.arange(28), np.arange(28)).astype(np.float32) / 54
    share = _bins_of(features(ramp[None, :, :, None])[0], (28, 28))
    share /= share.sum()
    assert share[2] == pytest.approx(3 * share[3], rel=1e-5)
    assert share[2] + share[3] > 0.85
    assert share[[1, 6, 7, 8]].sum() == 0


def test_features_are_unit_length_whatever_the_contrast() -> None:
    """Features have length 1, do not change when the contrast is halved, and are 0 for a blank image."""
    rng = np.random.default_rng(0)
    x = rng.random((3, 28, 28, 1)).astype(np.float32)
    f = features(x)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(features(0.5 * x), f, atol=1e-5)
    assert not features(np.full((1, 28, 28, 1), 0.7, np.float32)).any()


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 1), (28, 28, 1), (37, 53, 3), (300, 300, 1)])
def test_numpy_and_tensorflow_features_agree(shape: tuple[int, int, int]) -> None:
    """Both forms agree on every size, down to images too small to have a gradient."""
    import tensorflow as tf

    x = np.random.default_rng(1).random((4, *shape)).astype(np.float32)
    x[0] = 0.25
    got = features_tf(tf.constant(x)).numpy()
    assert got.shape == (4, min(7, shape[0]) * min(7, shape[1]) * BINS)
    np.testing.assert_allclose(got, features(x), atol=1e-5)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST digits that ship with aemon, as model input, and their labels."""
    from aemon.sources import load_source

    data = load_source("sample:mnist")
    return data.x, data.labels


def test_nearest_scores_other_shapes_far_from_the_normal_images(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Fitted on 1s: a fitted 1 scores 0, unseen 1s score low, and 0s, and 1s turned or shifted, score higher."""
    x, y = digits
    ones, zeros = x[y == 1], x[y == 0]
    state = fit_state("nearest", ones[:400], ones[:400])

    def score(images: np.ndarray) -> np.ndarray:
        return reconstruction_error(images, images, "nearest", state)

    assert score(ones[:5]).max() < 1e-3
    unseen = score(ones[400:600])
    assert np.median(score(zeros[:200])) > np.percentile(unseen, 95)
    turned = np.rot90(ones[400:600], k=1, axes=(1, 2))
    shifted = np.roll(ones[400:600], 8, axis=2)
    assert np.mean(score(turned) > unseen) > 0.95
    assert np.mean(score(shifted) > unseen) > 0.9


def test_nearest_map_points_at_the_change(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """The map of a 7 with a bar added across its lower left is highest in the cells of the bar."""
    x, y = digits
    sevens = x[y == 7]
    state = fit_state("nearest", sevens[1:], sevens[1:])
    marked = sevens[:1].copy()
    marked[0, 20:23, 2:12] = 1.0
    where = lookup("nearest").where(marked, marked, state)[0]
    assert where.shape == (7, 7)
    row, col = np.unravel_index(np.argmax(where), where.shape)
    assert row in (4, 5) and col <= 3, (row, col)
    # Its largest cell is the score, as for local scores: an image under the threshold is nowhere at full
    # colour (one cell could be 7 times the score, and every ok digit had full-colour cells).
    others = fit_state("nearest", sevens[20:], sevens[20:])
    unseen = sevens[:20]
    wheres = lookup("nearest").where(unseen, unseen, others).reshape(20, -1)
    np.testing.assert_allclose(wheres.max(axis=1), reconstruction_error(unseen, unseen, "nearest", others),
                               rtol=1e-5, atol=1e-6)


def test_nearest_keeps_at_most_its_limit_of_neighbours(monkeypatch) -> None:
    """A state of more images than the limit keeps a seeded subset of them (the same at each fit)."""
    from aemon import scoring

    x = np.random.default_rng(2).random((50, 8, 8, 1)).astype(np.float32)
    monkeypatch.setattr(scoring, "MAX_NEIGHBOURS", 20)
    first, again = fit_state("nearest", x, x), fit_state("nearest", x, x)
    assert first["neighbours"].shape == (20, 7 * 7 * BINS)
    np.testing.assert_array_equal(first["neighbours"], again["neighbours"])


@pytest.mark.parametrize("score", ["nearest", "patches"])
def test_daemon_decides_and_maps_with_a_bundle_of_the_image_alone(digits: tuple[np.ndarray, np.ndarray], tmp_path,
                                                                    score: str) -> None:
    """`aemon train --score nearest` (or `patches`) on 300 PNGs of 0s, then a real daemon: unseen 0s go to ok/,
    1s to anomaly/ with a map named in their records."""
    import contextlib
    import io

    from PIL import Image

    from aemon.cli import main
    from tests.daemon_process import Daemon, by_item, new_root, wait_records, write_png

    x, y = digits
    zeros, ones = (np.round(x[y == d][..., 0] * 255).astype(np.uint8) for d in (0, 1))
    for i in range(300):
        write_png(tmp_path / "normal" / f"{i:03d}.png", zeros[i])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--data", str(tmp_path / "normal"), "--out", str(tmp_path / "bundle"),
                     "--arch", "pca", "--score", score])
    assert code == 0, err.getvalue()
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "log", env={"AEMON_MODEL": str(tmp_path / "bundle")}).wait_ready()
    try:
        for i in range(5):
            write_png(tmp_path / "stage" / f"zero-{i}.png", zeros[300 + i]).rename(root / "inbox" / f"zero-{i}.png")
            write_png(tmp_path / "stage" / f"one-{i}.png", ones[i]).rename(root / "inbox" / f"one-{i}.png")
        wait_records(root, 10, daemon)
    finally:
        assert daemon.stop() == 0
    found = {name: recs[0] for name, recs in by_item(root).items()}
    assert [found[f"zero-{i}.png"]["verdict"] for i in range(5)].count("ok") >= 4
    for i in range(5):
        record = found[f"one-{i}.png"]
        assert record["verdict"] == "anomaly", record
        with Image.open(root / "anomaly" / record["map"]) as drawn:
            assert drawn.mode == "RGB" and drawn.size[0] >= 28


def test_left_out_distances_leave_each_image_itself_out() -> None:
    """The standardising distances of a ``+nearest`` score are each remembered image's distance to its nearest
    other one (by brute force here), not 0 to itself."""
    from aemon.scoring import _left_out_nearest

    x = np.random.default_rng(3).random((30, 12, 12, 1)).astype(np.float32)
    f = features(x)
    brute = [min(np.linalg.norm(f[i] - f[j]) for j in range(len(f)) if j != i) for i in range(len(f))]
    np.testing.assert_allclose(_left_out_nearest(f), brute, atol=1e-5)


def test_a_sum_with_nearest_maps_to_its_own_score(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """zmax+nearest: the map's largest value is the score (both terms on the sum's scale), and a 3 scores above
    the 7s it was not fitted on."""
    x, y = digits
    sevens = x[y == 7]
    recon = np.clip(sevens + 0.05, 0, 1)  # a stand-in reconstruction: the sum's formula is what is tested
    state = fit_state("zmax+nearest", sevens[:300], recon[:300])
    probe = np.concatenate([sevens[300:310], x[y == 3][:10]])
    r = np.clip(probe + 0.05, 0, 1)
    scores = reconstruction_error(probe, r, "zmax+nearest", state)
    where = lookup("zmax+nearest").where(probe, r, state)
    np.testing.assert_allclose(where.reshape(len(probe), -1).max(axis=1), scores, rtol=1e-4, atol=1e-4)
    assert np.median(scores[10:]) > np.median(scores[:10])


def test_features_of_many_large_images_are_computed_in_slices() -> None:
    """Features are the same whether computed at once or a slice at a time (their temporaries are about 9 times
    the pixels: 10,000 images of 128x128 at once took 6 GB)."""
    from aemon import gradients

    x = np.random.default_rng(4).random((10, 40, 30, 3)).astype(np.float32)
    whole = gradients.features(x)
    limit = gradients.SLICE_PIXELS
    try:
        gradients.SLICE_PIXELS = 3 * 40 * 30  # slices of 3 images
        np.testing.assert_array_equal(gradients.features(x), whole)
    finally:
        gradients.SLICE_PIXELS = limit


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 1), (28, 28, 1), (37, 53, 3), (300, 300, 1)])
def test_numpy_and_tensorflow_regions_agree(shape: tuple[int, int, int]) -> None:
    """Region descriptors agree in both forms on every size; the grid has at most 8 regions a side, as square
    as the image allows, and a flat image has none but zero descriptors."""
    import tensorflow as tf

    from aemon.gradients import BLOCK, region_grid, regions, regions_tf

    x = np.random.default_rng(5).random((4, *shape)).astype(np.float32)
    x[0] = 0.25
    got = regions_tf(tf.constant(x)).numpy()
    gh, gw = region_grid(*shape[:2])
    assert got.shape == (4, gh, gw, BLOCK * BLOCK * BINS + (3 if shape[2] == 3 else 0))
    assert max(gh, gw) == min(8, max(shape[:2])) and gh <= shape[0] and gw <= shape[1]
    np.testing.assert_allclose(got, regions(x), atol=1e-5)
    assert not regions(x[:1]).any()


def test_regions_count_every_pixel() -> None:
    """An edge in the last rows of a 28x28 image (past the last whole cell of 3 pixels) still shows in the
    descriptors of the bottom regions."""
    from aemon.gradients import regions

    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 26:, 10:18] = 1.0
    f = regions(image)
    assert f[0, -1].any() and not f[0, :4].any()


def test_patches_scores_a_local_mark_and_maps_it(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Fitted on 7s: unseen 7s score low, the same 7s with a short bar added score higher, and each map is
    highest where its bar is, its largest value the score."""
    x, y = digits
    sevens = x[y == 7]
    state = fit_state("patches", sevens[20:], sevens[20:])
    unseen = sevens[:20]
    marked = unseen.copy()
    marked[:, 20:23, 2:9] = 1.0  # rows 20-22, columns 2-8: regions (5 or 6, 0 to 2) of 3.5 pixels
    scores = reconstruction_error(np.concatenate([unseen, marked]), unseen, "patches", state)
    assert np.mean(scores[20:] > scores[:20]) > 0.9
    assert np.median(scores[20:]) > np.percentile(scores[:20], 90)
    where = lookup("patches").where(marked, marked, state)
    assert where.shape == (20, 8, 8)
    np.testing.assert_allclose(where.reshape(20, -1).max(axis=1), scores[20:], rtol=1e-5)
    rows, cols = np.unravel_index(where.reshape(20, -1).argmax(axis=1), (8, 8))
    assert np.mean((rows >= 4) & (rows <= 7) & (cols <= 3)) > 0.8, list(zip(rows, cols, strict=True))


def test_patches_keeps_at_most_its_limit_and_leaves_each_image_out(monkeypatch) -> None:
    """A state of more images than the limit keeps a seeded subset (the same at each fit); the standardising
    scores of a ``+patches`` sum are each remembered image's score against the others (by brute force here)."""
    from aemon import scoring

    x = np.random.default_rng(6).random((30, 12, 12, 1)).astype(np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(scoring, "MAX_PATCH_NEIGHBOURS", 20)
        first, again = fit_state("patches", x, x), fit_state("patches", x, x)
    assert first["regions"].shape[0] == 20
    np.testing.assert_array_equal(first["regions"], again["regions"])
    ref = fit_state("patches", x, x)["regions"]
    brute = [reconstruction_error(x[i : i + 1], x[i : i + 1], "patches", {"regions": np.delete(ref, i, axis=0)})[0]
             for i in range(len(x))]
    np.testing.assert_allclose(scoring._left_out_patches(ref), brute, rtol=1e-4, atol=1e-4)


def test_a_patches_state_of_another_grid_is_refused_at_load(digits: tuple[np.ndarray, np.ndarray], tmp_path) -> None:
    """A `patches` bundle whose remembered regions were rewritten to another grid (its sha256 updated, as a careless
    tool would) is refused when loaded, not when its first map is drawn (that took the daemon down)."""
    import json

    from aemon.bundle import META_FILE, STATE_FILE, BundleError, load_bundle, sha256_of
    from aemon.cli import main
    from tests.daemon_process import write_png

    x, y = digits
    for i, image in enumerate(np.round(x[y == 3][:200, :, :, 0] * 255).astype(np.uint8)):
        write_png(tmp_path / "normal" / f"{i:03d}.png", image)
    bundle = tmp_path / "bundle"
    assert main(["train", "--data", str(tmp_path / "normal"), "--out", str(bundle), "--arch", "pca",
                 "--score", "patches"]) == 0
    load_bundle(bundle)
    with np.load(bundle / STATE_FILE) as npz:
        regions = npz["regions"]
    k, gh, gw, d = regions.shape
    with (bundle / STATE_FILE).open("wb") as fp:
        np.savez(fp, regions=regions.reshape(k * 4, gh // 2, gw // 2, d))
    meta = json.loads((bundle / META_FILE).read_text())
    meta["score_state_sha256"] = sha256_of(bundle / STATE_FILE)
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="does not fit"):
        load_bundle(bundle)


def test_scores_of_gradients_need_three_pixels_a_side(tmp_path, capsys) -> None:
    """On 2x2 images every gradient is 0: `--score patches` (or nearest, or a sum with them) is refused with the
    reason, and `auto` does not offer them (a bundle that could never flag anything)."""
    from aemon.cli import main

    rng = np.random.default_rng(7)
    np.save(tmp_path / "tiny.npy", rng.random((400, 2, 2)).astype(np.float32))
    for score in ("patches", "nearest", "zmax+patches"):
        assert main(["train", "--data", str(tmp_path / "tiny.npy"), "--out", str(tmp_path / score), "--arch", "pca",
                     "--latent-dim", "2", "--score", score]) == 2
        err = capsys.readouterr().err
        assert "at least 3x3" in err and score in err, err
    assert main(["train", "--data", str(tmp_path / "tiny.npy"), "--out", str(tmp_path / "auto")]) == 0
    meta = json.loads((tmp_path / "auto" / "bundle.json").read_text())
    offered = {row["score_fn"] for row in meta["auto"]["candidates"]}
    assert offered and not offered & {"nearest", "patches", "zmax+nearest", "zmax+patches", "zmax+mean+nearest",
                                      "zmax+mean+patches"}, offered


def test_patches_sees_a_change_of_colour_at_the_same_brightness() -> None:
    """Fitted on red squares on grey: the same squares green (the same mean of the channels, so the same grey
    gradients) score above every red one; a grey image's descriptors carry no colour values."""
    from aemon.gradients import BLOCK, regions

    rng = np.random.default_rng(8)

    def squares(colour: list[float], n: int) -> np.ndarray:
        x = np.full((n, 32, 32, 3), 0.2, np.float32)
        for image in x:
            y0, x0 = rng.integers(0, 20, 2)
            image[y0 : y0 + 10, x0 : x0 + 10] = colour
        return np.clip(x + rng.normal(0, 0.01, x.shape), 0, 1).astype(np.float32)

    red, green = squares([0.9, 0.1, 0.1], 170), squares([0.1, 0.9, 0.1], 20)
    state = fit_state("patches", red[:150], red[:150])
    scores = reconstruction_error(np.concatenate([red[150:], green]), red[:40], "patches", state)
    assert scores[20:].min() > scores[:20].max(), scores
    assert regions(red[:1, :, :, :1]).shape[-1] == BLOCK * BLOCK * BINS


def test_maps_of_ordinary_images_stay_nearly_clear(digits: tuple[np.ndarray, np.ndarray], tmp_path) -> None:
    """A `patches` bundle's maps start at its lowest calibration score: unseen 3s judged ok are barely tinted
    (a region's distance is never 0, and at 0 every ok digit was a third red), while a 3 with a bar down its
    left side is tinted most there and clear on its right."""
    from aemon.bundle import load_bundle
    from aemon.cli import main
    from aemon.maps import strengths
    from tests.daemon_process import write_png

    x, y = digits
    threes = x[y == 3]
    for i, image in enumerate(np.round(threes[:200, :, :, 0] * 255).astype(np.uint8)):
        write_png(tmp_path / "normal" / f"{i:03d}.png", image)
    assert main(["train", "--data", str(tmp_path / "normal"), "--out", str(tmp_path / "b"), "--arch", "pca",
                 "--score", "patches"]) == 0
    bundle = load_bundle(tmp_path / "b")
    unseen = threes[200:260]
    ok = unseen[bundle.score(unseen) <= bundle.threshold]
    assert len(ok) >= 40
    assert strengths(bundle, ok, bundle.scorer.reconstruct(ok)).mean() < 0.1
    marked = unseen[:1].copy()
    marked[0, 4:24, 1:4] = 1.0  # a bar down the left edge, where 3s have no ink
    strength = strengths(bundle, marked, bundle.scorer.reconstruct(marked))[0]
    row, col = np.unravel_index(np.argmax(strength), strength.shape)
    assert col <= 10 and strength.max() > 0.3 and strength[:, 18:].mean() < 0.1, (row, col, strength.max())


def test_a_bundle_of_gradients_on_images_too_small_is_refused_at_load(tmp_path, monkeypatch) -> None:
    """A `nearest` bundle of 2x2 images (trainable before the 3-pixel limit) scores every image the same; loading
    it says why instead of serving a detector that can never flag anything."""
    import dataclasses

    from aemon import scoring
    from aemon.bundle import BundleError, load_bundle
    from aemon.cli import main

    np.save(tmp_path / "tiny.npy", np.random.default_rng(9).random((400, 2, 2)).astype(np.float32))
    with monkeypatch.context() as patch:  # as the code before the limit trained it
        patch.setitem(scoring.SCORE_FUNCTIONS, "nearest", dataclasses.replace(lookup("nearest"), min_side=1))
        assert main(["train", "--data", str(tmp_path / "tiny.npy"), "--out", str(tmp_path / "b"), "--arch", "pca",
                     "--latent-dim", "2", "--score", "nearest"]) == 0
    with pytest.raises(BundleError, match="at least 3x3"):
        load_bundle(tmp_path / "b")
