"""The command line, called through aemon.cli.main(argv) (aemon.cli)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aemon.bundle import read_meta
from aemon.cli import main

VERBS = ["train", "calibrate", "score", "denoise", "info", "evaluate", "samples", "run"]
RECORD_FIELDS = {"item", "verdict", "score", "threshold", "p_value", "model", "received_at", "decided_at"}


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run ``aemon ARGV``; returns exit status, stdout and stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits for --help and --version
        code = exc.code if isinstance(exc.code, int) else 0
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("verb", VERBS)
def test_help_for_every_verb(capsys: pytest.CaptureFixture, verb: str) -> None:
    """'aemon VERB --help' exits 0 and prints usage with examples."""
    code, out, err = run(capsys, verb, "--help")
    assert code == 0, err
    assert f"aemon {verb}" in out and "examples:" in out


def test_top_level_help_and_version(capsys: pytest.CaptureFixture) -> None:
    """'aemon --help' lists the verbs and '--version' prints the version."""
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(verb in out for verb in VERBS)
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("aemon ")


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["train", "--arch", "dense"],
        ["train", "--data", "sample:mnist", "--out", "x", "--epochs", "many"],
        ["score"],
        ["calibrate", "somewhere"],
        ["train", "--data", "sample:mnist", "--out", "x", "--target-fpr", "0"],
        ["train", "--data", "sample:mnist", "--out", "x", "--target-fpr", "nan"],
        ["train", "--data", "sample:mnist", "--out", "x", "--learning-rate", "-1"],
        ["train", "--data", "sample:mnist", "--out", "x", "--learning-rate", "0"],
        ["score", "mnist-detect", "sample:mnist?limit=2", "--maps", ""],
        ["train", "--data", "sample:mnist", "--out", ""],
    ],
    ids=["unknown-verb", "missing-required", "bad-int", "no-paths", "calibrate-no-data", "fpr-0", "fpr-nan",
         "lr-negative", "lr-0", "empty-maps", "empty-out"],
)
def test_bad_usage_exits_2_with_one_line(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    """Bad usage exits 2 with one 'Error:' line on stderr and no traceback."""
    code, _, err = run(capsys, *argv)
    assert code == 2
    _assert_one_error_line(err)


def test_bad_setting_from_env_exits_2(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                      tiny_bundle: Path) -> None:
    """A bad AEMON_* value exits 2 with one error line naming it."""
    monkeypatch.setenv("AEMON_BATCH_SIZE", "-3")
    code, _, err = run(capsys, "info", str(tiny_bundle))
    assert code == 2
    _assert_one_error_line(err)
    assert "AEMON_BATCH_SIZE" in err


def test_missing_bundle_exits_1(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """'aemon info' on a missing bundle exits 1 with one error line."""
    code, _, err = run(capsys, "info", str(tmp_path / "none"))
    assert code == 1
    _assert_one_error_line(err)


def test_info_text_and_json(capsys: pytest.CaptureFixture, tiny_bundle: Path) -> None:
    """'aemon info' prints readable metadata, and '--json' the same as JSON without the score list."""
    meta = read_meta(tiny_bundle)
    code, out, _ = run(capsys, "info", str(tiny_bundle))
    assert code == 0
    assert "threshold" in out and meta.model_sha256 in out and "dense" in out and meta.version in out
    code, out, _ = run(capsys, "info", "--json", str(tiny_bundle))
    assert code == 0
    data = json.loads(out)
    assert data["threshold"] == meta.threshold and data["arch"] == "dense"
    assert data["version"] == meta.version and "scores" not in data["calibration"]


def test_score_folder_with_garbage(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path,
                                   mnist_digits: np.ndarray) -> None:
    """Scoring a folder with a good and a garbage PNG prints one record each and exits 1."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(mnist_digits[0]).save(folder / "a_good.png")
    (folder / "b_bad.png").write_bytes(b"definitely not a png")
    code, out, err = run(capsys, "score", str(tiny_bundle), str(folder))
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2
    good, bad = sorted(records, key=lambda r: r["item"])
    assert good["verdict"] in ("ok", "anomaly") and set(good) >= RECORD_FIELDS
    assert bad["verdict"] == "rejected" and bad["reason"] == "unreadable" and "b_bad.png" in bad["error"]
    assert "Error:" in err and "Traceback" not in err


def test_score_npy_one_record_per_row(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path,
                                      mnist_digits: np.ndarray) -> None:
    """Scoring an .npy emits one record per row with the contract's fields."""
    path = tmp_path / "batch.npy"
    np.save(path, mnist_digits[:5])
    meta = read_meta(tiny_bundle)
    code, out, err = run(capsys, "score", str(tiny_bundle), str(path))
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5
    for record in records:
        assert set(record) >= RECORD_FIELDS
        assert record["verdict"] in ("ok", "anomaly")
        assert record["verdict"] == ("anomaly" if record["score"] > record["threshold"] else "ok")
        assert record["threshold"] == meta.threshold and 0.0 <= record["p_value"] <= 1.0
        assert record["model"] == {"name": meta.name, "version": meta.version}
        assert record["received_at"].endswith("Z") and record["decided_at"].endswith("Z")
        assert str(path) in record["item"]


def test_score_noise_is_anomalous(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path) -> None:
    """Uniform noise images score above the threshold with the smallest conformal p-value, never 0."""
    path = tmp_path / "noise.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    code, out, _ = run(capsys, "score", str(tiny_bundle), str(path))
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["verdict"] for r in records] == ["anomaly"] * 4
    n = read_meta(tiny_bundle).calibration.n
    assert all(r["p_value"] == pytest.approx(1 / (n + 1)) for r in records)


def test_calibrate_in_place_bumps_revision(capsys: pytest.CaptureFixture, tiny_bundle: Path,
                                           tmp_path: Path) -> None:
    """'aemon calibrate' in place writes a new threshold and bumps the revision."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = read_meta(bundle)
    code, _, err = run(capsys, "calibrate", str(bundle), "--data", "sample:mnist?digits=1&limit=200",
                       "--target-fpr", "0.1")
    assert code == 0, err
    after = read_meta(bundle)
    assert after.revision == before.revision + 1
    assert after.target_fpr == 0.1 and after.calibration.n == 200
    assert after.calibration.source == "sample:mnist?digits=1&limit=200"
    assert after.model_sha256 == before.model_sha256 and after.version != before.version
    assert after.threshold != before.threshold


def test_calibrate_out_writes_new_bundle(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path) -> None:
    """'aemon calibrate --out' writes a new bundle and leaves the original untouched."""
    original = (tiny_bundle / "bundle.json").read_bytes()
    out = tmp_path / "site2"
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", "sample:mnist?limit=100", "--out", str(out))
    assert code == 0, err
    assert (tiny_bundle / "bundle.json").read_bytes() == original
    meta = read_meta(out)
    assert meta.name == "site2" and meta.revision == read_meta(tiny_bundle).revision + 1
    assert meta.calibration.n == 100
    code, out_text, _ = run(capsys, "info", "--json", str(out))
    assert code == 0 and json.loads(out_text)["name"] == "site2"
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", "sample:mnist?limit=100", "--out", str(out))
    assert code == 2 and "already exists" in err and "--force" not in err, err  # a usage error, as in train


def test_calibrate_a_shipped_bundle_by_name_only_into_a_copy(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """'aemon calibrate mnist-detect --out DIR' writes a recalibrated copy; without --out it is one clear
    error line and the shipped bundle is untouched."""
    from aemon.bundle import shipped_bundle

    shipped = shipped_bundle("mnist-detect")
    original = (shipped / "bundle.json").read_bytes()
    code, _, err = run(capsys, "calibrate", "mnist-detect", "--data", "sample:mnist?limit=200", "--target-fpr", "0.1")
    assert code == 2, err
    _assert_one_error_line(err)
    assert "--out" in err
    out = tmp_path / "site"
    code, _, err = run(capsys, "calibrate", "mnist-detect", "--data", "sample:mnist?limit=200", "--target-fpr", "0.1",
                       "--out", str(out))
    assert code == 0, err
    assert read_meta(out).calibration.n == 200 and read_meta(out).name == "site"
    assert (shipped / "bundle.json").read_bytes() == original


@pytest.mark.parametrize("how", ["path", "link"])
def test_calibrate_a_shipped_bundle_by_path_is_never_changed_in_place(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                      how: str) -> None:
    """The shipped bundle given by its folder (or a link to it) rather than its name is refused in place just
    the same: before, the name check alone let 'aemon calibrate .../models/mnist-detect' rewrite it."""
    from aemon.bundle import shipped_bundle

    shipped = shipped_bundle("mnist-detect")
    original = (shipped / "bundle.json").read_bytes()
    arg = shipped
    if how == "link":
        arg = tmp_path / "mine"
        arg.symlink_to(shipped)
    code, _, err = run(capsys, "calibrate", str(arg), "--data", "sample:mnist?limit=200", "--target-fpr", "0.1")
    assert code == 2, err
    _assert_one_error_line(err)
    assert "shipped" in err and "--out" in err
    assert (shipped / "bundle.json").read_bytes() == original
    # train --force over it by its folder replaced the default model (found by an attack helper)
    code, _, err = run(capsys, "train", "--data", "sample:mnist?limit=200", "--arch", "pca", "--latent-dim", "4",
                       "--target-fpr", "0.1", "--out", str(arg), "--force")
    assert code == 2 and "shipped" in err, err
    _assert_one_error_line(err)
    assert (shipped / "bundle.json").read_bytes() == original


def _unseen(tmp_path: Path, digits: np.ndarray, n: int) -> str:
    """``n`` digits the tiny bundles never saw (they were fitted on the first 1,500), as an .npy source."""
    path = tmp_path / f"unseen-{n}.npy"
    np.save(path, digits[-n:])
    return str(path)


def test_calibrate_uses_each_image_once(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path,
                                        mnist_digits: np.ndarray) -> None:
    """200 copies of one image calibrated a threshold "from 200 samples" (one distinct score; 40 % of fresh
    normal images then flagged at a 1 % target), while train refused the same folder. Repeats count once:
    too few distinct images are refused, naming the repeats; a few repeats among enough are dropped."""
    copies = tmp_path / "copies.npy"
    np.save(copies, np.repeat(mnist_digits[-1:], 200, axis=0))
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", str(copies), "--out", str(tmp_path / "c"))
    assert code != 0 and "199 exact repeats" in err and not (tmp_path / "c").exists(), err
    some = tmp_path / "some.npy"
    np.save(some, np.concatenate([mnist_digits[-150:], mnist_digits[-10:]]))
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", str(some), "--target-fpr", "0.05",
                       "--out", str(tmp_path / "d"))
    assert code == 0 and read_meta(tmp_path / "d").calibration.n == 150, err


def test_an_edited_threshold_points_to_a_way_back_that_works(capsys: pytest.CaptureFixture, tiny_bundle: Path,
                                                               tmp_path: Path) -> None:
    """A hand-edited threshold is refused by every verb with "set a threshold with aemon calibrate", but
    calibrate refused the bundle with the same words: a dead end (found by an attack helper)."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["threshold"] = meta["threshold"] * 2
    (bundle / "bundle.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "calibrate", str(bundle), "--data", "sample:mnist?limit=300")
    assert code != 0 and "was edited" in err and "restore it" in err, err
    assert "set a threshold with aemon calibrate" not in err, err


def test_calibrate_too_few_samples(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path,
                                   mnist_digits: np.ndarray) -> None:
    """Calibrating on too few samples exits non-zero and names how many are needed."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = (bundle / "bundle.json").read_bytes()
    code, _, err = run(capsys, "calibrate", str(bundle), "--data", _unseen(tmp_path, mnist_digits, 10),
                       "--target-fpr", "0.01")
    assert code != 0
    _assert_one_error_line(err)
    assert "99" in err
    assert (bundle / "bundle.json").read_bytes() == before


def test_calibrate_warns_when_the_data_do_not_look_like_the_bundles_input(capsys: pytest.CaptureFixture,
                                                                          tiny_bundle: Path, tmp_path: Path,
                                                                          mnist_digits: np.ndarray) -> None:
    """Calibrating a grey 28x28 bundle on colour images of another shape still works (they are converted
    as the daemon would), but says so: a threshold from data unlike what arrives is a silent mistake.
    Data like the bundle's input get no such line."""
    data = tmp_path / "wide-colour"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):
        Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)).save(data / f"c{i:03d}.png")
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", str(data), "--target-fpr", "0.1",
                       "--out", str(tmp_path / "odd"))
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warning) == 1, err
    assert "colour" in warning[0] and "grayscale" in warning[0], warning
    assert "20x60" in warning[0] and "28x28" in warning[0], warning
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", _unseen(tmp_path, mnist_digits, 100),
                       "--target-fpr", "0.1", "--out", str(tmp_path / "fine"))
    assert code == 0, err
    assert "warning" not in err.lower(), err


@pytest.mark.parametrize("verb", ["train", "calibrate"])
def test_an_out_inside_the_data_folder_is_refused(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path,
                                                   mnist_digits: np.ndarray, verb: str) -> None:
    """A bundle written inside the folder of images it learns or calibrates from would be read with them by
    the next run (its state.npz is an array): one error line, nothing written."""
    data = tmp_path / "digits"
    data.mkdir()
    for i in range(120):
        Image.fromarray(mnist_digits[i]).save(data / f"d{i:03d}.png")
    out = data / "bundles" / "mine"
    head = ["train", "--epochs", "1", "--arch", "dense"] if verb == "train" else ["calibrate", str(tiny_bundle)]
    code, _, err = run(capsys, *head, "--data", str(data), "--target-fpr", "0.1", "--out", str(out))
    assert code == 2, err
    _assert_one_error_line(err)
    assert "inside the input folder" in err, err
    assert not (data / "bundles").exists()


def test_train_cli_end_to_end(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """'aemon train' on a tiny sample writes a bundle that 'aemon info' reads; a second run refuses to overwrite."""
    out = tmp_path / "cli-bundle"
    argv = ["train", "--data", "sample:mnist?limit=300", "--arch", "dense", "--epochs", "1", "--latent-dim", "8",
            "--target-fpr", "0.1", "--out", str(out), "--log-format", "json"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    meta = read_meta(out)
    assert meta.arch == "dense" and meta.latent_dim == 8 and meta.target_fpr == 0.1 and meta.name == "cli-bundle"
    assert meta.training["source"] == "sample:mnist?limit=300"
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already exists" in err


def test_train_cli_bad_arch(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """An unknown --arch exits 2 with one error line listing the choices."""
    code, _, err = run(capsys, "train", "--data", "sample:mnist", "--arch", "vit", "--out", str(tmp_path / "x"))
    assert code == 2
    _assert_one_error_line(err)
    assert "dense" in err and "conv" in err
    assert not (tmp_path / "x").exists()


def test_denoise_writes_png_and_same_dtype_arrays(capsys: pytest.CaptureFixture, tiny_denoise_bundle: Path,
                                                  tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """Images come back as PNGs of their own size and colour, arrays with their shape and dtype; clashes get a
    suffix; garbage is rejected."""
    src = tmp_path / "src"
    (src / "batch").mkdir(parents=True)
    Image.fromarray(mnist_digits[0]).save(src / "a.png")
    Image.fromarray(mnist_digits[1]).resize((56, 56)).convert("RGB").save(src / "batch" / "b.png")
    np.save(src / "rows.npy", mnist_digits[:4])
    np.save(src / "flat.npy", (mnist_digits[:3] / 255.0).astype(np.float32).reshape(3, 784))
    (src / "junk.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"already here")
    paths = [src / "a.png", src / "batch", src / "rows.npy", src / "flat.npy", src / "junk.png"]
    code, stdout, err = run(capsys, "denoise", str(tiny_denoise_bundle), *map(str, paths), "--out", str(out))
    assert code == 1 and "1 item(s) could not be denoised" in err
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [Path(r["item"]).name for r in records] == ["a.png", "b.png", "rows.npy", "flat.npy", "junk.png"]
    assert records[-1]["reason"] == "unreadable"
    assert (out / "a.png").read_bytes() == b"already here"
    assert records[0]["denoised"] == str(out / "a-1.png")
    with Image.open(out / "a-1.png") as img:
        assert img.mode == "L" and img.size == (28, 28)
    with Image.open(out / "batch" / "b.png") as img:  # the item's own size and colour
        assert img.mode == "RGB" and img.size == (56, 56)
    rows = np.load(out / "rows.npy")
    assert rows.dtype == np.uint8 and rows.shape == (4, 28, 28) and rows.max() > 100
    flat = np.load(out / "flat.npy")
    assert flat.dtype == np.float32 and flat.shape == (3, 784) and 0.5 < flat.max() <= 1.0
    # A reconstruction, not a copy: it differs from the input yet is nearer to it than to another digit.
    diff = np.abs(rows.astype(float) - mnist_digits[:4]).mean()
    other = np.abs(rows.astype(float) - mnist_digits[10:14]).mean()
    assert 0 < diff < other


def test_denoise_refuses_a_detection_bundle(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path) -> None:
    """`aemon denoise` with a detection bundle says so in one line and writes nothing."""
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    code, out, err = run(capsys, "denoise", str(tiny_bundle), str(img), "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    _assert_one_error_line(err)
    assert "detect bundle" in err and "--denoise" in err
    assert not (tmp_path / "out").exists()


def test_unknown_aemon_variables_are_named(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                           tiny_bundle: Path) -> None:
    """A misspelled AEMON_* variable is warned about by name; real settings are not."""
    monkeypatch.setenv("AEMON_BATCHSIZE", "8")
    monkeypatch.setenv("AEMON_BATCH_SIZE", "8")
    monkeypatch.setenv("AEMON_LOG_FORMAT", "json")
    code, _, err = run(capsys, "info", str(tiny_bundle))
    assert code == 0
    warnings = [json.loads(line) for line in err.splitlines() if "settings.unknown_variable" in line]
    assert [w["name"] for w in warnings] == ["AEMON_BATCHSIZE"]


def test_samples_writes_digits_and_noise_and_never_overwrites(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """`aemon samples DIR` writes one PNG per digit 0-9 and a noise image; a second call into DIR refuses."""
    code, out, _ = run(capsys, "samples", str(tmp_path / "s"), "--count", "10")
    assert code == 0
    names = sorted(Path(p).name for p in out.split())
    assert names == sorted([f"digit-{d}-{d}.png" for d in range(10)] + ["noise.png"])
    with Image.open(tmp_path / "s" / "digit-7-7.png") as img:
        assert img.size == (28, 28) and np.asarray(img).max() > 200
    before = (tmp_path / "s" / "noise.png").read_bytes()
    code, _, err = run(capsys, "samples", str(tmp_path / "s"))
    assert code == 2 and "exists" in err
    assert (tmp_path / "s" / "noise.png").read_bytes() == before
    # Only the last name taken: the digits before it were written, then the call failed, leaving them behind.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "noise.png").write_bytes(b"mine")
    code, _, err = run(capsys, "samples", str(tmp_path / "t"))
    assert code == 2 and "noise.png exists" in err, err
    assert os.listdir(tmp_path / "t") == ["noise.png"] and (tmp_path / "t" / "noise.png").read_bytes() == b"mine"


def test_samples_on_a_full_disk_leave_nothing_behind(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """A write that fails (a full filesystem) left an empty digit-0-0.png behind; now one error line naming the
    file, exit 1, and none of the samples."""
    import subprocess

    from daemon_process import full_tmpfs

    mount = tmp_path / "small"
    if not full_tmpfs(mount, lambda path: (path / "s").mkdir()):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        code, _, err = run(capsys, "samples", str(mount / "s"))
        assert code == 1 and "No space left on device" in err and str(mount / "s") in err, err
        _assert_one_error_line(err)
        assert os.listdir(mount / "s") == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("verb", ["score", "info", "evaluate"])
def test_a_closed_standard_output_is_one_error_line(tmp_path: Path, mnist_digits: np.ndarray, verb: str) -> None:
    """Run with stdout closed (``>&-``): score ended in an AttributeError traceback, info and evaluate exited 0
    having printed nothing, the results lost without a word. Now one error line and exit 2, before any work."""
    import subprocess
    import sys

    Image.fromarray(mnist_digits[0]).save(tmp_path / "d.png")
    np.save(tmp_path / "n.npy", mnist_digits[:20])
    argv = {"score": ["mnist-detect", str(tmp_path / "d.png")], "info": ["mnist-detect"],
            "evaluate": ["mnist-detect", "--normal", str(tmp_path / "n.npy"), "--anomalous", str(tmp_path / "n.npy")]}
    done = subprocess.run([sys.executable, "-m", "aemon", verb, *argv[verb]], stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "standard output is closed" in lines[0], lines


def test_verbs_that_print_nothing_on_standard_output_run_with_it_closed(tmp_path: Path) -> None:
    """train writes a bundle and logs on stderr: with stdout closed it must still run (the refusal above is
    for verbs whose results go there); run, which logs on stdout, logs on stderr instead of a traceback."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "aemon", "train", "--data", "sample:mnist?limit=300", "--arch", "pca",
                           "--latent-dim", "4", "--out", str(tmp_path / "b")], stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(1))
    assert done.returncode == 0 and (tmp_path / "b" / "bundle.json").exists(), done.stderr
    (tmp_path / "root" / "inbox").mkdir(parents=True)
    env = {**os.environ, "AEMON_ROOT": str(tmp_path / "root"), "AEMON_METRICS_PORT": "0", "AEMON_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aemon", "run"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: os.close(1))
    try:
        ready = ""
        while "daemon.ready" not in ready and proc.poll() is None:
            ready = proc.stderr.readline()
        assert "daemon.ready" in ready, proc.stderr.read()
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0 and "Traceback" not in rest, rest


@pytest.mark.parametrize("how", ["nested", "fifo", "folder", "dangling"])
def test_a_bundle_json_that_cannot_be_read_is_named_for_what_it_is(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                    tiny_bundle: Path, how: str) -> None:
    """bundle.json nested 200,000 levels deep ended info, score and evaluate in a RecursionError traceback; a
    FIFO or a folder in its place was reported as missing. One line that says what it is."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    meta = bundle / "bundle.json"
    if how == "nested":
        meta.write_text(meta.read_text().rstrip().removesuffix("}") + ', "zz": ' + "[" * 200_000 + "]" * 200_000
                        + "}")
    else:
        meta.unlink()
        {"fifo": os.mkfifo, "folder": Path.mkdir, "dangling": lambda p: p.symlink_to(tmp_path / "nowhere")}[how](meta)
    code, _, err = run(capsys, "info", str(bundle))
    assert code != 0, err
    _assert_one_error_line(err)
    words = {"nested": "is not valid JSON", "fifo": "is not a regular file", "folder": "is not a regular file",
             "dangling": "is a link to nothing"}
    assert words[how] in err and "missing" not in err, err
    if how == "fifo":  # the model file too
        shutil.rmtree(bundle)
        shutil.copytree(tiny_bundle, bundle)
        (bundle / "model.keras").unlink()
        os.mkfifo(bundle / "model.keras")
        code, _, err = run(capsys, "score", str(bundle), str(tiny_bundle / "bundle.json"))
        assert code != 0 and "model.keras is not a regular file" in err, err


@pytest.mark.parametrize("later", ["folder", "name"])
def test_a_bundle_later_among_the_inputs_is_refused(capsys: pytest.CaptureFixture, tiny_bundle: Path,
                                                    tmp_path: Path, mnist_digits: np.ndarray, later: str) -> None:
    """The README promises that a bundle given later among the inputs is refused (nothing is scored with a model
    that was not named first); a shipped bundle's name there gave a 'no such file' record instead."""
    Image.fromarray(mnist_digits[0]).save(tmp_path / "d.png")
    second = str(tiny_bundle) if later == "folder" else "mnist-denoise"
    code, out, err = run(capsys, "score", "mnist-detect", str(tmp_path / "d.png"), second)
    assert code == 2 and not out and "is a model bundle, not an input" in err, err
    _assert_one_error_line(err)


def test_outputs_are_never_written_into_a_bundle(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                mnist_digits: np.ndarray) -> None:
    """score --maps, denoise --out and evaluate --report into the bundle folder were accepted: they changed the
    bundle (the shipped one too, given by name), and train --force then refused to replace it. Refused in one
    line, nothing written."""
    from aemon.bundle import shipped_bundle

    Image.fromarray(mnist_digits[0]).save(tmp_path / "d.png")
    np.save(tmp_path / "n.npy", mnist_digits[:20])
    np.save(tmp_path / "a.npy", 255 - mnist_digits[:20])
    detect, denoise = shipped_bundle("mnist-detect"), shipped_bundle("mnist-denoise")
    before = {p: p.read_bytes() for b in (detect, denoise) for p in b.iterdir()}
    for argv in (["score", "mnist-detect", str(tmp_path / "d.png"), "--maps", str(detect)],
                 ["score", str(detect), str(tmp_path / "d.png"), "--maps", str(detect / "maps")],
                 ["denoise", "mnist-denoise", str(tmp_path / "d.png"), "--out", str(denoise / "out")],
                 ["evaluate", "mnist-detect", "--normal", str(tmp_path / "n.npy"), "--anomalous",
                  str(tmp_path / "a.npy"), "--report", str(detect / "report")],
                 ["calibrate", "mnist-detect", "--data", str(tmp_path / "n.npy"), "--out", str(detect / "v2")]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and not out and "inside the bundle" in err, (argv, err)
        _assert_one_error_line(err)
    assert {p: p.read_bytes() for b in (detect, denoise) for p in b.iterdir()} == before


def test_evaluate_finds_a_shipped_bundle_by_name(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                 mnist_digits: np.ndarray) -> None:
    """`aemon evaluate mnist-detect ...` loads the shipped bundle; the table names every column in full."""
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    np.save(tmp_path / "digits.npy", mnist_digits[:40])
    code, out, err = run(capsys, "evaluate", "mnist-detect", "--normal", str(tmp_path / "digits.npy"),
                         "--anomalous", str(tmp_path / "noise.npy"))
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[-3:] == ["threshold", "normal", "anomalous"]
    assert out.splitlines()[2].startswith("mnist-detect")


def test_calibrate_prints_only_its_summary(tiny_bundle: Path, tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """`aemon calibrate` as a process: one summary line on stderr, no TensorFlow start-up banners."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND")}
    done = subprocess.run([sys.executable, "-m", "aemon", "calibrate", str(tiny_bundle), "--data",
                           _unseen(tmp_path, mnist_digits, 400), "--out", str(tmp_path / "re")], env=env,
                          capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "threshold" in lines[0], done.stderr
    assert done.stdout == ""


def test_score_maps_writes_a_map_per_anomalous_image(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                     mnist_digits: np.ndarray) -> None:
    """`aemon score --maps DIR` writes the map of each anomalous image and names it in the record."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "n.png")
    Image.fromarray(mnist_digits[5]).save(tmp_path / "d.png")
    code, out, _ = run(capsys, "score", "mnist-detect", str(tmp_path / "n.png"), str(tmp_path / "d.png"),
                       "--maps", str(tmp_path / "maps"))
    assert code == 0
    noise, digit = (json.loads(line) for line in out.splitlines())
    assert noise["verdict"] == "anomaly" and Path(noise["map"]) == tmp_path / "maps" / "n.png.map.png"
    assert Path(noise["map"]).is_file() and "map" not in digit
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["n.png.map.png"]


def test_a_map_has_the_shape_of_its_image(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """A 60×20 image scored by a 28×28 bundle got a square map, the picture squashed, not lying over the image
    (found by attacking the CLI; the daemon draws maps the same way). A map keeps its image's aspect ratio."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 20), dtype=np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "square.png")
    code, out, err = run(capsys, "score", "mnist-detect", str(tmp_path / "tall.png"), str(tmp_path / "square.png"),
                         "--maps", str(tmp_path / "maps"))
    assert code == 0, err
    sizes = {}
    for line in out.splitlines():
        record = json.loads(line)
        with Image.open(record["map"]) as im:
            sizes[Path(record["item"]).name] = im.size
    (w, h), square = sizes["tall.png"], sizes["square.png"]
    assert abs(w / h - 20 / 60) < 0.05 and h >= 128, sizes
    assert square == (140, 140), sizes  # unchanged: 28 px enlarged 5 times


def test_score_maps_of_a_folder_keep_its_paths(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Maps of a folder's images went flat into DIR (two n.png became n.png.map.png and n.png.map-1.png, a
    name that reads as a row's map); they keep the folder's paths, as the daemon's do."""
    rng = np.random.default_rng(0)
    for sub in ("a", "b"):
        (tmp_path / "lot" / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "lot" / sub / "n.png")
    code, out, err = run(capsys, "score", "mnist-detect", str(tmp_path / "lot"), "--maps", str(tmp_path / "maps"))
    assert code == 0, err
    maps = sorted(json.loads(line)["map"] for line in out.splitlines())
    assert maps == [str(tmp_path / "maps" / "lot" / sub / "n.png.map.png") for sub in ("a", "b")]
    assert all(Path(m).is_file() for m in maps)


def test_outputs_inside_an_input_folder_are_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """`score lot --maps lot/maps` scored its own maps on every rerun (1, 2, then 4 records for one image, maps of
    maps), and `denoise lot --out lot/clean` denoised its outputs: both are refused, and nothing is written."""
    (tmp_path / "lot").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "lot" / "n.png")
    lot = str(tmp_path / "lot")
    for argv in (["score", "mnist-detect", lot, "--maps", f"{lot}/maps"],
                 ["score", "mnist-detect", lot, "--maps", lot],
                 ["denoise", "mnist-denoise", lot, "--out", f"{lot}/clean"],
                 ["denoise", "mnist-denoise", lot, "--out", lot]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "inside the input folder" in err and not out, (argv, err)
    assert [p.name for p in (tmp_path / "lot").iterdir()] == ["n.png"]
    code, out, err = run(capsys, "score", "mnist-detect", lot, "--maps", str(tmp_path / "maps"))
    assert code == 0 and len(out.splitlines()) == 1, err


def test_outputs_to_the_working_folder_or_from_a_dotdot_folder_are_written(capsys: pytest.CaptureFixture,
                                                                             tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by attacking the CLI: `--maps .` and `--out .` (the working folder) and a folder argument `..` ended
    in a traceback and wrote nothing. Outputs land in the working folder, a folder's under its real name."""
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    (tmp_path / "lot" / "sub").mkdir(parents=True)
    Image.fromarray(noise).save(tmp_path / "lot" / "n.png")
    for work, argv, field, want in (
            ("w1", ["score", "mnist-detect", "../lot/n.png", "--maps", "."], "map", "n.png.map.png"),
            ("w2", ["denoise", "mnist-denoise", "../lot/n.png", "--out", "./"], "denoised", "n.png")):
        (tmp_path / work).mkdir()
        monkeypatch.chdir(tmp_path / work)
        code, out, err = run(capsys, *argv)
        assert code == 0 and not err, (argv, err)
        assert json.loads(out)[field] == want and (tmp_path / work / want).is_file(), out
    monkeypatch.chdir(tmp_path / "lot" / "sub")
    code, out, err = run(capsys, "score", "mnist-detect", "..", "--maps", str(tmp_path / "maps"))
    assert code == 0, err
    assert json.loads(out)["map"] == str(tmp_path / "maps" / "lot" / "n.png.map.png"), out
    code, out, err = run(capsys, "denoise", "mnist-denoise", "..", "--out", str(tmp_path / "clean"))
    assert code == 0 and (tmp_path / "clean" / "lot" / "n.png").is_file(), err


def test_an_output_folder_whose_subfolder_is_the_input_is_refused(capsys: pytest.CaptureFixture,
                                                                  tmp_path: Path) -> None:
    """`score M/sub --maps M` wrote the maps of M/sub into M/sub itself (a folder's outputs go to DIR/<its
    name>), so the next run scored them as input; the same with `denoise D/sub --out D`. Refused."""
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    (tmp_path / "M" / "sub").mkdir(parents=True)
    Image.fromarray(noise).save(tmp_path / "M" / "sub" / "n.png")
    sub, top = str(tmp_path / "M" / "sub"), str(tmp_path / "M")
    for argv in (["score", "mnist-detect", sub, "--maps", top], ["denoise", "mnist-denoise", sub, "--out", top]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "the input folder" in err and not out, (argv, err)
        _assert_one_error_line(err)
    assert [p.name for p in (tmp_path / "M" / "sub").iterdir()] == ["n.png"]


def test_paths_may_follow_an_option(capsys: pytest.CaptureFixture, tmp_path: Path, mnist_digits: np.ndarray,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`aemon score B --maps DIR x.png` was a usage error (the paths ended at the option); an unknown option
    still is."""
    Image.fromarray(mnist_digits[5]).save(tmp_path / "d.png")
    code, out, err = run(capsys, "score", "mnist-detect", "--maps", str(tmp_path / "maps"), str(tmp_path / "d.png"))
    assert code == 0 and json.loads(out)["item"].endswith("d.png"), err
    code, _, err = run(capsys, "score", "mnist-detect", "--colour", "red", str(tmp_path / "d.png"))
    assert code == 2 and "unrecognized arguments: --colour" in err, err
    # After '--' a path may start with '-' (it was refused after an option).
    monkeypatch.chdir(tmp_path)
    Image.fromarray(mnist_digits[6]).save(tmp_path / "-n.png")
    code, out, err = run(capsys, "score", "mnist-detect", "--maps", "m2", "d.png", "--", "-n.png")
    assert code == 0 and [json.loads(line)["item"] for line in out.splitlines()] == ["d.png", "-n.png"], err


def test_no_polling_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """AEMON_POLLING=1 could not be turned off from the command line (--polling only turned it on)."""
    from aemon.cli import _settings_flags, build_parser
    from aemon.settings import load_settings

    monkeypatch.setenv("AEMON_POLLING", "1")
    args = build_parser().parse_args(["run", "--no-polling"])
    assert load_settings(None, **_settings_flags(args)).polling is False
    args = build_parser().parse_args(["run"])
    assert load_settings(None, **_settings_flags(args)).polling is True


def test_calibrate_warns_on_the_training_data(capsys: pytest.CaptureFixture, tiny_bundle: Path,
                                              tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """Calibrating on the images the model was fitted on lowers the threshold without a word; it is warned."""
    source = read_meta(tiny_bundle).training["source"]
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", source, "--out", str(tmp_path / "again"))
    assert code == 0 and "calibrate.data_overlaps_training" in err, err
    np.save(tmp_path / "other.npy", mnist_digits[:200])
    code, _, err = run(capsys, "calibrate", str(tiny_bundle), "--data", str(tmp_path / "other.npy"),
                       "--out", str(tmp_path / "other"))
    assert code == 0 and "data_overlaps_training" not in err, err


def _colour_folder(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``n`` smooth colour images (a red-to-blue gradient with a green disc at a random place)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = (255 * xx / w).astype(np.uint8)
        img[..., 2] = (255 * yy / h).astype(np.uint8)
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (h // 8) ** 2, 1] = 200
        Image.fromarray(img).save(folder / f"c{i:03d}.png")
    return folder


def test_train_chooses_size_and_colour_from_the_data(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """64x48 colour images train an rgb bundle at 64x48 (printed and stored); scoring keeps the colour; a grey
    image of another size is converted and resized; denoise-free scoring of an rgb array works."""
    data = _colour_folder(tmp_path / "colour", 120, (64, 48))
    out = tmp_path / "rgb"
    code, _, err = run(capsys, "train", "--data", str(data), "--arch", "conv", "--epochs", "1", "--target-fpr", "0.1",
                       "--out", str(out), "--log-format", "json")
    assert code == 0, err
    assert "size: auto: 64x48" in err and "color: auto: rgb" in err
    meta = read_meta(out)
    assert meta.input_shape == [64, 48, 3]
    assert meta.preprocessing["color_mode"] == "rgb" and meta.preprocessing["size"] == [64, 48]
    assert meta.preprocessing["choices"]["color"].startswith("auto: rgb")
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(tmp_path / "grey.png")
    np.save(tmp_path / "rows.npy", np.zeros((2, 64, 48, 3), np.uint8))
    code, stdout, err = run(capsys, "score", str(out), str(data / "c000.png"), str(tmp_path / "grey.png"),
                            str(tmp_path / "rows.npy"))
    assert code == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    assert len(records) == 4 and all(r["verdict"] in ("ok", "anomaly") for r in records)


def test_train_size_and_colour_flags(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """--size and --color override the data; a bad --size is one clear error line."""
    data = _colour_folder(tmp_path / "colour", 120, (40, 40))
    out = tmp_path / "grey"
    code, _, err = run(capsys, "train", "--data", str(data), "--arch", "dense", "--epochs", "1", "--target-fpr", "0.1",
                       "--size", "32x32", "--color", "grayscale", "--out", str(out))
    assert code == 0, err
    assert read_meta(out).input_shape == [32, 32, 1]
    code, _, err = run(capsys, "train", "--data", str(data), "--size", "big", "--out", str(tmp_path / "x"))
    assert code != 0
    _assert_one_error_line(err)
    assert "--size" in err


def _pngs(folder: Path, digits: np.ndarray, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(digits[i]).save(folder / f"{i}.png")
    return folder


def test_train_force_replaces_only_a_bundle_and_never_the_data(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                 digits: np.ndarray) -> None:
    """--force replaced whatever --out named: the training folder itself (its images gone), or a plain file
    (left behind as a hidden stray). It replaces a bundle only, and --out may not hold the data."""
    photos = _pngs(tmp_path / "photos", digits, 30)
    (photos / "notes.txt").write_text("mine")
    report = tmp_path / "report.txt"
    report.write_text("important")
    common = ["--epochs", "1", "--arch", "pca", "--latent-dim", "8", "--score", "mse", "--target-fpr", "0.5"]
    for out in (photos, report, tmp_path):
        code, _, err = run(capsys, "train", "--data", str(photos), "--out", str(out), "--force", *common)
        assert code == 2, err
        _assert_one_error_line(err)
    assert len(list(photos.glob("*.png"))) == 30 and (photos / "notes.txt").read_text() == "mine"
    assert report.read_text() == "important"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "report.txt"]  # no stray left
    bundle = tmp_path / "bundle"
    for _ in range(2):  # a bundle is replaced
        code, _, err = run(capsys, "train", "--data", str(photos), "--out", str(bundle), "--force", *common)
        assert code == 0, err
    assert read_meta(bundle).arch == "pca"


def test_train_force_never_replaces_a_folder_holding_more_than_a_bundle(capsys: pytest.CaptureFixture,
                                                                       tmp_path: Path, digits: np.ndarray) -> None:
    """--force took any folder with a file named bundle.json for a bundle and replaced it whole: another tool's
    project folder (its bundle.json, data and sources), or a bundle where the user kept notes and example
    images, lost everything else (an attack). Such folders are refused, naming what is in the way."""
    photos = _pngs(tmp_path / "photos", digits, 30)
    common = ["--data", str(photos), "--arch", "pca", "--latent-dim", "8", "--score", "mse", "--target-fpr", "0.5"]
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "bundle.json").write_text('{"schemaVersion": "v1", "name": "app"}')
    (project / "src" / "main.py").write_text("print(1)")
    kept = tmp_path / "kept"
    assert run(capsys, "train", "--out", str(kept), *common)[0] == 0
    (kept / "NOTES.txt").write_text("mine")
    for folder, hint in ((project, "not an aemon bundle"), (kept, "NOTES.txt")):
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        code, _, err = run(capsys, "train", "--out", str(folder), "--force", *common)
        assert code == 2, err
        _assert_one_error_line(err)
        assert hint in err, err
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert (project / "src" / "main.py").read_text() == "print(1)" and (kept / "NOTES.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [
    ["--seed", "-1"],
    ["--arch", "conv", "--size", "10x10"],
    ["--batch-size", "5000"],
])
def test_train_flags_checked_before_or_with_one_line(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                     digits: np.ndarray, argv: list[str]) -> None:
    """A negative seed and a conv size not divisible by 4 end in one error line (they were tracebacks); a
    training batch larger than the daemon's AEMON_BATCH_SIZE limit is the training's own business."""
    photos = _pngs(tmp_path / "photos", digits, 30)
    code, _, err = run(capsys, "train", "--data", str(photos), "--out", str(tmp_path / "b"), "--epochs", "1",
                       "--target-fpr", "0.5", *argv)
    if argv[0] == "--batch-size":
        assert code == 0, err
    else:
        assert code == 2, err
        _assert_one_error_line(err)


def test_unwritable_outputs_and_closed_pipes_end_in_one_line(capsys: pytest.CaptureFixture, tiny_bundle: Path,
                                                              tmp_path: Path, digits: np.ndarray) -> None:
    """An output path that cannot be written (below a file here; a read-only mount or /proc alike) is one
    error line naming the option, not a traceback (exit 2 for an output folder that cannot be made: it
    said "No such file or directory", exit 1); `aemon score ... | head -1` ends quietly."""
    import subprocess
    import sys

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    item = _pngs(tmp_path / "items", digits, 3)
    for verb, flag in (("score", "--maps"), ("denoise", "--out")):  # a usage error, before anything is read
        bundle = str(tiny_bundle) if verb == "score" else "mnist-denoise"
        code, out, err = run(capsys, verb, bundle, str(item), flag, str(blocker / "maps"))
        assert code == 2 and not out, (verb, err)
        _assert_one_error_line(err)
        assert f"{flag} {blocker / 'maps'} cannot be made" in err, err
    code, _, err = run(capsys, "samples", str(blocker / "s"))
    assert code in (1, 2), err
    _assert_one_error_line(err)
    proc = subprocess.run(f"{sys.executable} -m aemon score {tiny_bundle} {item} {item} {item} | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_negative_limit_is_refused(capsys: pytest.CaptureFixture, tiny_bundle: Path) -> None:
    """`?limit=-5` dropped the last five rows; a limit below 1 is an error."""
    code, _, err = run(capsys, "score", str(tiny_bundle), "sample:mnist?limit=-5")
    assert code != 0
    _assert_one_error_line(err)
    assert "limit" in err


def test_score_gives_every_file_of_a_folder_a_record(capsys: pytest.CaptureFixture, tiny_bundle: Path,
                                                     tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """A folder's files that are no images or arrays were left out silently, exit 0 (named alone, the same file
    was rejected): one copy of a PNG under seven names gave one record. Each file now has its record, hidden
    ones aside; a folder of nothing else (or nothing at all) is one rejected record, as before."""
    folder = tmp_path / "lot"
    folder.mkdir()
    for name in ("ok.png", "noext", "a.jpe", "notes.txt", "c.png~", ".hidden.png"):
        Image.fromarray(mnist_digits[0]).save(folder / name, format="PNG")
    code, out, err = run(capsys, "score", str(tiny_bundle), str(folder))
    records = {Path(r["item"]).name: r for r in map(json.loads, out.splitlines())}
    assert code == 1, err
    assert sorted(records) == ["a.jpe", "c.png~", "noext", "notes.txt", "ok.png"]
    assert records["ok.png"]["verdict"] != "rejected"
    assert {records[n]["reason"] for n in ("a.jpe", "c.png~", "noext", "notes.txt")} == {"unsupported_type"}
    (tmp_path / "current").symlink_to(folder)  # a folder named through a link is read, as before
    code, out, err = run(capsys, "score", str(tiny_bundle), str(tmp_path / "current"))
    assert sorted(Path(r["item"]).name for r in map(json.loads, out.splitlines())) == sorted(records), err
    for name in ("hidden-only", "nothing"):
        (tmp_path / name).mkdir()
    (tmp_path / "hidden-only" / ".x.png").write_bytes(b"")
    for name in ("hidden-only", "nothing"):
        code, out, err = run(capsys, "score", str(tiny_bundle), str(tmp_path / name))
        records = [json.loads(line) for line in out.splitlines()]
        assert code == 1, err
        assert [(r["verdict"], r["reason"]) for r in records] == [("rejected", "empty")]
        assert "no files" in records[0]["error"]


def test_denoise_keeps_a_16_bit_image_16_bit(capsys: pytest.CaptureFixture, tiny_denoise_bundle: Path,
                                             tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """denoised/ keeps the item's dtype (contract): a 16-bit grey PNG came back 8-bit."""
    src = tmp_path / "deep.png"
    deep = mnist_digits[0].astype(np.uint16) * 257  # the same picture over the full 16-bit range
    Image.fromarray(np.kron(deep, np.ones((2, 2), np.uint16))).save(src)  # 56x56
    code, _, err = run(capsys, "denoise", str(tiny_denoise_bundle), str(src), "--out", str(tmp_path / "out"))
    assert code == 0, err
    with Image.open(tmp_path / "out" / "deep.png") as img:
        assert img.mode.startswith("I;16") and img.size == (56, 56), img.mode
        values = np.asarray(img)
    assert values.max() > 255 * 100  # scaled to 16 bits, not 8-bit values in a 16-bit file


def _grey_alpha_16_bit_png(path: Path, grey: np.ndarray) -> None:
    """A PNG of colour type 4 (grey and alpha) at 16 bits, written by hand: Pillow opens it as 8-bit RGBA."""
    import struct
    import zlib

    from daemon_process import png_chunk

    pixels = np.dstack([grey, np.full_like(grey, 65535)]).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    h, w = grey.shape
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
                     + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def test_denoise_keeps_grey_images_grey_whatever_their_mode(capsys: pytest.CaptureFixture, tiny_denoise_bundle: Path,
                                                            tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """A GIF or PNG with a palette of greys, and a 16-bit grey PNG with alpha, came back as 8-bit RGB: they are
    grey (the last 16-bit) like the item (helper's attack)."""
    digit = mnist_digits[0]
    Image.fromarray(digit).convert("P").save(tmp_path / "pal.gif")
    Image.fromarray(digit).quantize(16).save(tmp_path / "pal.png")
    _grey_alpha_16_bit_png(tmp_path / "la16.png", digit.astype(np.uint16) * 257)
    for name in ("pal.gif", "pal.png", "la16.png"):
        with Image.open(tmp_path / name) as img:
            assert img.mode in ("P", "RGBA"), (name, img.mode)
    code, _, err = run(capsys, "denoise", str(tiny_denoise_bundle), *(str(tmp_path / n) for n in
                       ("pal.gif", "pal.png", "la16.png")), "--out", str(tmp_path / "out"))
    assert code == 0, err
    modes = {}
    for name in ("pal.gif.png", "pal.png", "la16.png"):
        with Image.open(tmp_path / "out" / name) as img:
            modes[name] = img.mode
    assert modes == {"pal.gif.png": "L", "pal.png": "L", "la16.png": "I;16"}, modes


def test_long_file_names_get_short_output_names_and_the_run_goes_on(capsys: pytest.CaptureFixture,
                                                                   tiny_denoise_bundle: Path, tmp_path: Path) -> None:
    """`score --maps` and `denoise` stopped the whole run on a 250-byte file name (its map or output name did not
    fit; later items were never scored): the output gets a short name, as in the daemon, and the run goes on."""
    rng = np.random.default_rng(0)
    long_name = "M" * 246 + ".png"
    (tmp_path / "lot").mkdir()
    for name in (long_name, "z.png"):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "lot" / name)
    code, out, err = run(capsys, "score", "mnist-detect", str(tmp_path / "lot"), "--maps", str(tmp_path / "maps"))
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["item"]).name for r in records] == [long_name, "z.png"]
    assert all(Path(r["map"]).is_file() and len(Path(r["map"]).name) < 200 for r in records), records
    code, out, err = run(capsys, "denoise", str(tiny_denoise_bundle), str(tmp_path / "lot"), "--out",
                         str(tmp_path / "den"))
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2 and all(Path(r["denoised"]).is_file() for r in records), records


def test_denoise_of_an_npz_keeps_its_other_arrays(capsys: pytest.CaptureFixture, tiny_denoise_bundle: Path,
                                                   tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """The denoised .npz holds the reconstructions under the images' name and every other array as it was
    (labels and all); only 'x' came back."""
    src = tmp_path / "set.npz"
    np.savez(src, x=mnist_digits[:4], y=np.arange(4), note=np.array("camera 3"))
    code, _, err = run(capsys, "denoise", str(tiny_denoise_bundle), str(src), "--out", str(tmp_path / "out"))
    assert code == 0, err
    with np.load(tmp_path / "out" / "set.npz") as out:
        assert sorted(out.files) == ["note", "x", "y"]
        assert out["x"].shape == (4, 28, 28) and out["x"].dtype == np.uint8
        np.testing.assert_array_equal(out["y"], np.arange(4))
        assert str(out["note"]) == "camera 3"


def test_a_camera_photo_is_scored_and_denoised_as_displayed(capsys: pytest.CaptureFixture, tiny_bundle: Path,
                                                            tiny_denoise_bundle: Path, tmp_path: Path,
                                                            mnist_digits: np.ndarray) -> None:
    """A digit stored turned with EXIF orientation 6 (as phones save photos) scores like the same digit saved
    upright, and its denoised output has the displayed size; it scored as an anomaly, turned."""
    upright = np.kron(mnist_digits[0], np.ones((2, 1), np.uint8))  # 56 high, 28 wide
    Image.fromarray(upright).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90° clockwise to view
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(tmp_path / "phone.png", exif=exif)
    code, out, err = run(capsys, "score", str(tiny_bundle), str(tmp_path / "upright.png"), str(tmp_path / "phone.png"))
    assert code == 0, err
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["score"] == pytest.approx(second["score"], rel=1e-6), (first, second)
    code, _, err = run(capsys, "denoise", str(tiny_denoise_bundle), str(tmp_path / "phone.png"),
                       "--out", str(tmp_path / "out"))
    assert code == 0, err
    with Image.open(tmp_path / "out" / "phone.png") as img:
        assert img.size == (28, 56)


@pytest.mark.parametrize(("kind", "stored", "shown"), [("text", "6", (64, 48)), ("rational", 6.0, (48, 64))])
def test_an_orientation_tag_is_applied_to_sizes_exactly_as_to_pixels(capsys: pytest.CaptureFixture,
                                                                      tiny_denoise_bundle: Path, tmp_path: Path,
                                                                      kind: str, stored: object,
                                                                      shown: tuple[int, int]) -> None:
    """An EXIF orientation stored as text ("6", not a number) was read as a quarter turn for the displayed
    size, while Pillow (like viewers) leaves the pixels unturned: the denoised output and the map came out
    48x64 for a 64x48 photo, the picture squeezed (a helper's attack). Such a tag is ignored throughout; a
    rational 6, which Pillow applies, turns both (a reviewer's catch in the first fix)."""
    import struct

    photo = np.zeros((48, 64, 3), np.uint8)
    photo[5:20, 5:30] = 255
    head = b"Exif\0\0II*\0" + struct.pack("<IH", 8, 1)
    if kind == "text":
        exif = head + struct.pack("<HHI", 0x0112, 2, 2) + b"6\0\0\0" + struct.pack("<I", 0)
    else:  # RATIONAL 6/1, stored after the directory
        exif = head + struct.pack("<HHII", 0x0112, 5, 1, 26) + struct.pack("<I", 0) + struct.pack("<II", 6, 1)
    Image.fromarray(photo).save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "tagged.jpg") as img:
        assert img.getexif().get(0x0112) == stored
    code, _, err = run(capsys, "denoise", str(tiny_denoise_bundle), str(tmp_path / "tagged.jpg"),
                       "--out", str(tmp_path / "out"))
    assert code == 0, err
    with Image.open(tmp_path / "out" / "tagged.jpg.png") as img:
        assert img.size == shown


def test_floats_a_rounding_error_above_one_are_not_taken_as_0_to_255(capsys: pytest.CaptureFixture,
                                                                      tiny_bundle: Path, tmp_path: Path,
                                                                      mnist_digits: np.ndarray) -> None:
    """One value of 1.0000001 (float rounding) in a [0, 1] float array made the whole file count as 0–255:
    every row was divided by 255 and scored as an anomaly. It scores as the same array without it."""
    clean = mnist_digits[:3].astype(np.float64) / 255.0
    noisy = clean.copy()
    y, x = np.argwhere(clean[1] == 1.0)[0]
    noisy[1, y, x] = 1.0000001  # a full-ink pixel, a rounding error above it
    np.save(tmp_path / "clean.npy", clean)
    np.save(tmp_path / "noisy.npy", noisy)
    code, out, err = run(capsys, "score", str(tiny_bundle), str(tmp_path / "clean.npy"), str(tmp_path / "noisy.npy"))
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]  # one line per row
    assert len(rows) == 6 and all(row["verdict"] == "ok" for row in rows), rows
    assert [r["score"] for r in rows[:3]] == pytest.approx([r["score"] for r in rows[3:]], abs=1e-4)


def test_a_full_disk_names_the_output_it_could_not_write(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """train and calibrate on a full filesystem: one line that says what and where (it said only
    'No space left on device'), exit 1, and no half-written bundle."""
    import subprocess

    from daemon_process import full_tmpfs, full_tmpfs_fill

    mount = tmp_path / "small"
    if not full_tmpfs(mount):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        code, _, err = run(capsys, "train", "--data", "sample:mnist?limit=300", "--arch", "pca", "--latent-dim", "8",
                           "--out", str(mount / "bundle"))
        assert code == 1 and "No space left on device" in err and str(mount / "bundle") in err, err
        assert sorted(p.name for p in mount.iterdir()) == ["filler"]
        # calibrate --out copies the bundle first: its error was a Python list of every file that failed
        code, _, err = run(capsys, "calibrate", "mnist-detect", "--data", "sample:mnist?limit=300", "--out",
                           str(mount / "copy"))
        assert code == 1 and "No space left on device" in err and str(mount / "copy") in err, err
        _assert_one_error_line("\n".join(line for line in err.splitlines() if not line.startswith("{")))  # logs
        assert "[(" not in err, err
        assert sorted(p.name for p in mount.iterdir()) == ["filler"]
        # denoise and score --maps: the error named no path, or a name within the output folder
        (mount / "filler").unlink()
        (mount / "out" / "sub").mkdir(parents=True)
        full_tmpfs_fill(mount)
        photos = tmp_path / "photos"
        photos.mkdir()
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(photos / f"{i}.png")
        for argv in (["denoise", "mnist-denoise", str(photos), "--out", str(mount / "out")],
                     ["score", "mnist-detect", str(photos), "--maps", str(mount / "out" / "sub")]):
            code, _, err = run(capsys, *argv)
            assert code == 1 and str(mount / "out") in err, err
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_code_size_that_cannot_work_is_refused_before_training(capsys: pytest.CaptureFixture,
                                                                  tmp_path: Path) -> None:
    """--latent-dim 1000000000 ended in a TensorFlow OOM traceback; with --arch auto any --latent-dim was
    silently ignored, and --noise-factor without --denoise too. All are refused in one line, exit 2, before data
    is loaded."""
    code, _, err = run(capsys, "train", "--data", "sample:mnist?limit=300", "--arch", "dense", "--latent-dim",
                       "1000000000", "--out", str(tmp_path / "b"))
    assert code == 2 and "lower --latent-dim to at most 784" in err and "Traceback" not in err, err
    code, _, err = run(capsys, "train", "--data", "sample:mnist?limit=300", "--latent-dim", "5",
                       "--out", str(tmp_path / "b"))
    assert code == 2 and "--latent-dim needs a fixed --arch" in err, err
    for name in ("a/b\nc", "tab\there", " "):  # stored as given, it split info's lines and records' names
        code, _, err = run(capsys, "train", "--data", "sample:mnist?limit=300", "--arch", "pca", "--name", name,
                           "--out", str(tmp_path / "b"))
        assert code == 2 and "a bundle name is one line" in err, (name, err)
    code, _, err = run(capsys, "train", "--data", "sample:mnist?limit=300", "--arch", "conv", "--latent-dim", "5",
                       "--out", str(tmp_path / "b"))
    assert code == 2 and "--arch conv" in err and "--latent-dim" in err, err  # the seed's code is fixed: ignored
    code, _, err = run(capsys, "train", "--data", "sample:mnist?limit=300", "--arch", "pca", "--noise-factor", "3",
                       "--out", str(tmp_path / "b"))
    assert code == 2 and "--noise-factor needs --denoise" in err, err  # it was silently ignored
    assert not (tmp_path / "b").exists()


def test_too_few_distinct_images_say_that_repeats_were_dropped(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                mnist_digits: np.ndarray) -> None:
    """150 files holding 30 distinct digits: the refusal said only "30 images are too few", which reads as
    wrong to a user who gave 150. It now says how many were given and that the exact repeats were dropped."""
    data = tmp_path / "copies"
    data.mkdir()
    for i in range(150):
        Image.fromarray(mnist_digits[i % 30]).save(data / f"d{i:03d}.png")
    code, _, err = run(capsys, "train", "--data", str(data), "--arch", "pca", "--latent-dim", "4",
                       "--out", str(tmp_path / "b"))
    assert code != 0 and "Error: 30 distinct images" in err, err
    assert "150 given" in err and "120 exact repeats" in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--data", "sample:mnist", "--out", "B", "--size", "0x0"],
    ["train", "--data", "sample:mnist", "--out", "B", "--size", "28x28x3"],
    ["calibrate", "mnist-detect", "--data", "sample:mnist", "--out", "B", "--target-fpr", "5"],
    ["calibrate", "mnist-detect", "--data", "sample:mnist", "--out", "B", "--target-fpr", "nan"],
])
def test_bad_flag_values_are_usage_errors_in_every_verb(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                        argv: list[str]) -> None:
    """A bad --size was exit 1 and calibrate's --target-fpr 5 exit 1 where train's was 2: both are usage
    errors (exit 2), refused before any data is read."""
    argv = [str(tmp_path / "B") if a == "B" else a for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "must be" in err, err
    assert not (tmp_path / "B").exists()


def test_info_flags_a_changed_model_file(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path) -> None:
    """info printed a bundle whose model.keras had been changed as if it were fine (score and the daemon refuse
    it): it now says so, exit 1."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with (copy / "model.keras").open("ab") as fp:
        fp.write(b"tampered")
    code, out, err = run(capsys, "info", str(copy))
    assert code == 1 and "does not match bundle.json" in err and out == "", (out, err)
    assert run(capsys, "info", str(tiny_bundle))[0] == 0


def test_info_checks_what_loading_checks(capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path) -> None:
    """info exited 0 on bundles every other verb refuses (an input_shape unlike the model's, a score state
    deleted); it makes the same checks now. It also takes a shipped bundle by name, as score does."""
    for name, edit in (("shape", lambda m: m.update(input_shape=[28, 28, 3])),
                       ("state", lambda m: m.update(score_state_file="gone.npz", score_state_sha256="0" * 64))):
        copy = tmp_path / name
        shutil.copytree(tiny_bundle, copy)
        meta = json.loads((copy / "bundle.json").read_text())
        edit(meta)
        (copy / "bundle.json").write_text(json.dumps(meta))
        code, out, err = run(capsys, "info", str(copy))
        assert code == 1 and out == "" and err.count("\n") == 1, (name, out, err)
    code, out, err = run(capsys, "info", "mnist-detect")
    assert code == 0 and "mnist-detect" in out, err


@pytest.mark.parametrize("argv", [
    ["train", "--data", "", "--out", "{tmp}/b", "--arch", "pca", "--latent-dim", "8"],
    ["calibrate", "mnist-detect", "--data", "", "--out", "{tmp}/b"],
    ["score", "mnist-detect", ""],
    ["evaluate", "mnist-detect", "--normal", "", "--anomalous", "sample:mnist?limit=50"],
])
def test_an_empty_source_or_path_is_refused_not_read_as_the_current_folder(
        capsys: pytest.CaptureFixture, tmp_path: Path, digits: np.ndarray, monkeypatch, argv: list[str]) -> None:
    """An empty --data or PATH (a script's unset variable) meant the current folder: train fitted and calibrate
    recalibrated on every image below it, score scored them all, each with exit 0 (an attack)."""
    _pngs(tmp_path / "here", digits, 12)
    monkeypatch.chdir(tmp_path / "here")
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code != 0 and not out, (code, out, err)
    _assert_one_error_line(err)
    assert "empty" in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("src", "says"), [
    ("sample:mnist?limit=300&limit=400", "limit is given twice"),
    ("sample:mnist?limt=5", "sample:mnist takes digits, limit"),
])
def test_source_options_given_twice_or_misspelt_are_refused_with_what_the_source_takes(
        capsys: pytest.CaptureFixture, tmp_path: Path, src: str, says: str) -> None:
    """A repeated option silently kept its last value, and a misspelt one listed options the source refuses."""
    code, _, err = run(capsys, "train", "--data", src, "--out", str(tmp_path / "b"), "--arch", "pca")
    assert code != 0
    _assert_one_error_line(err)
    assert says in err, err


def test_a_calibration_never_lands_in_a_bundle_replaced_while_it_scored(
        capsys: pytest.CaptureFixture, tmp_path: Path, digits: np.ndarray) -> None:
    """`calibrate B` in place while `train --out B --force` replaced B: calibrate wrote its bundle.json (of the
    old model) into the new bundle, which then refused to load (sha256 mismatch), both exiting 0 (an attack,
    3 of 3). Two calibrations at once both became revision 2, one silently lost. A calibration now refuses a
    bundle replaced meanwhile, and each calibration is its own revision."""
    from aemon.bundle import load_bundle
    from aemon.errors import BundleError
    from aemon.recalibrate import recalibrate
    from aemon.sources import load_source

    photos = _pngs(tmp_path / "photos", digits, 40)
    common = ["--data", str(photos), "--arch", "pca", "--score", "mse", "--target-fpr", "0.5"]
    bundle = tmp_path / "b"
    assert run(capsys, "train", "--out", str(bundle), "--latent-dim", "8", *common)[0] == 0
    first, second = load_bundle(bundle), load_bundle(bundle)  # two calibrations begin
    data = load_source(str(photos), first.preprocessing)
    assert recalibrate(first, data, 0.3).revision == 2
    assert recalibrate(second, data, 0.4).revision == 3  # was 2 as well
    assert load_bundle(bundle).meta.revision == 3
    stale = load_bundle(bundle)  # a calibration begins; the bundle is replaced meanwhile
    assert run(capsys, "train", "--out", str(bundle), "--latent-dim", "4", "--force", *common)[0] == 0
    with pytest.raises(BundleError, match="replaced"):
        recalibrate(stale, data, 0.3)
    assert load_bundle(bundle).meta.latent_dim == 4  # the new bundle, whole


def test_score_lines_are_utf8_json_whatever_the_output_encoding(tmp_path: Path, digits: np.ndarray) -> None:
    """With PYTHONIOENCODING=ascii, `aemon score` of an image named with accents ended in a UnicodeEncodeError
    traceback (an attack). Its JSON lines are UTF-8 whatever the stream's encoding."""
    import json
    import os
    import subprocess
    import sys

    image = tmp_path / "é ü.png"
    Image.fromarray(digits[0]).save(image)
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-m", "aemon", "score", "mnist-detect", str(image)], env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    (record,) = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert record["item"].endswith("é ü.png") and record["verdict"] in ("ok", "anomaly")


def test_array_shape_errors_give_advice_that_works(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """A 30x30 array with --arch convsmall was told to `choose --size 32x32`, which arrays ignore (they are never
    resized), and a 5-D array was read as 4x16 images before an error about a shape it did not have."""
    np.save(tmp_path / "a30.npy", np.zeros((20, 30, 30), np.uint8))
    np.save(tmp_path / "a5d.npy", np.zeros((20, 4, 16, 16, 1), np.uint8))
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "a30.npy"), "--out", str(tmp_path / "b1"),
                       "--arch", "convsmall", "--epochs", "1")
    assert code == 2 and "never resized" in err and "--size" not in err, err
    _assert_one_error_line(err)
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "a5d.npy"), "--out", str(tmp_path / "b2"),
                       "--arch", "pca", "--epochs", "1")
    assert code != 0 and "5-D" in err and "4x16" not in err, err
    _assert_one_error_line(err)


def test_train_on_sample_elpv_without_its_package_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the elpv-dataset package, `aemon train --data sample:elpv...` first printed its size choice
    ("auto: 128x128 from 300x300, the size of every image of the data set", data it never saw), then the
    error. Now only the one line that says how to install it."""
    import sys

    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # import elpv_dataset raises ImportError
    code, out, err = run(capsys, "train", "--data", "sample:elpv?type=mono&defect=0", "--out", str(tmp_path / "b"))
    assert code == 1 and out == "", out
    assert err.strip().count("\n") == 0 and "pip install" in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("named", ["sample:mnist?digit=1", "sample:nothing"])
def test_a_named_dataset_that_cannot_be_scored_stops_score_before_any_record(capsys: pytest.CaptureFixture,
                                                                              tiny_bundle: Path, tmp_path: Path,
                                                                              mnist_digits: np.ndarray,
                                                                              named: str) -> None:
    """A named dataset that cannot be used among other inputs stopped `score` where it stood: the inputs
    before it had records and those after it none, with the exit status of a run whose items were only
    rejected (a helper's attack). Named datasets load first, so such a run prints no record at all."""
    for name in ("a.png", "b.png"):
        Image.fromarray(mnist_digits[0]).save(tmp_path / name)
    code, out, err = run(capsys, "score", str(tiny_bundle), str(tmp_path / "a.png"), named, str(tmp_path / "b.png"))
    assert code != 0 and out == "", out
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and named.split("?")[0] in errors[0], err


@pytest.mark.parametrize("data", ["sample:mnist?digits=x", "sample:elpv?type=foo", "sample:mnist?limit=10",
                                  "repeats.npy"])
def test_train_on_bad_data_says_one_line(tmp_path: Path, data: str, mnist_digits: np.ndarray) -> None:
    """A bad source or too few images (also 200 images that are 50 repeated) is one error line: the size and
    colour lines (said before the data was read) made it three, and a warning about the repeats four."""
    import subprocess
    import sys

    np.save(tmp_path / "repeats.npy", np.repeat(mnist_digits[:50], 4, axis=0))
    data = str(tmp_path / data) if data.endswith(".npy") else data
    done = subprocess.run([sys.executable, "-m", "aemon", "train", "--data", data, "--out", str(tmp_path / "b")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert not (tmp_path / "b").exists()
