"""Recalibration: a new threshold for an existing bundle, from new normal data."""

from __future__ import annotations

import shutil
from pathlib import Path

from aemon.bundle import Bundle, BundleMeta, staged_dir, write_meta
from aemon.errors import UsageError
from aemon.fsio import naming
from aemon.sources import Dataset, provenance
from aemon.train import calibration_payload

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
    threshold, calibration = calibration_payload(bundle.score(data.x), fpr, provenance(data.source))
    # Validate the merged dict: model_copy(update=...) would keep ``calibration`` a plain dict
    # and model_dump would then warn (and serialise it unchecked).
    meta = BundleMeta.model_validate({
        **bundle.meta.model_dump(),
        "threshold": threshold,
        "target_fpr": fpr,
        "calibration": calibration,
        "revision": bundle.meta.revision + 1,
    })
    if out is None:
        write_meta(bundle.path, meta)
        return meta
    with naming(out), staged_dir(Path(out)) as tmp:
        shutil.copytree(bundle.path, tmp, dirs_exist_ok=True)
        write_meta(tmp, meta.model_copy(update={"name": Path(out).name}))
    return meta
