"""Detection quality of every architecture on real MNIST and Fashion-MNIST (run on demand, not in tests).

(a) Trained on the MNIST training set (the same split as ``aemon train``: 10 % held out for
    calibration at a 1 % target FPR, 10 % of the rest for early stopping), scored on MNIST test
    (normal) vs Fashion-MNIST test (anomalous): AUROC, AUPRC, and FPR/TPR at the calibrated
    threshold, for each score function. The threshold of every score function is calibrated on
    the same held-out MNIST training images; test data never sets anything.
(b) One-class MNIST: for each digit d, trained on the training images of d, scored on all test
    images (d normal, the rest anomalous): AUROC per digit and the mean.

Every model is trained by ``aemon.train.train_bundle``, saved as a bundle and loaded back, so the
numbers are those of bundles that ``aemon score``, ``aemon evaluate`` and the daemon would use.

Usage: python benchmarks/quality.py [--data ../shared/data] [--archs dense,deep,conv,convsmall,pca]
       [--part a|b|ab] [--epochs-a 30] [--epochs-b 30] [--scores mse,bce,topk] [--bundles DIR...]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from aemon.logs import configure, quiet_tensorflow

quiet_tensorflow()

from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from aemon.bundle import load_bundle  # noqa: E402
from aemon.calibration import conformal_threshold  # noqa: E402
from aemon.scoring import SCORE_FUNCTIONS, reconstruction_error  # noqa: E402
from aemon.sources import load_source  # noqa: E402
from aemon.train import TrainConfig, train_bundle  # noqa: E402


def _train(data, spec: str, epochs: int, out: Path, latent: int, seed: int):
    # "convsmall:16" is convsmall with latent 16; a bare name uses --latent-dim.
    arch, _, size = spec.partition(":")
    cfg = TrainConfig(arch=arch, epochs=epochs, latent_dim=int(size or latent), target_fpr=0.01, seed=seed,
                      name=out.name)
    start = time.perf_counter()
    train_bundle(data, cfg, out, verbose=False)
    return load_bundle(out), cfg, time.perf_counter() - start


def _held_out(data, cfg: TrainConfig) -> np.ndarray:
    """The calibration images train_bundle held out (same seed, same permutation)."""
    order = np.random.default_rng(cfg.seed).permutation(len(data))
    return data.x[order[: math.floor(len(data) * cfg.calibration_split)]]


def _scores(bundle, x: np.ndarray, kinds: list[str]) -> dict[str, np.ndarray]:
    recon = bundle.scorer.reconstruct(x)
    return {k: reconstruction_error(x, recon, k) for k in kinds}


def part_a(args, archs: list[str], tmp: Path) -> list[dict]:
    train = load_source(f"{args.data / 'mnist.npz'}?key=x_train")
    normal = load_source(f"{args.data / 'mnist.npz'}?key=x_test").x
    anomalous = load_source(f"{args.data / 'fashion_mnist.npz'}?key=x_test").x
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    rows = []
    for path in args.bundles:
        # An existing bundle as it ships: its own score function and threshold.
        bundle = load_bundle(path)
        s_n, s_a = bundle.score(normal), bundle.score(anomalous)
        rows.append({
            "arch": f"{bundle.meta.arch} ({path.name}, as shipped)", "score": bundle.meta.score_fn,
            "epochs": bundle.meta.training.get("epochs_run"), "train_s": 0.0,
            "auroc": roc_auc_score(labels, np.r_[s_n, s_a]), "auprc": average_precision_score(labels, np.r_[s_n, s_a]),
            "fpr": float(np.mean(s_n > bundle.threshold)), "tpr": float(np.mean(s_a > bundle.threshold)),
        })
    for arch in archs:
        out = tmp / f"a-{arch.replace(':', '-')}"
        bundle, cfg, seconds = _train(train, arch, args.epochs_a, out, args.latent_dim, args.seed)
        cal = _scores(bundle, _held_out(train, cfg), args.scores)
        # The bundle's own calibration must be reproduced exactly, or the split above is not train_bundle's.
        np.testing.assert_allclose(np.sort(cal[bundle.meta.score_fn]), bundle.meta.calibration.scores, rtol=1e-5)
        s_n, s_a = _scores(bundle, normal, args.scores), _scores(bundle, anomalous, args.scores)
        for kind in args.scores:
            threshold = conformal_threshold(cal[kind], 0.01)
            row = {
                "arch": arch, "score": kind, "epochs": bundle.meta.training["epochs_run"],
                "train_s": round(seconds, 1),
                "auroc": roc_auc_score(labels, np.r_[s_n[kind], s_a[kind]]),
                "auprc": average_precision_score(labels, np.r_[s_n[kind], s_a[kind]]),
                "fpr": float(np.mean(s_n[kind] > threshold)), "tpr": float(np.mean(s_a[kind] > threshold)),
            }
            rows.append(row)
            print(f"(a) {arch:<10} {kind:<4} epochs {row['epochs']:>3} ({row['train_s']:6.1f}s)  AUROC "
                  f"{row['auroc']:.4f}  AUPRC {row['auprc']:.4f}  FPR {row['fpr']:.4f}  TPR {row['tpr']:.4f}",
                  file=sys.stderr, flush=True)
    return rows


def part_b(args, archs: list[str], tmp: Path) -> list[dict]:
    test = load_source(f"{args.data / 'mnist.npz'}?key=x_test")
    rows = []
    for arch in archs:
        for digit in args.digits:
            train = load_source(f"{args.data / 'mnist.npz'}?key=x_train&digits={digit}")
            out = tmp / f"b-{arch.replace(':', '-')}-{digit}"
            bundle, _, seconds = _train(train, arch, args.epochs_b, out, args.latent_dim, args.seed)
            scores = _scores(bundle, test.x, args.scores)
            for kind in args.scores:
                auroc = roc_auc_score(test.labels != digit, scores[kind])
                rows.append({"arch": arch, "score": kind, "digit": digit, "auroc": auroc,
                             "epochs": bundle.meta.training["epochs_run"], "train_s": round(seconds, 1)})
                print(f"(b) {arch:<10} {kind:<4} digit {digit}  AUROC {auroc:.4f}  epochs "
                      f"{bundle.meta.training['epochs_run']} ({seconds:.1f}s)", file=sys.stderr, flush=True)
    return rows


def _print_tables(rows_a: list[dict], rows_b: list[dict], args) -> None:
    if rows_a:
        print("(a) MNIST test (normal) vs Fashion-MNIST test (anomalous); threshold calibrated on held-out MNIST "
              "train at target FPR 0.01\n")
        print("| arch | score | AUROC | AUPRC | FPR at threshold | TPR at threshold | epochs | train s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows_a:
            print(f"| {r['arch']} | {r['score']} | {r['auroc']:.4f} | {r['auprc']:.4f} | {r['fpr']:.4f} | "
                  f"{r['tpr']:.4f} | {r['epochs']} | {r['train_s']:.0f} |")
        print()
    if rows_b:
        print("(b) one-class MNIST: AUROC of digit d (normal) vs the other nine digits, MNIST test\n")
        digits = args.digits
        print("| arch | score | " + " | ".join(str(d) for d in digits) + " | mean |")
        print("| --- | --- | " + " | ".join("---" for _ in digits) + " | --- |")
        keys = sorted({(r["arch"], r["score"]) for r in rows_b},
                      key=lambda k: (args.archs.index(k[0]), args.scores.index(k[1])))
        for arch, kind in keys:
            aurocs = [r["auroc"] for d in digits for r in rows_b
                      if r["arch"] == arch and r["score"] == kind and r["digit"] == d]
            print(f"| {arch} | {kind} | " + " | ".join(f"{a:.3f}" for a in aurocs) + f" | {np.mean(aurocs):.4f} |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--data", type=Path, default=here.parent.parent / "shared" / "data")
    parser.add_argument("--archs", default="dense,deep,conv,convsmall,pca",
                        help="comma-separated architectures; NAME:N sets the latent size of one (convsmall:16)")
    parser.add_argument("--part", default="ab", choices=["a", "b", "ab"])
    parser.add_argument("--epochs-a", type=int, default=30, help="most epochs for (a); early stopping, patience 3")
    parser.add_argument("--epochs-b", type=int, default=30, help="most epochs per digit for (b)")
    parser.add_argument("--latent-dim", type=int, default=32, help="latent size of dense/deep/pca (32)")
    parser.add_argument("--scores", default=",".join(SCORE_FUNCTIONS), help="score functions to report")
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="digits for (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundles", type=Path, nargs="*", default=[],
                        help="existing bundles to add to (a) as they are (their own score and threshold)")
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    args = parser.parse_args()
    args.archs = args.archs.split(",")
    args.scores = args.scores.split(",")
    args.digits = [int(d) for d in args.digits.split(",")]
    configure("console", "WARNING", stream=sys.stderr)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows_a = part_a(args, args.archs, Path(tmp)) if "a" in args.part else []
        rows_b = part_b(args, args.archs, Path(tmp)) if "b" in args.part else []
    cmd = " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])
    print(f"`{cmd}` ({time.perf_counter() - start:.0f} s)\n")
    _print_tables(rows_a, rows_b, args)
    if args.json:
        args.json.write_text(json.dumps({"a": rows_a, "b": rows_b}, indent=2))


if __name__ == "__main__":
    main()
