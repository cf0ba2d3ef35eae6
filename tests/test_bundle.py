"""Model bundles: round trip, verification and atomic writes (aemon.bundle)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from aemon.bundle import META_FILE, MODEL_FILE, load_bundle, read_meta, save_bundle
from aemon.errors import BundleError


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / bundle.name
    shutil.copytree(bundle, target)
    return target


def _meta_without_fills(bundle: Path) -> dict:
    meta = json.loads((bundle / META_FILE).read_text())
    for key in ("model_sha256", "format_version", "aemon_version"):
        meta.pop(key)
    return meta


def test_round_trip_scores_match_model(tiny_bundle: Path, mnist_digits: np.ndarray) -> None:
    """Scores from a loaded bundle equal the mean squared error of the model's own output."""
    from aemon.images import array_to_input

    bundle = load_bundle(tiny_bundle)
    x = array_to_input(mnist_digits[:64])
    recon = np.asarray(bundle.model.predict(x, verbose=0))
    expected = np.mean(np.square(x - recon).reshape(64, -1), axis=1)
    assert np.allclose(bundle.score(x), expected, rtol=1e-5, atol=1e-7)
    assert bundle.version.startswith(bundle.meta.model_sha256[:12])
    assert bundle.preprocessing.size == (28, 28)


def test_save_then_load_gives_same_outputs(tiny_bundle: Path, tmp_path: Path, mnist_digits: np.ndarray) -> None:
    """A bundle saved again from a loaded model reconstructs exactly as the original."""
    from aemon.images import array_to_input

    original = load_bundle(tiny_bundle)
    out = save_bundle(original.model, _meta_without_fills(tiny_bundle), tmp_path / "again")
    again = load_bundle(out)
    x = array_to_input(mnist_digits[:32])
    assert np.allclose(again.score(x), original.score(x), rtol=1e-6)
    assert again.meta.threshold == original.meta.threshold
    assert again.p_values(np.array([0.0]))[0] == 1.0


def test_tampered_model_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """A model file whose sha256 differs from bundle.json is refused with BundleError."""
    bundle = _copy(tiny_bundle, tmp_path)
    with (bundle / MODEL_FILE).open("ab") as fp:
        fp.write(b"\0")
    with pytest.raises(BundleError, match=r"does not match bundle\.json"):
        load_bundle(bundle)


def test_unknown_format_version_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """A bundle.json with an unknown format_version is refused with BundleError."""
    bundle = _copy(tiny_bundle, tmp_path)
    meta = json.loads((bundle / META_FILE).read_text())
    meta["format_version"] = 99
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format_version 99"):
        read_meta(bundle)


@pytest.mark.parametrize("damage", ["no_meta", "bad_json", "no_model", "missing_field"])
def test_damaged_bundles_refused(tiny_bundle: Path, tmp_path: Path, damage: str) -> None:
    """Missing files, bad JSON and missing fields are refused with BundleError."""
    bundle = _copy(tiny_bundle, tmp_path)
    if damage == "no_meta":
        (bundle / META_FILE).unlink()
    elif damage == "bad_json":
        (bundle / META_FILE).write_text("{not json")
    elif damage == "no_model":
        (bundle / MODEL_FILE).unlink()
    else:
        meta = json.loads((bundle / META_FILE).read_text())
        del meta["threshold"]
        (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        load_bundle(bundle)


def test_missing_bundle_directory(tmp_path: Path) -> None:
    """A path with no bundle is refused with BundleError."""
    with pytest.raises(BundleError, match="no model bundle"):
        read_meta(tmp_path / "nothing")


def test_existing_out_not_overwritten(tiny_bundle: Path) -> None:
    """save_bundle refuses an existing destination unless told to overwrite."""
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(object(), {}, tiny_bundle)


class _FailingModel:
    """A model whose save writes half a file, then crashes."""

    def save(self, path: Path) -> None:
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_crash_during_model_save_leaves_nothing(tmp_path: Path, tiny_bundle: Path) -> None:
    """A crash while saving the model leaves no bundle at the target and no temporary directory."""
    out = tmp_path / "bundle"
    with pytest.raises(OSError, match="disk full"):
        save_bundle(_FailingModel(), _meta_without_fills(tiny_bundle), out)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_crash_at_rename_leaves_nothing(tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash at the final rename leaves no readable bundle at the target and no temporary directory."""
    model = load_bundle(tiny_bundle).model
    out = tmp_path / "bundle"

    def crash(*_args, **_kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="power cut"):
        save_bundle(model, _meta_without_fills(tiny_bundle), out)
    monkeypatch.undo()
    assert not out.exists()
    with pytest.raises(BundleError):
        read_meta(out)
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_whole_bundle(tmp_path: Path, tiny_bundle: Path) -> None:
    """Overwriting a bundle replaces it whole and leaves no old or temporary directories."""
    bundle = load_bundle(tiny_bundle)
    out = _copy(tiny_bundle, tmp_path)
    meta = _meta_without_fills(tiny_bundle)
    meta["name"] = "replaced"
    save_bundle(bundle.model, meta, out, overwrite=True)
    assert read_meta(out).name == "replaced"
    assert load_bundle(out).meta.name == "replaced"
    assert _leftovers(tmp_path) == []


def test_invalid_meta_is_refused_before_rename(tmp_path: Path, tiny_bundle: Path) -> None:
    """Metadata missing required fields is refused and nothing is written."""
    model = load_bundle(tiny_bundle).model
    out = tmp_path / "bundle"
    with pytest.raises(ValueError):
        save_bundle(model, {"name": "x"}, out)
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["preprocessing"].update(size=[32, 32]), "does not match the model"),
    (lambda m: m["preprocessing"].update(color_mode="rgb"), "does not match the model"),
    (lambda m: m["preprocessing"].update(color_mode="cmyk"), "color_mode"),
    (lambda m: m["preprocessing"].pop("size"), "preprocessing"),
    (lambda m: m["preprocessing"].update(size=[-1, 28]), "preprocessing"),
    (lambda m: m["preprocessing"].update(size="28x28"), "preprocessing"),
    (lambda m: m.update(input_shape=[32, 32, 1]), "does not match the model"),
    (lambda m: m.update(threshold=float("nan")), "threshold"),
    (lambda m: m.update(threshold=float("inf")), "threshold"),
    (lambda m: m.update(target_fpr=2), "target_fpr"),
    (lambda m: m["calibration"].update(scores=[], n=0), "calibration"),
    (lambda m: m["calibration"].update(scores=[0.1, float("nan")]), "calibration"),
    (lambda m: m.update(task="segment"), "task"),
    # Edits that loaded and gave other verdicts without a word (an attack review): a missing score function
    # was read as mse against another score's threshold; thresholds not from the calibration; coerced types.
    (lambda m: m.pop("score_fn"), "score_fn"),
    (lambda m: m.update(threshold=-5.0), "threshold"),
    (lambda m: m.update(threshold=m["threshold"] * 1.5), "not the one its"),
    (lambda m: m.update(threshold=True), "threshold"),
    (lambda m: m.update(threshold=str(m["threshold"])), "threshold"),
    (lambda m: m["calibration"].update(n=5), "5 but"),
    (lambda m: m["calibration"].update(scores=[str(v) for v in m["calibration"]["scores"]]), "calibration"),
    (lambda m: m.update(revision=-3), "revision"),
    (lambda m: m.update(format_version="1"), "format_version"),
])
def test_a_bundle_json_that_disagrees_with_its_model_is_refused(tiny_bundle: Path, tmp_path: Path, edit,
                                                                message: str) -> None:
    """Edited or damaged fields are refused when the bundle loads, never on the first item (a daemon
    would die there, and again after every restart)."""
    bundle = _copy(tiny_bundle, tmp_path)
    meta = json.loads((bundle / META_FILE).read_text())
    edit(meta)
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_a_model_file_that_is_no_keras_file_is_named_as_such(tmp_path: Path) -> None:
    """Random bytes in model.keras with bundle.json's sha256 updated to match: Keras said "File not found" of
    a file that is there. The error says it is not a Keras model file."""
    from aemon.bundle import default_bundle_path, read_meta, sha256_of, write_meta

    bundle = tmp_path / "b"
    shutil.copytree(default_bundle_path("detect"), bundle)
    (bundle / "model.keras").write_bytes(np.random.default_rng(0).bytes(5000))
    write_meta(bundle, read_meta(bundle).model_copy(update={"model_sha256": sha256_of(bundle / "model.keras")}))
    with pytest.raises(BundleError, match="is not a Keras model file"):
        load_bundle(bundle)


_STAGING_WRITER = """
import sys, time
from pathlib import Path
from aemon.fsio import staged_dir
with staged_dir(Path(sys.argv[1]), exists_error=FileExistsError) as tmp:
    (tmp / "model.keras").write_bytes(b"half a model")
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_staging_folder_is_removed_by_the_next_bundle_beside_it(tmp_path: Path) -> None:
    """A writer SIGKILLed while staging a bundle leaves a hidden folder beside --out: the next bundle written
    into that folder removes it once it is a minute old, and never the staging folder of a writer still alive."""
    import signal
    import subprocess
    import sys

    writers = [subprocess.Popen([sys.executable, "-c", _STAGING_WRITER, str(tmp_path / name)],
                                stdout=subprocess.PIPE, text=True) for name in ("killed", "alive")]
    try:
        staging = [Path(w.stdout.readline().strip()) for w in writers]
        writers[0].send_signal(signal.SIGKILL)
        writers[0].wait(30)
        old = os.stat(staging[0]).st_mtime - 3600  # an hour ago
        for folder in staging:
            os.utime(folder, (old, old))
        done = subprocess.run([sys.executable, "-m", "aemon", "train", "--data", "sample:mnist?limit=300", "--arch",
                               "pca", "--latent-dim", "8", "--score", "mse", "--out", str(tmp_path / "next")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert not staging[0].exists() and (staging[1] / "model.keras").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["next", staging[1].name])
    finally:
        for w in writers:
            w.kill()
            w.wait(30)
            w.stdout.close()


@pytest.mark.parametrize(("field", "value"), [
    ("preprocessing.choices", 5), ("preprocessing.choices", [1]), ("training.source", 5),
    ("training.n_fit", "x"), ("latent_dim", -5), ("auto", [1])])
def test_hand_edited_provenance_is_refused_in_one_line_by_every_verb(tiny_bundle: Path, tmp_path: Path,
                                                                     mnist_digits: np.ndarray, field: str,
                                                                     value: object, capsys) -> None:
    """`info` with preprocessing.choices not an object, `evaluate` and `calibrate` with training.source not a
    string ended in tracebacks; other wrong types (a count "x", latent -5) loaded and were shown as they were.
    Every verb now refuses such a bundle with one line (the command line's own ``main``, in this process)."""
    bundle = _copy(tiny_bundle, tmp_path)
    meta = json.loads((bundle / META_FILE).read_text())
    *parents, last = field.split(".")
    target = meta
    for part in parents:
        target = target[part]
    target[last] = value
    (bundle / META_FILE).write_text(json.dumps(meta))
    data = tmp_path / "digits.npy"
    np.save(data, mnist_digits[:120])
    for verb in (["info", str(bundle)], ["evaluate", str(bundle), "--normal", str(data), "--anomalous", str(data)],
                 ["calibrate", str(bundle), "--data", str(data), "--out", str(tmp_path / "cal")]):
        code, _, err = _main(capsys, verb)
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert code != 0 and len(errors) == 1 and last in errors[0], (verb, err[-2000:])
        assert "Traceback" not in err, (verb, err[-2000:])


@pytest.mark.parametrize(("field", "value"), [("arch", "deep"), ("latent_dim", 16), ("task", "denoise")])
def test_hand_edits_that_misdescribe_the_model_are_refused_on_loading(tiny_bundle: Path, tmp_path: Path,
                                                                      mnist_digits: np.ndarray, field: str,
                                                                      value: object, capsys) -> None:
    """`arch`, `latent_dim` and `task` edited in bundle.json loaded without complaint: `info` and the
    aemon_model_info metric named another network, and a detect model edited to `denoise` was served by
    `aemon denoise` and the daemon's denoise mode."""
    bundle = _copy(tiny_bundle, tmp_path)
    meta = json.loads((bundle / META_FILE).read_text())
    assert meta[field] != value
    meta[field] = value
    (bundle / META_FILE).write_text(json.dumps(meta))
    image = tmp_path / "in" / "a.npy"
    image.parent.mkdir()
    np.save(image, mnist_digits[:2])
    verbs = [["score", str(bundle), str(image)]]
    if field == "task":
        verbs.append(["denoise", str(bundle), str(image), "--out", str(tmp_path / "out")])
    for verb in verbs:
        code, out, err = _main(capsys, verb)
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert code != 0 and len(errors) == 1 and f"says {field}" in errors[0], (verb, err[-2000:])
        assert "edited" in errors[0] and not out, (verb, out[-500:])
    assert not (tmp_path / "out").exists()


def _main(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    """``aemon ARGV`` through the command line's ``main`` in this process: (exit status, stdout, stderr)."""
    from aemon.cli import main

    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err
