"""Training with defaults on the user's own images: --arch auto, --score auto, local scores and their maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aemon.autoselect import AUTO_SCORES
from aemon.bundle import META_FILE, STATE_FILE, load_bundle
from aemon.cli import main
from aemon.errors import BundleError
from aemon.scoring import lookup
from aemon.synthetic import FAMILIES, damage, families_for
from tests.daemon_process import write_png

H, W = 40, 48


def _tiles(n: int, seed: int) -> np.ndarray:
    """Colour 'product photos': a lit tile with a grid of grooves, grain, and a little jitter in place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for _ in range(n):
        dy, dx = rng.integers(-1, 2, 2)
        grooves = ((yy + dy) % 10 < 2) | ((xx + dx) % 12 < 2)
        base = np.where(grooves, 0.25, 0.7) + rng.normal(0, 0.04, (H, W))
        rgb = np.stack([base * 1.0, base * 0.85, base * 0.6], axis=-1)
        out.append(np.clip(rgb * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def _spot(images: np.ndarray, seed: int) -> np.ndarray:
    """A dark 5x5 spot at a random place of each image: a defect under 1.5 % of the pixels."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    for img in out:
        y, x = rng.integers(4, H - 9), rng.integers(4, W - 9)
        img[y:y + 5, x:x + 5] = (img[y:y + 5, x:x + 5] * 0.2).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def auto_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`aemon train` with only --data and --out on a folder of 300 colour 40x48 PNGs."""
    root = tmp_path_factory.mktemp("auto")
    for i, img in enumerate(_tiles(300, seed=0)):
        write_png(root / "normal" / f"{i:03d}.png", img)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--data", str(root / "normal"), "--out", str(root / "bundle")])
    assert code == 0, err.getvalue()
    return root / "bundle", err.getvalue()


def test_defaults_choose_and_say_what(auto_bundle: tuple[Path, str]) -> None:
    """Size, colour, architecture and score are decided from the data, printed, and stored with every candidate."""
    bundle, err = auto_bundle
    meta = json.loads((bundle / META_FILE).read_text())
    assert meta["input_shape"] == [H, W, 3]
    auto = meta["auto"]
    assert meta["arch"] == auto["arch"] == "pca" and meta["latent_dim"] == auto["latent_dim"]
    assert meta["score_fn"] == auto["score_fn"] and auto["families"] == list(FAMILIES)
    best = max(auto["candidates"], key=lambda row: row["synthetic_auroc"])
    assert (best["latent_dim"], best["score_fn"]) == (auto["latent_dim"], auto["score_fn"])
    assert {row["score_fn"] for row in auto["candidates"]} == set(AUTO_SCORES)
    choices = meta["preprocessing"]["choices"]
    assert choices["arch"].startswith(f"auto: pca {auto['latent_dim']}") and choices["score"].startswith("auto: ")
    assert f"arch: {choices['arch']}" in err and f"score: {choices['score']}" in err
    # Candidates were ranked on set-aside images; the chosen PCA is then fitted on every training image.
    training = meta["training"]
    assert training["n_selection"] == auto["n_selection"] > 0
    assert training["n_fit"] == training["n_total"] - training["n_calibration"]
    assert f"calibration: {training['calibration_held_out']}" in err and meta["calibration"]["method"] == "held_out"


def test_defaults_find_small_defects(auto_bundle: tuple[Path, str]) -> None:
    """On new tiles, the default bundle ranks tiles with a small dark spot above clean ones, at the target FPR."""
    bundle = load_bundle(auto_bundle[0])
    clean = _tiles(100, seed=1).astype(np.float32) / 255.0
    spotted = _spot(_tiles(100, seed=2), seed=3).astype(np.float32) / 255.0
    from sklearn.metrics import roc_auc_score

    s_clean, s_spot = bundle.score(clean), bundle.score(spotted)
    auroc = roc_auc_score(np.r_[np.zeros(100), np.ones(100)], np.r_[s_clean, s_spot])
    assert auroc > 0.95, auroc
    assert np.mean(s_clean > bundle.threshold) <= 0.05
    assert np.mean(s_spot > bundle.threshold) > 0.5


def test_map_shows_where(auto_bundle: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`aemon score --maps` of a spotted tile draws a map whose red is brightest at the spot."""
    bundle = auto_bundle[0]
    if lookup(json.loads((bundle / META_FILE).read_text())["score_fn"]).where is None:
        pytest.skip("the default chose a global score here; the local map is not drawn")
    img = _tiles(1, seed=4)[0]
    img[25:31, 8:14] = (img[25:31, 8:14] * 0.2).astype(np.uint8)
    path = write_png(tmp_path / "in" / "spot.png", img)
    assert main(["score", str(bundle), str(path), "--maps", str(tmp_path / "maps")]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["verdict"] == "anomaly", record
    drawn = np.asarray(Image.open(tmp_path / "maps" / record["map"]).convert("RGB"), dtype=np.float32)
    scale = drawn.shape[0] // H
    redness = (drawn[..., 0] - drawn[..., 1]).reshape(H, scale, W, scale).mean(axis=(1, 3))
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    assert 22 <= y <= 34 and 5 <= x <= 17, (y, x)


def test_changed_state_file_is_refused(auto_bundle: tuple[Path, str], tmp_path: Path) -> None:
    """A bundle whose score state no longer matches its sha256 (or is missing) does not load."""
    import shutil

    meta = json.loads((auto_bundle[0] / META_FILE).read_text())
    if not meta.get("score_state_file"):
        pytest.skip("the default chose a global score here; it has no state")
    copy = tmp_path / "b"
    shutil.copytree(auto_bundle[0], copy)
    with (copy / STATE_FILE).open("ab") as fp:
        fp.write(b"\0")
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(copy)
    (copy / STATE_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)


def test_every_family_damages_grey_and_colour() -> None:
    """Each synthetic family changes every image, stays in [0, 1] and keeps the shape (grey and colour)."""
    rng = np.random.default_rng(0)
    for shape in ((28, 28, 1), (40, 48, 3)):
        x = rng.random((4, *shape)).astype(np.float32) * 0.8 + 0.1
        out, family = damage(x, seed=1)
        used = families_for(shape[-1])
        assert out.shape == (4 * len(used), *shape) and out.min() >= 0 and out.max() <= 1
        assert np.bincount(family, minlength=len(FAMILIES)).tolist() == [4 * (name in used) for name in FAMILIES]
        changed = np.abs(out - np.repeat(x, len(used), axis=0)).reshape(len(out), -1).max(axis=1)
        assert (changed > 0.01).all()
    assert families_for(3) == list(FAMILIES) and "tint" not in families_for(1)


@pytest.mark.parametrize("colour", [(0.5, 0.5, 0.5), (0.02, 0.02, 0.02), (0.9, 0.1, 0.1), (1.0, 1.0, 1.0)],
                         ids=["grey", "near-black", "saturated", "white"])
def test_tint_changes_colour_not_brightness(colour: tuple[float, float, float]) -> None:
    """The tint family recolours a spot of a colour image while the mean of its channels (what the gradient
    scores see) stays the same, on dark, saturated and white images too (a clipped shift changed it by 0.13);
    visibly wherever the colour has room to change."""
    x = np.broadcast_to(np.array(colour, np.float32), (20, 40, 40, 3)).copy()
    out, family = damage(x, seed=3)
    tinted = out[family == list(FAMILIES).index("tint")]
    assert len(tinted) == 20
    np.testing.assert_allclose(tinted.mean(axis=-1), x.mean(axis=-1), atol=1e-6)
    if colour in ((0.5, 0.5, 0.5), (0.9, 0.1, 0.1)):
        assert np.abs(tinted - x).reshape(20, -1).max(axis=1).min() >= 0.1


def test_every_family_visibly_damages_dark_background_digits() -> None:
    """On white digits on black, a family that darkens the background (crack, blob, stain) or blurs an empty
    corner changes nothing; such a copy is no anomaly and must be drawn again until the change is visible."""
    from aemon.sources import load_source

    x = load_source("sample:mnist").x[:200]
    out, family = damage(x, seed=0)
    changed = np.abs(out - np.repeat(x, len(families_for(1)), axis=0)).reshape(len(out), -1).max(axis=1)
    unchanged = {name: int(np.sum(changed[family == k] < 0.1)) for k, name in enumerate(FAMILIES)}
    assert sum(unchanged.values()) == 0, unchanged


@pytest.mark.parametrize("shape", [(28, 28, 1), (30, 41, 3), (7, 5, 1)])
def test_image_operations_match_scipy_ndimage(shape: tuple[int, int, int]) -> None:
    """The blur and the resampling the families use give scipy.ndimage's numbers (scipy: a test dependency)."""
    from scipy import ndimage

    from aemon.synthetic import _gaussian, _resample

    rng = np.random.default_rng(2)
    img = rng.random(shape).astype(np.float32)
    for sigma in (0.3, 1.3, 5.5):
        np.testing.assert_allclose(_gaussian(img, sigma), ndimage.gaussian_filter(img.astype(np.float64),
                                                                                  (sigma, sigma, 0)), atol=1e-5)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    ys, xs = yy + rng.normal(0, 3, yy.shape), xx + rng.normal(0, 3, xx.shape)
    for fill, mode in ((None, "reflect"), (0.3, "constant")):
        theirs = np.stack([ndimage.map_coordinates(img[..., c], [ys, xs], order=1, mode=mode, cval=fill or 0.0)
                           for c in range(shape[2])], axis=-1)
        np.testing.assert_allclose(_resample(img, ys, xs, fill), theirs, atol=1e-5)


def test_daemon_scores_and_maps_with_a_default_bundle(auto_bundle: tuple[Path, str], tmp_path: Path) -> None:
    """A real daemon with the default bundle: clean tiles go to ok/, spotted ones to anomaly/ with a map and a
    record naming it; the colour image keeps its size and colour."""
    from tests.daemon_process import Daemon, by_item, new_root, wait_records

    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "log", env={"AEMON_MODEL": str(auto_bundle[0])}).wait_ready()
    try:
        clean, spotted = _tiles(6, seed=5), _spot(_tiles(6, seed=6), seed=7)
        for i in range(6):
            write_png(tmp_path / "stage" / f"clean-{i}.png", clean[i]).rename(root / "inbox" / f"clean-{i}.png")
            write_png(tmp_path / "stage" / f"spot-{i}.png", spotted[i]).rename(root / "inbox" / f"spot-{i}.png")
        wait_records(root, 12, daemon)
    finally:
        assert daemon.stop() == 0
    found = {name: recs[0] for name, recs in by_item(root).items()}
    spot_verdicts = [found[f"spot-{i}.png"]["verdict"] for i in range(6)]
    clean_verdicts = [found[f"clean-{i}.png"]["verdict"] for i in range(6)]
    assert spot_verdicts.count("anomaly") >= 5 and clean_verdicts.count("ok") >= 5, (spot_verdicts, clean_verdicts)
    for i in range(6):
        record = found[f"spot-{i}.png"]
        if record["verdict"] == "anomaly":
            with Image.open(root / "anomaly" / record["map"]) as drawn:
                assert drawn.mode == "RGB" and drawn.size[0] >= W
            with Image.open(root / "anomaly" / f"spot-{i}.png") as item:
                assert np.asarray(item).shape == (H, W, 3)


def test_recalibrated_copy_keeps_the_state(auto_bundle: tuple[Path, str], tmp_path: Path) -> None:
    """`aemon calibrate --out` of a bundle with a local score copies its state; the copy loads and scores alike."""
    for i, img in enumerate(_tiles(120, seed=8)):
        write_png(tmp_path / "site2" / f"{i:03d}.png", img)
    out = tmp_path / "recal"
    assert main(["calibrate", str(auto_bundle[0]), "--data", str(tmp_path / "site2"), "--out", str(out)]) == 0
    original, copy = load_bundle(auto_bundle[0]), load_bundle(out)
    assert copy.meta.revision == original.meta.revision + 1 and copy.meta.calibration.n == 120
    x = _tiles(5, seed=9).astype(np.float32) / 255.0
    np.testing.assert_allclose(copy.score(x), original.score(x), rtol=1e-6)


def _rewrite_state(bundle: Path, change) -> None:
    """Rewrite a bundle's score_state.npz through ``change(dict)`` and put its new sha256 in bundle.json,
    as a careless tool would: the sha256 check alone cannot catch it."""
    from aemon.bundle import sha256_of

    with np.load(bundle / STATE_FILE) as npz:
        state = {k: npz[k] for k in npz.files}
    change(state)
    with (bundle / STATE_FILE).open("wb") as fp:
        np.savez(fp, **state)
    meta = json.loads((bundle / META_FILE).read_text())
    meta["score_state_sha256"] = sha256_of(bundle / STATE_FILE)
    (bundle / META_FILE).write_text(json.dumps(meta))


def _copy_local(auto_bundle: tuple[Path, str], dest: Path) -> Path:
    import shutil

    if not json.loads((auto_bundle[0] / META_FILE).read_text()).get("score_state_file"):
        pytest.skip("the default chose a global score here; it has no state")
    shutil.copytree(auto_bundle[0], dest)
    return dest


def test_broken_state_with_matching_sha_is_refused(auto_bundle: tuple[Path, str], tmp_path: Path) -> None:
    """A state with NaN, a missing array or a path out of the bundle is refused with one BundleError."""
    nan = _copy_local(auto_bundle, tmp_path / "nan")
    _rewrite_state(nan, lambda s: s.__setitem__("s", np.full_like(s["s"], np.nan)))
    with pytest.raises(BundleError, match="non-numbers"):
        load_bundle(nan)
    lacking = _copy_local(auto_bundle, tmp_path / "lacking")
    _rewrite_state(lacking, lambda s: s.pop("m"))
    with pytest.raises(BundleError, match="does not fit"):
        load_bundle(lacking)
    outside = _copy_local(auto_bundle, tmp_path / "outside")
    meta = json.loads((outside / META_FILE).read_text())
    meta["score_state_file"] = f"../nan/{STATE_FILE}"
    (outside / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="inside the bundle"):
        load_bundle(outside)


def test_reload_of_a_broken_state_keeps_the_daemon_running(auto_bundle: tuple[Path, str], tmp_path: Path) -> None:
    """SIGHUP after the state file was replaced by one that does not fit: the reload fails, the old bundle
    keeps scoring, and the daemon stops with 0."""
    import signal
    import time

    from tests.daemon_process import Daemon, new_root, wait_records

    bundle = _copy_local(auto_bundle, tmp_path / "b")
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "log", env={"AEMON_MODEL": str(bundle)}).wait_ready()
    try:
        _rewrite_state(bundle, lambda s: s.pop("m"))
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not daemon.events("bundle.reload_failed") and daemon.proc.poll() is None:
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.1)
        assert daemon.proc.poll() is None, daemon.text()
        write_png(tmp_path / "stage" / "after.png", _tiles(1, seed=10)[0]).rename(root / "inbox" / "after.png")
        wait_records(root, 1, daemon)
    finally:
        assert daemon.stop() == 0, daemon.text()
