"""Recalibration: a new threshold for an existing bundle, from new normal data."""

from __future__ import annotations

import shutil
from pathlib import Path

from aemon.bundle import Bundle, BundleMeta, read_meta, staged_dir, write_meta
from aemon.errors import BundleError, CalibrationError, UsageError
from aemon.fsio import folder_lock, naming
from aemon.logs import get_logger
from aemon.sources import Dataset, provenance
from aemon.train import calibration_payload, distinct

__all__ = ["recalibrate", "refuse_taken_out"]


def refuse_taken_out(out: Path, bundle_path: Path) -> None:
    """Refuse an ``--out`` that exists (staged_dir's own refusal speaks of train's --force, which calibrate
    has not).

    Raises:
        UsageError: ``out`` exists (a link too).
    """
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; choose another --out, or leave --out out to update "
                         f"{bundle_path} in place")


def recalibrate(bundle: Bundle, data: Dataset, target_fpr: float | None = None, out: Path | None = None) -> BundleMeta:
    """Score ``data`` and store the new threshold as the bundle's next revision.

    Args:
        bundle: The loaded bundle.
        data: Normal images, decoded with the bundle's preprocessing.
        target_fpr: New target; ``None`` keeps the bundle's.
        out: Write a new bundle directory here (atomically) instead of updating in place.

    Raises:
        CalibrationError: too few samples for the target FPR (with the number needed).
        UsageError: ``out`` exists (found before anything is scored).
    """
    if out is not None:
        refuse_taken_out(Path(out), bundle.path)
    fpr = bundle.meta.target_fpr if target_fpr is None else target_fpr
    x, repeats = distinct(data.x)  # as in training: copies of one image are one sample, not many
    if repeats:
        get_logger().warning("calibrate.repeats_dropped", dropped=repeats, kept=len(x),
                             hint="an image given many times would count as many normal samples; each is used once")
    try:
        threshold, calibration = calibration_payload(bundle.score(x), fpr, provenance(data.source))
    except CalibrationError as exc:
        if not repeats:
            raise
        raise CalibrationError(f"{exc} (distinct images: {len(data.x)} given, {repeats} exact repeats of others "
                               "used once)") from exc
    if out is None:
        return _update_in_place(bundle, threshold, fpr, calibration)
    meta = _next_revision(bundle.meta, threshold, fpr, calibration)
    with naming(out), staged_dir(Path(out)) as tmp:
        try:
            shutil.copytree(bundle.path, tmp, dirs_exist_ok=True)
        except shutil.Error as exc:  # its message is a list of (source, destination, error) of every file
            src, _, why = exc.args[0][0]
            raise OSError(f"cannot copy {src} into the new bundle {out}: {why}") from None
        write_meta(tmp, meta.model_copy(update={"name": Path(out).name}))
    return meta


def _next_revision(meta: BundleMeta, threshold: float, fpr: float, calibration: dict) -> BundleMeta:
    # Validate the merged dict: model_copy(update=...) would keep ``calibration`` a plain dict
    # and model_dump would then warn (and serialise it unchecked).
    return BundleMeta.model_validate({**meta.model_dump(), "threshold": threshold, "target_fpr": fpr,
                                      "calibration": calibration, "revision": meta.revision + 1})


def _update_in_place(bundle: Bundle, threshold: float, fpr: float, calibration: dict) -> BundleMeta:
    """Write the new calibration into the bundle folder, one writer at a time: the next revision of what the
    folder holds now (another calibration may have written one meanwhile), refused if the folder was
    replaced or its model changed since ``bundle`` was loaded (the scores are of that model)."""
    replaced = BundleError(f"{bundle.path} was replaced while it was being calibrated (the scores are of the "
                           "model it held before); nothing was written: calibrate it again")
    try:
        with folder_lock(bundle.path) as same:
            current = read_meta(bundle.path) if same else None
            if current is None or (current.model_sha256, current.score_state_sha256) != (
                    bundle.meta.model_sha256, bundle.meta.score_state_sha256):
                raise replaced
            meta = _next_revision(current, threshold, fpr, calibration)
            write_meta(bundle.path, meta)
    except FileNotFoundError:
        raise replaced from None
    return meta
