"""Detection quality and the HTML report (aemon.evaluate, aemon.report, aemon evaluate)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from aemon.bundle import load_bundle
from aemon.cli import main
from aemon.errors import UsageError
from aemon.evaluate import overlaps, quality
from aemon.report import FIGURE_PIXELS, INDEX
from aemon.sources import load_source


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory, mnist_digits: np.ndarray) -> tuple[Path, Path]:
    """Normal digits and generated anomalies (inverted digits, noise, bars) as two .npy files."""
    folder = tmp_path_factory.mktemp("evaluate-data")
    rng = np.random.default_rng(7)
    normal = mnist_digits[0:1500:5]  # 300 digits of the classes the tiny bundles learnt
    inverted = 255 - mnist_digits[1:1500:15]
    noise = rng.integers(0, 256, size=(70, 28, 28), dtype=np.uint8)
    bars = np.zeros((60, 28, 28), np.uint8)
    for i, img in enumerate(bars):
        img[:, (i % 7) * 4 : (i % 7) * 4 + 3] = 255
    anomalous = np.concatenate([inverted, noise, bars])
    np.save(folder / "normal.npy", normal)
    np.save(folder / "anomalous.npy", anomalous)
    return folder / "normal.npy", folder / "anomalous.npy"


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """Run ``aemon ARGV``; returns exit status, stdout and stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.lstrip().startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err


def test_numbers_match_scikit_learn(capsys, tiny_bundle: Path, tiny_pca_bundle: Path, data_files) -> None:
    """--json gives, per bundle, scikit-learn's AUROC and AUPRC and the rates at the bundle's threshold."""
    normal_npy, anomalous_npy = data_files
    code, out, _ = run(capsys, "evaluate", tiny_bundle, tiny_pca_bundle, "--normal", normal_npy,
                       "--anomalous", anomalous_npy, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["bundle"] for r in rows] == ["tiny", "tiny-pca"]
    for row, path in zip(rows, (tiny_bundle, tiny_pca_bundle), strict=True):
        bundle = load_bundle(path)
        s_n = bundle.score(load_source(str(normal_npy)).x)
        s_a = bundle.score(load_source(str(anomalous_npy)).x)
        y, s = np.r_[np.zeros(len(s_n)), np.ones(len(s_a))], np.r_[s_n, s_a]
        assert row["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
        assert row["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
        assert row["fpr"] == pytest.approx(np.mean(s_n > bundle.threshold))
        assert row["tpr"] == pytest.approx(np.mean(s_a > bundle.threshold))
        assert row["threshold"] == bundle.threshold
        assert (row["n_normal"], row["n_anomalous"]) == (300, 230)
        assert row["warnings"] == []  # .npy files are not the bundles' training source
        assert row["auroc"] > 0.9  # inverted digits, noise and bars are easy to tell apart


def test_table_shows_the_same_numbers(capsys, tiny_bundle: Path, data_files) -> None:
    """The plain table prints the bundle's AUROC, AUPRC, FPR, TPR and sample counts."""
    normal_npy, anomalous_npy = data_files
    code, out, _ = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy)
    assert code == 0
    bundle = load_bundle(tiny_bundle)
    s_n = bundle.score(load_source(str(normal_npy)).x)
    s_a = bundle.score(load_source(str(anomalous_npy)).x)
    q = quality("tiny", s_n, s_a, bundle.threshold)
    line = next(line for line in out.splitlines() if line.startswith("tiny "))
    assert line.split()[1:5] == [f"{q.auroc:.4f}", f"{q.auprc:.4f}", f"{q.fpr:.4f}", f"{q.tpr:.4f}"]
    assert line.split()[-2:] == ["300", "230"]
    assert "AUROC" in out and "threshold" in out


def test_report_has_every_file(capsys, tmp_path: Path, tiny_bundle: Path, tiny_pca_bundle: Path, data_files) -> None:
    """--report writes valid, non-blank PNGs of the expected sizes and an index.html linking only them."""
    normal_npy, anomalous_npy = data_files
    report = tmp_path / "report"
    code, _, err = run(capsys, "evaluate", tiny_bundle, tiny_pca_bundle, "--normal", normal_npy,
                         "--anomalous", anomalous_npy, "--report", report)
    assert code == 0, err
    assert "report.figure" in err  # progress, one event per figure
    expected = {"roc.png": "roc", "pr.png": "pr"}
    for stem in ("1-tiny", "2-tiny-pca"):
        for kind in ("hist", "reconstructions", "errors", "latent"):
            expected[f"{stem}-{kind}.png"] = kind
    assert {p.name for p in report.iterdir()} == {*expected, INDEX}
    for name, kind in expected.items():
        with Image.open(report / name) as img:
            img.verify()
        with Image.open(report / name) as img:
            assert img.format == "PNG" and img.size == FIGURE_PIXELS[kind], name
            grey = np.asarray(img.convert("L"), dtype=np.float64)
        assert grey.std() > 5 and (grey < 128).mean() > 0.005, f"{name} looks blank"
    page = (report / INDEX).read_text()
    links = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert links == set(expected)
    assert all("/" not in link and ":" not in link for link in links)
    for row in ("tiny", "tiny-pca"):
        assert f"<td>{row}</td>" in page

    # The same folder again with one bundle: the second bundle's plots of the first report are gone (they stayed,
    # unlinked, beside the new report); a file of the user's own is kept.
    (report / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "evaluate", tiny_pca_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy,
                       "--report", report)
    assert code == 0, err
    again = {"roc.png", "pr.png", INDEX, "notes.txt", *(f"1-tiny-pca-{kind}.png" for kind in
                                                          ("hist", "reconstructions", "errors", "latent"))}
    assert {p.name for p in report.iterdir()} == again


def test_a_report_never_replaces_files_it_did_not_write(capsys, tmp_path: Path, tiny_bundle: Path,
                                                         mnist_digits) -> None:
    """--report into the normal folder replaced the user's own roc.png with a plot and left six plots there for
    the next run to read as images; into a folder of the user's (their index.html) it replaced that too. Both
    are refused, before any scoring, and the files are untouched; so is a folder below a file (it was refused
    after the whole evaluation was printed)."""
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(3):
        Image.fromarray(mnist_digits[i]).save(normal / f"d{i}.png")
    Image.fromarray(mnist_digits[3]).save(normal / "roc.png")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("<html>my notes</html>")
    before = {p: p.read_bytes() for p in [*normal.iterdir(), *mine.iterdir()]}
    np.save(tmp_path / "anomalous.npy", 255 - mnist_digits[:20])
    (tmp_path / "afile").write_text("a file")
    for report, words in ((normal, "inside the input folder"), (normal / "report", "inside the input folder"),
                          (mine, "no earlier aemon report"), (tmp_path / "afile" / "sub", "is a file, not a folder")):
        code, out, err = run(capsys, "evaluate", tiny_bundle, "--normal", normal, "--anomalous",
                             tmp_path / "anomalous.npy", "--report", report)
        assert code == 2 and words in err and not out, (report, err)
        _assert_one_error_line(err)
    assert {p: p.read_bytes() for p in [*normal.iterdir(), *mine.iterdir()]} == before


def test_a_report_removes_only_the_files_of_its_earlier_report(capsys, tmp_path: Path, tiny_bundle: Path,
                                                              data_files) -> None:
    """The earlier report's files were found by their name's shape, so a user's 9-vacation-hist.png in the
    folder was deleted by the next report, and so was an input given from the folder. Only the files the
    earlier index.html lists go; an input inside the report folder is refused before anything is scored."""
    normal_npy, anomalous_npy = data_files
    report = tmp_path / "report"
    argv = ["evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy, "--report", report]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    (report / "9-vacation-hist.png").write_bytes(b"mine")
    (report / "7-x-latent.png").write_bytes(b"mine too")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert (report / "9-vacation-hist.png").read_bytes() == b"mine"
    assert (report / "7-x-latent.png").read_bytes() == b"mine too"
    (report / "roc.png").unlink()
    np.save(report / "roc.npy", np.load(anomalous_npy))
    code, out, err = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", report / "roc.npy",
                         "--report", report)
    assert code == 2 and not out and "inside the report folder" in err, err
    _assert_one_error_line(err)
    assert (report / "roc.npy").exists()
    (report / "roc.npy").unlink()
    (report / "roc.png").mkdir()  # a folder at a figure's name: the error named a temp file
    code, _, err = run(capsys, *argv)
    assert code == 2 and "roc.png there is not a file" in err and ".t-" not in err, err
    assert not [p.name for p in report.iterdir() if p.name.startswith(".")]
    # A report killed while drawing (SIGKILL, the OOM killer) leaves its temp files: a new folder holding only
    # those was refused for good ("holds files and no earlier aemon report"); they are its own, and go.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".t-0123456789ab.png").write_bytes(b"half a figure")
    os.utime(fresh / ".t-0123456789ab.png", (time.time() - 3600, time.time() - 3600))
    code, _, err = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy,
                       "--report", fresh)
    assert code == 0, err
    assert not (fresh / ".t-0123456789ab.png").exists()


def test_a_report_that_fails_half_way_keeps_the_earlier_one(capsys, tmp_path: Path, tiny_bundle: Path,
                                                            data_files) -> None:
    """The earlier report's files were removed first and the new index written last: a full disk (or ^C) in
    between left loose plots and no index, the earlier report was lost, and the folder was refused for good
    ("holds files and no earlier aemon report"). Now the earlier report stays whole until the new one is
    drawn, nothing half-made is left, and the next run writes into the folder."""
    import subprocess

    from daemon_process import full_tmpfs, full_tmpfs_fill

    normal_npy, anomalous_npy = data_files
    mount = tmp_path / "small"
    if not full_tmpfs(mount):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        (mount / "filler").unlink()
        report = mount / "report"
        argv = ["evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy, "--report", report]
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        before = {p.name: p.read_bytes() for p in report.iterdir()}
        full_tmpfs_fill(mount)
        code, _, err = run(capsys, *argv)
        assert code == 1 and "No space left on device" in err, err
        assert {p.name: p.read_bytes() for p in report.iterdir()} == before
        (mount / "filler").unlink()
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        assert {p.name for p in report.iterdir()} == set(before)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_numbers_from_a_handful_of_images_are_warned(capsys, tmp_path: Path, tiny_bundle: Path, data_files) -> None:
    """One normal and one anomalous image gave AUROC 1.0 and nothing else: numbers from so few images are
    said to be rough, in the table, the JSON and the log; hundreds of images get no such line."""
    normal_npy, anomalous_npy = data_files
    np.save(tmp_path / "one-n.npy", np.load(normal_npy)[:1])
    np.save(tmp_path / "one-a.npy", np.load(anomalous_npy)[:1])
    code, out, err = run(capsys, "evaluate", tiny_bundle, "--normal", tmp_path / "one-n.npy", "--anomalous",
                         tmp_path / "one-a.npy", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert any("1 normal and 1 anomalous" in w for w in row["warnings"]), row
    assert "evaluate.few_images" in err and "evaluate.overlap" not in err, err
    code, out, _ = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy, "--json")
    (row,) = json.loads(out)
    assert not any("rough" in w for w in row["warnings"]), row


def test_overlap_with_training_data_is_warned(capsys, tiny_bundle: Path, data_files) -> None:
    """Normal data from the bundle's own training source is flagged in the JSON and the table."""
    _, anomalous_npy = data_files
    code, out, _ = run(capsys, "evaluate", tiny_bundle, "--normal", "sample:mnist?digits=0,1&limit=200",
                       "--anomalous", anomalous_npy, "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert len(row["warnings"]) == 1 and "training and calibration" in row["warnings"][0]
    code, out, err = run(capsys, "evaluate", tiny_bundle, "--normal", "sample:mnist?limit=200",
                         "--anomalous", anomalous_npy)
    assert code == 0 and "* normal data sample:mnist?limit=200 overlaps" in out
    assert "evaluate.overlap" in err


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("sample:mnist?digits=3", "sample:mnist?limit=1500", True),
        ("sample:mnist?digits=3", "sample:mnist?digits=4,5", False),
        ("keras:mnist?split=test", "keras:mnist", False),
        ("keras:mnist?split=test", "keras:mnist?split=all", True),
        ("keras:fashion_mnist", "keras:mnist", False),
        ("data/m.npz?key=x_test", "data/../data/m.npz?key=x_train", False),
        ("data/m.npz?key=x_train&limit=10", "data/m.npz?key=x_train", True),
        ("data/m.npz", "data/m.npz?key=x_train", True),
        ("data/m.npz", "data/other.npz", False),
        ("images/cats", "images", True),
        ("sample:mnist", "data/m.npz", False),
        ("sample:elpv?type=mono&defect=0&split=test", "sample:elpv?type=mono&defect=0&split=train", False),
        ("sample:elpv?type=mono&defect=0", "sample:elpv?type=mono&split=train", True),
        ("sample:elpv?type=poly", "sample:elpv?type=mono", False),
        ("sample:mnist?digits=01", "sample:mnist?digits=1", True),  # the same digit, written otherwise
        ("sample:mnist?digits=01", "sample:mnist?digits=2", False),
        # sample:mnist is drawn from MNIST's training split, on which the shipped bundles were trained.
        ("sample:mnist", "keras:mnist", True),
        ("sample:mnist", "keras:mnist?split=test", False),
        ("sample:mnist", "mnist.npz?key=x_train", True),
        ("sample:mnist?digits=3", "mnist.npz?key=x_test", False),
    ],
)
def test_overlap_rules(a: str, b: str, expected: bool) -> None:
    """Sources overlap when they name the same data, unless a split, array key or disjoint digits separate them."""
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected


def test_quality_refuses_empty_sets() -> None:
    """An empty normal or anomalous score set is a usage error, not a scikit-learn traceback."""
    with pytest.raises(UsageError, match="at least one normal and one anomalous"):
        quality("b", np.zeros(0), np.ones(3), 0.5)
    with pytest.raises(UsageError, match="NaN"):
        quality("b", np.array([np.nan]), np.ones(3), 0.5)


def test_bad_inputs_give_one_error_line(capsys, tmp_path: Path, tiny_bundle: Path, data_files,
                                        mnist_digits: np.ndarray) -> None:
    """Empty normal data, wrongly shaped arrays, unknown bundles and mixed input shapes exit non-zero with one line."""
    normal_npy, anomalous_npy = data_files
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 28, 28), np.uint8))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 10, 10), np.uint8))
    from aemon.images import Preprocessing
    from aemon.sources import load_source
    from aemon.train import TrainConfig, train_bundle

    other, prep = tmp_path / "other-shape", Preprocessing(size=(16, 16))  # a real 16x16 bundle
    np.save(tmp_path / "small.npy", np.random.default_rng(0).integers(0, 256, (300, 16, 16), dtype=np.uint8))
    train_bundle(load_source(str(tmp_path / "small.npy"), prep), TrainConfig(arch="pca", latent_dim=8,
                 target_fpr=0.1, score_fn="mse"), other, verbose=False, prep=prep)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ([tiny_bundle, "--normal", empty, "--anomalous", anomalous_npy], "empty"),
        ([tiny_bundle, "--normal", normal_npy, "--anomalous", wrong], "shape"),
        ([tmp_path / "missing", "--normal", normal_npy, "--anomalous", anomalous_npy], "no model bundle"),
        ([tiny_bundle, other, "--normal", normal_npy, "--anomalous", anomalous_npy], "different input shapes"),
        ([tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy, "--report", a_file], "not a folder"),
    ]
    for argv, words in cases:
        code, _, err = run(capsys, "evaluate", *argv)
        assert code != 0, argv
        _assert_one_error_line(err)
        assert words in err.lower(), err


def test_a_report_that_cannot_be_written_keeps_the_numbers(capsys, tmp_path: Path, tiny_bundle: Path,
                                                           data_files) -> None:
    """--report onto a full filesystem: the table is printed before the report fails, and the error names the
    report folder (the numbers were lost and the error said only 'No space left on device')."""
    import subprocess

    from daemon_process import full_tmpfs

    mount = tmp_path / "small"
    if not full_tmpfs(mount):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        normal_npy, anomalous_npy = data_files
        code, out, err = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy,
                             "--report", mount / "report")
        assert code == 1 and "AUROC" in out, (out, err)
        assert "No space left on device" in err and str(mount / "report") in err, err
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_training_folder_named_relatively_is_recognised_from_anywhere(capsys, tmp_path: Path,
                                                                       mnist_digits: np.ndarray,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle trained on 'digits' from one folder, evaluated on the same images named from another: the
    overlap warning was missed (the bundle stored the relative path); provenance now stores it absolute."""
    work = tmp_path / "work"
    (work / "digits").mkdir(parents=True)
    for i, img in enumerate(mnist_digits[:300]):
        Image.fromarray(img).save(work / "digits" / f"{i}.png")
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).integers(0, 256, (50, 28, 28)).astype(np.uint8))
    monkeypatch.chdir(work)
    code, _, err = run(capsys, "train", "--data", "digits", "--arch", "pca", "--latent-dim", "8",
                       "--target-fpr", "0.1", "--out", "bundle")
    assert code == 0, err
    assert load_bundle(work / "bundle").meta.training["source"] == str(work / "digits")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "evaluate", "work/bundle", "--normal", str(work / "digits"), "--anomalous",
                       "noise.npy", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["warnings"] and "training and calibration" in row["warnings"][0], row


def test_images_in_both_sets_are_named(capsys, tiny_bundle: Path, data_files, tmp_path: Path) -> None:
    """The same images given as normal and anomalous (one source twice, or a copy of some of them) make
    the numbers meaningless: each bundle's row says how many anomalous images are normal ones too."""
    normal_npy, anomalous_npy = data_files
    code, out, _ = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", normal_npy, "--json")
    assert code == 0
    [row] = json.loads(out)
    assert any("300 of the 300 anomalous images are also normal ones" in w for w in row["warnings"]), row

    mixed = tmp_path / "mixed.npy"  # 20 normal digits among the anomalies
    np.save(mixed, np.concatenate([np.load(anomalous_npy), np.load(normal_npy)[:20]]))
    code, out, _ = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", mixed)
    assert code == 0
    assert "* 20 of the 250 anomalous images are also normal ones" in out, out

    code, out, _ = run(capsys, "evaluate", tiny_bundle, "--normal", normal_npy, "--anomalous", anomalous_npy,
                       "--json")
    assert json.loads(out)[0]["warnings"] == []
