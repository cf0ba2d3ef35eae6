"""Detection quality of bundles on labelled normal and anomalous data (metrics from scikit-learn)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from aemon.errors import UsageError
from aemon.settings import Settings

__all__ = ["Quality", "quality", "evaluate_command"]


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


def quality(bundle_name: str, normal_scores: np.ndarray, anomalous_scores: np.ndarray, threshold: float) -> Quality:
    """AUROC and AUPRC (anomalous is the positive class) and the rates at ``threshold``."""
    if len(normal_scores) == 0 or len(anomalous_scores) == 0:
        raise UsageError("evaluation needs at least one normal and one anomalous image")
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomalous_scores))]
    scores = np.r_[normal_scores, anomalous_scores]
    return Quality(
        bundle=bundle_name,
        auroc=float(roc_auc_score(labels, scores)),
        auprc=float(average_precision_score(labels, scores)),
        threshold=float(threshold),
        fpr=float(np.mean(normal_scores > threshold)),
        tpr=float(np.mean(anomalous_scores > threshold)),
        n_normal=len(normal_scores),
        n_anomalous=len(anomalous_scores),
    )


def _table(rows: list[Quality]) -> str:
    names = ("AUROC", "AUPRC", "FPR", "TPR")
    head = f"{'bundle':<24} " + " ".join(f"{n:>7}" for n in names) + f" {'threshold':>11} {'normal':>7} {'anomal':>7}"
    lines = [head, "-" * len(head)]
    for q in rows:
        lines.append(f"{q.bundle:<24} {q.auroc:7.4f} {q.auprc:7.4f} {q.fpr:7.4f} {q.tpr:7.4f} "
                     f"{q.threshold:11.5g} {q.n_normal:7d} {q.n_anomalous:7d}")
    return "\n".join(lines)


def evaluate_command(args: argparse.Namespace, settings: Settings) -> int:
    """``aemon evaluate``: score both sources with each bundle and print the table."""
    from aemon.bundle import load_bundle
    from aemon.sources import load_source

    if args.report is not None:
        raise UsageError("--report is not available yet; run without it for the table")
    bundles = [load_bundle(Path(p)) for p in args.bundles]
    shapes = {tuple(b.meta.input_shape) for b in bundles}
    if len(shapes) > 1:
        raise UsageError(f"bundles take different input shapes {sorted(shapes)}; compare bundles of one shape")
    prep = bundles[0].preprocessing
    normal = load_source(args.normal, prep)
    anomalous = load_source(args.anomalous, prep)
    rows = [quality(b.name, b.score(normal.x), b.score(anomalous.x), b.threshold) for b in bundles]
    if args.json:
        print(json.dumps([asdict(q) for q in rows], indent=2))
    else:
        print(_table(rows))
    return 0
