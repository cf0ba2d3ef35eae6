"""Detection quality of bundles on labelled normal and anomalous data (metrics from scikit-learn)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aemon.calibration import is_anomalous
from aemon.errors import UsageError
from aemon.logs import get_logger
from aemon.ranking import average_precision, roc_auc
from aemon.settings import Settings
from aemon.sources import is_named, parse_source

__all__ = ["Quality", "Evaluation", "quality", "overlaps", "overlap_warnings", "shared_images_warning",
           "evaluate_bundles",
           "evaluate_command"]


@dataclass
class Quality:
    """Detection quality of one bundle."""

    bundle: str
    auroc: float
    auprc: float
    threshold: float
    fpr: float
    tpr: float
    n_normal: int
    n_anomalous: int
    #: Why the numbers may mislead (normal data the bundle was trained or calibrated on; images in both sets).
    warnings: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """One bundle's scores on both sets and the quality they give."""

    bundle: Any
    quality: Quality
    normal_scores: np.ndarray
    anomalous_scores: np.ndarray


def quality(bundle_name: str, normal_scores: np.ndarray, anomalous_scores: np.ndarray, threshold: float) -> Quality:
    """AUROC and AUPRC (anomalous is the positive class) and the rates at ``threshold``.

    Raises:
        UsageError: either set is empty, or a score is NaN or infinite.
    """
    if len(normal_scores) == 0 or len(anomalous_scores) == 0:
        raise UsageError("evaluation needs at least one normal and one anomalous image")
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomalous_scores))]
    scores = np.r_[normal_scores, anomalous_scores]
    if not np.isfinite(scores).all():
        raise UsageError(f"{bundle_name} gives NaN or infinite scores; the model output is broken")
    return Quality(
        bundle=bundle_name,
        auroc=roc_auc(labels, scores),
        auprc=average_precision(labels, scores),
        threshold=float(threshold),
        fpr=float(np.mean(is_anomalous(normal_scores, threshold))),
        tpr=float(np.mean(is_anomalous(anomalous_scores, threshold))),
        n_normal=len(normal_scores),
        n_anomalous=len(anomalous_scores),
    )


def _parse(src: str) -> tuple[str, dict[str, str]]:
    """A source's identity: named dataset or real path, and its query options. ``sample:mnist`` (digits of
    MNIST's training split) and a file ``mnist.npz`` read at ``x_train`` (Keras' own cache) are named
    ``keras:mnist`` with ``split=train``: the shipped bundles were trained on that split."""
    base, options = parse_source(src)
    if base == "sample:mnist" or (os.path.basename(base) == "mnist.npz" and options.get("key") == "x_train"):
        return "keras:mnist", {**{k: v for k, v in options.items() if k == "digits"}, "split": "train"}
    return (base if is_named(base) else os.path.realpath(base)), options


def _digits(options: dict[str, str]) -> set[int | str] | None:
    if "digits" not in options:
        return None
    return {int(d) if d.strip().isdigit() else d.strip() for d in options["digits"].split(",") if d.strip()}


def overlaps(a: str, b: str) -> bool:
    """Whether sources ``a`` and ``b`` may hold the same images, judged from their text.

    Same named dataset (``keras:`` with the same split or ``all``; ``sample:elpv`` unless one is
    ``split=train`` and the other ``split=test``, or of different types), the same file (``.npz``
    with the same array key or no key) or folders one inside the other overlap, unless both keep
    disjoint ``digits``.
    """
    (base_a, opt_a), (base_b, opt_b) = _parse(a), _parse(b)
    if is_named(base_a) or is_named(base_b):
        if base_a != base_b:
            return False
        if base_a.startswith("keras:"):
            split_a, split_b = opt_a.get("split", "train"), opt_b.get("split", "train")
            if split_a != split_b and "all" not in (split_a, split_b):
                return False
        if base_a == "sample:elpv":  # its train and test splits never share an image, nor do types
            if {opt_a.get("split"), opt_b.get("split")} == {"train", "test"}:
                return False
            if opt_a.get("type") and opt_b.get("type") and opt_a["type"] != opt_b["type"]:
                return False
    else:
        same = base_a == base_b
        nested = base_a.startswith(base_b + os.sep) or base_b.startswith(base_a + os.sep)
        if not (same or nested):
            return False
        key_a, key_b = opt_a.get("key"), opt_b.get("key")
        if same and key_a and key_b and key_a != key_b:
            return False
    digits_a, digits_b = _digits(opt_a), _digits(opt_b)
    return not (digits_a is not None and digits_b is not None and not digits_a & digits_b)


def overlap_warnings(normal_source: str, meta) -> list[str]:
    """Warnings for a bundle whose training or calibration data may include ``normal_source``."""
    found = []
    training = (meta.training or {}).get("source")
    calibration = meta.calibration.source
    for what, src in (("training", training), ("calibration", calibration)):
        if src and overlaps(normal_source, src):
            found.append(what)
    if not found:
        return []
    sources = {training, calibration} if len(found) == 2 else {training if found[0] == "training" else calibration}
    return [f"normal data {normal_source} overlaps the {' and '.join(found)} data of {meta.name} "
            f"({', '.join(sorted(s for s in sources if s))}): its FPR and AUROC are optimistic"]


def shared_images_warning(normal, anomalous) -> str | None:
    """A warning when some anomalous images are also among the normal ones (the same pixels after
    preprocessing: one source given twice, or copies), which the numbers would count both ways."""
    def digest(img: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest()

    seen = {digest(img) for img in normal.x}
    shared = sum(digest(img) in seen for img in anomalous.x)
    if not shared:
        return None
    return (f"{shared} of the {len(anomalous)} anomalous images are also normal ones ({anomalous.source} and "
            f"{normal.source}): they count as both, so AUROC, FPR and TPR mean little")


#: Fewer normal or anomalous images than this: the numbers are said to be rough (one image moves FPR or TPR
#: by more than 3 points).
FEW_IMAGES = 30


def few_images_warning(normal, anomalous) -> str | None:
    """A warning when either set is too small for the numbers to mean much."""
    if min(len(normal), len(anomalous)) >= FEW_IMAGES:
        return None
    return (f"only {len(normal)} normal and {len(anomalous)} anomalous images: AUROC, FPR and TPR from so few are "
            f"rough (each image moves FPR by 1/{len(normal)} and TPR by 1/{len(anomalous)}); evaluate on "
            f"{FEW_IMAGES} or more of each")


def evaluate_bundles(bundles: list, normal, anomalous) -> list[Evaluation]:
    """Score both data sets with every bundle; one :class:`Evaluation` per bundle, in order.

    Args:
        bundles: Loaded bundles (:class:`aemon.bundle.Bundle`).
        normal: The normal :class:`aemon.sources.Dataset`.
        anomalous: The anomalous :class:`aemon.sources.Dataset`.
    """
    log = get_logger()
    results = []
    shared = shared_images_warning(normal, anomalous)
    few = few_images_warning(normal, anomalous)
    if few:
        log.warning("evaluate.few_images", normal=len(normal), anomalous=len(anomalous), message=few)
    for i, bundle in enumerate(bundles, 1):
        start = time.perf_counter()
        s_normal = bundle.score(normal.x)
        s_anomalous = bundle.score(anomalous.x)
        q = quality(bundle.name, s_normal, s_anomalous, bundle.threshold)
        q.warnings = overlap_warnings(normal.source, bundle.meta) + ([shared] if shared else [])
        for warning in q.warnings:
            log.warning("evaluate.overlap", bundle=bundle.name, message=warning)
        q.warnings += [few] if few else []
        log.info("evaluate.scored", bundle=bundle.name, step=i, of=len(bundles), images=len(normal) + len(anomalous),
                 seconds=round(time.perf_counter() - start, 2), auroc=round(q.auroc, 4))
        results.append(Evaluation(bundle, q, s_normal, s_anomalous))
    return results


def _table(rows: list[Quality]) -> str:
    names = ("AUROC", "AUPRC", "FPR", "TPR")
    head = (f"{'bundle':<24} " + " ".join(f"{n:>7}" for n in names)
            + f" {'threshold':>11} {'normal':>7} {'anomalous':>9}")
    lines = [head, "-" * len(head)]
    for q in rows:
        mark = " *" if q.warnings else ""
        lines.append(f"{q.bundle:<24} {q.auroc:7.4f} {q.auprc:7.4f} {q.fpr:7.4f} {q.tpr:7.4f} "
                     f"{q.threshold:11.5g} {q.n_normal:7d} {q.n_anomalous:9d}{mark}")
    notes = [f"* {w}" for q in rows for w in q.warnings]
    return "\n".join(lines + notes)


def evaluate_command(args: argparse.Namespace, settings: Settings) -> int:
    """``aemon evaluate``: score both sources with each bundle, print the table, write the report."""
    from aemon.bundle import find_bundle, load_bundle
    from aemon.sources import load_source

    log = get_logger()
    report_dir: Path | None = args.report
    if report_dir is not None:
        from aemon.report import check_report_folder
        from aemon.sources import check_output_folder

        check_output_folder(report_dir, [args.normal, args.anomalous], "--report",
                            bundles=[found for p in args.bundles if (found := find_bundle(p)) is not None])
        check_report_folder(report_dir, [args.normal, args.anomalous])
    bundles = [load_bundle(find_bundle(p) or p) for p in args.bundles]
    shapes = {tuple(b.meta.input_shape) for b in bundles}
    if len(shapes) > 1:
        raise UsageError(f"bundles take different input shapes {sorted(shapes)}; compare bundles of one shape")
    prep = bundles[0].preprocessing
    normal = load_source(args.normal, prep)
    anomalous = load_source(args.anomalous, prep)
    log.info("evaluate.loaded", bundles=len(bundles), normal=len(normal), anomalous=len(anomalous))
    results = evaluate_bundles(bundles, normal, anomalous)
    rows = [r.quality for r in results]
    # The numbers first: a report that cannot be written (a full disk) must not take them along.
    if args.json:
        print(json.dumps([asdict(q) for q in rows], indent=2), flush=True)
    else:
        print(_table(rows), flush=True)
    if report_dir is not None:
        from aemon.fsio import naming
        from aemon.report import write_report

        with naming(report_dir):
            index = write_report(report_dir, results, normal, anomalous)
        log.info("evaluate.report", path=str(index))
    return 0
