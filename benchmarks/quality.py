"""Detection quality of every architecture on real MNIST and Fashion-MNIST (run on demand, not in tests).

(a) Trained on the MNIST training set (the same split as ``aemon train``: 10 % held out for
    calibration at a 1 % target FPR, 10 % of the rest for early stopping), scored on MNIST test
    (normal) vs Fashion-MNIST test (anomalous): AUROC, AUPRC, and FPR/TPR at the calibrated
    threshold, for each score function. The threshold of every score function is calibrated on
    the same held-out MNIST training images; test data never sets anything.
(b) One-class MNIST: for each digit d, trained on the training images of d, scored on all test
    images (d normal, the rest anomalous): AUROC per digit and the mean.
(c) elpv solar cells (``sample:elpv``, needs the ``elpv-dataset`` package), per module type:
    trained on ``defect=0&split=train`` at the automatic size and colour, scored on
    ``defect=0&split=test`` (normal) vs ``defect=1`` (anomalous, both splits; never used to choose
    anything): AUROC, AUPRC, FPR/TPR at the threshold calibrated on held-out training images.

``auto`` in ``--archs`` is ``aemon train``'s default: architecture and score chosen on synthetic
anomalies made from set-aside training images (``aemon.autoselect``). Local scores (``zmax``,
``zmax+mean``) learn their state from the bundle's fitted training images.

Every model is trained by ``aemon.train.train_bundle``, saved as a bundle and loaded back, so the
numbers are those of bundles that ``aemon score``, ``aemon evaluate`` and the daemon would use.

Usage: python benchmarks/quality.py [--data ../shared/data] [--archs auto,dense,deep,conv,convsmall,pca]
       [--part a|b|c|abc] [--epochs-a 30] [--epochs-b 30] [--scores mse,bce,topk] [--bundles DIR...]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from aemon.logs import configure, quiet_tensorflow

quiet_tensorflow()

from aemon.bundle import load_bundle  # noqa: E402
from aemon.calibration import conformal_threshold  # noqa: E402
from aemon.ranking import average_precision, roc_auc  # noqa: E402
from aemon.scoring import SCORE_FUNCTIONS, fit_state, reconstruction_error  # noqa: E402
from aemon.sources import choose_input, load_source  # noqa: E402
from aemon.train import TrainConfig, train_bundle  # noqa: E402


def _train(data, spec: str, epochs: int, out: Path, latent: int, seed: int, prep=None):
    # "convsmall:16" is convsmall with latent 16; a bare name uses --latent-dim; "auto" is the default.
    arch, _, size = spec.partition(":")
    cfg = TrainConfig(arch=arch, epochs=epochs, latent_dim=int(size or latent), target_fpr=0.01, seed=seed,
                      name=out.name, score_fn="auto" if arch == "auto" else "mse")
    start = time.perf_counter()
    train_bundle(data, cfg, out, verbose=False, **({"prep": prep} if prep else {}))
    bundle = load_bundle(out)
    fit = _fitted(data, bundle)
    return bundle, cfg, time.perf_counter() - start, fit


def _fitted(data, bundle) -> np.ndarray:
    """Up to 5,000 of the images train_bundle fitted (after its calibration hold-out; same seed)."""
    n_cal = _n_held_out(bundle)
    order = np.random.default_rng(bundle.meta.training["seed"]).permutation(len(data))
    return data.x[order[n_cal:]][:5000]


def _held_out(data, bundle) -> np.ndarray:
    """The calibration images train_bundle held out (same seed, same permutation)."""
    order = np.random.default_rng(bundle.meta.training["seed"]).permutation(len(data))
    return data.x[order[: _n_held_out(bundle)]]


def _n_held_out(bundle) -> int:
    """Images train_bundle held out (none when it cross-fitted its calibration)."""
    training = bundle.meta.training
    return training.get("n_held_out", training["n_calibration"])


def _scores(bundle, x: np.ndarray, kinds: list[str], fit: np.ndarray) -> dict[str, np.ndarray]:
    """Every score of ``kinds``; a local one uses the bundle's own state or learns one from ``fit``."""
    recon = bundle.scorer.reconstruct(x)
    out = {}
    for k in kinds:
        if SCORE_FUNCTIONS[k].fit is None:
            out[k] = reconstruction_error(x, recon, k)
        else:
            state = bundle.scorer.state if k == bundle.meta.score_fn else _state(bundle, k, fit)
            out[k] = reconstruction_error(x, recon, k, state)
    return out


_STATES: dict = {}


def _state(bundle, kind: str, fit: np.ndarray) -> dict:
    key = (str(bundle.path), kind)
    if key not in _STATES:
        _STATES[key] = fit_state(kind, fit, bundle.scorer.reconstruct(fit))
    return _STATES[key]


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
            "auroc": roc_auc(labels, np.r_[s_n, s_a]), "auprc": average_precision(labels, np.r_[s_n, s_a]),
            "fpr": float(np.mean(s_n > bundle.threshold)), "tpr": float(np.mean(s_a > bundle.threshold)),
        })
    for arch in archs:
        out = tmp / f"a-{arch.replace(':', '-')}"
        bundle, _, seconds, fit = _train(train, arch, args.epochs_a, out, args.latent_dim, args.seed)
        cal = _scores(bundle, _held_out(train, bundle), args.scores, fit)
        # The bundle's own calibration must be reproduced exactly, or the split above is not train_bundle's.
        # (float32 in the compiled call against numpy: scores near 0 differ by a few 1e-6.)
        np.testing.assert_allclose(np.sort(cal[bundle.meta.score_fn]), bundle.meta.calibration.scores,
                                   rtol=1e-5, atol=1e-4)
        s_n, s_a = _scores(bundle, normal, args.scores, fit), _scores(bundle, anomalous, args.scores, fit)
        for kind in args.scores:
            threshold = conformal_threshold(cal[kind], 0.01)
            row = {
                "arch": _name(arch, bundle), "score": kind, "epochs": bundle.meta.training["epochs_run"],
                "train_s": round(seconds, 1),
                "auroc": roc_auc(labels, np.r_[s_n[kind], s_a[kind]]),
                "auprc": average_precision(labels, np.r_[s_n[kind], s_a[kind]]),
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
            bundle, _, seconds, fit = _train(train, arch, args.epochs_b, out, args.latent_dim, args.seed)
            scores = _scores(bundle, test.x, args.scores, fit)
            for kind in args.scores:
                auroc = roc_auc(test.labels != digit, scores[kind])
                rows.append({"arch": arch, "score": kind, "digit": digit, "auroc": auroc, "picked": _name(arch, bundle),
                             "own": kind == bundle.meta.score_fn, "epochs": bundle.meta.training["epochs_run"],
                             "train_s": round(seconds, 1)})
                print(f"(b) {arch:<10} {kind:<4} digit {digit}  AUROC {auroc:.4f}  epochs "
                      f"{bundle.meta.training['epochs_run']} ({seconds:.1f}s)", file=sys.stderr, flush=True)
    return rows


def _name(spec: str, bundle) -> str:
    """The arch column: ``auto`` says what it picked (``auto → pca 128, zmax``)."""
    if spec != "auto":
        return spec
    meta = bundle.meta
    return f"auto → {meta.arch} {meta.latent_dim or ''}, {meta.score_fn}".replace(" ,", ",")


def part_c(args, archs: list[str], tmp: Path) -> list[dict]:
    rows = []
    prep, _ = choose_input("sample:elpv")
    for kind in args.types:
        train = load_source(f"sample:elpv?type={kind}&defect=0&split=train", prep)
        normal = load_source(f"sample:elpv?type={kind}&defect=0&split=test", prep).x
        anomalous = load_source(f"sample:elpv?type={kind}&defect=1", prep).x
        labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
        for arch in archs:
            out = tmp / f"c-{kind}-{arch.replace(':', '-')}"
            bundle, _, seconds, fit = _train(train, arch, args.epochs_c, out, args.latent_dim, args.seed, prep)
            cal = _scores(bundle, _held_out(train, bundle), args.scores, fit)
            s_n, s_a = _scores(bundle, normal, args.scores, fit), _scores(bundle, anomalous, args.scores, fit)
            for score in args.scores:
                own = score == bundle.meta.score_fn
                threshold = bundle.threshold if own else conformal_threshold(cal[score], 0.01)
                both = np.r_[s_n[score], s_a[score]]
                row = {"type": kind, "arch": _name(arch, bundle), "score": score + (" (own)" if own else ""),
                       "auroc": roc_auc(labels, both), "auprc": average_precision(labels, both),
                       "fpr": float(np.mean(s_n[score] > threshold)), "tpr": float(np.mean(s_a[score] > threshold)),
                       "epochs": bundle.meta.training["epochs_run"], "train_s": round(seconds, 1),
                       "default": arch == "auto" and own}
                rows.append(row)
                print(f"(c) {kind} {row['arch']:<24} {row['score']:<16} AUROC {row['auroc']:.4f}  FPR {row['fpr']:.4f}"
                      f"  TPR {row['tpr']:.4f}  ({seconds:.1f}s)", file=sys.stderr, flush=True)
    return rows


def _print_c(rows: list[dict]) -> None:
    print("(c) elpv: defect-free test cells (normal) vs defective cells (defect=1); threshold calibrated on "
          "held-out training cells at target FPR 0.01\n")
    print("| type | arch | score | AUROC | AUPRC | FPR at threshold | TPR at threshold | epochs | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['type']} | {r['arch']} | {r['score']} | {r['auroc']:.4f} | {r['auprc']:.4f} | {r['fpr']:.4f} | "
              f"{r['tpr']:.4f} | {r['epochs']} | {r['train_s']:.0f} |")
    defaults = [r for r in rows if r["default"]]
    if defaults:
        print(f"\nDefaults (`aemon train --data ... --out B`): mean AUROC over {len(defaults)} types "
              f"{np.mean([r['auroc'] for r in defaults]):.4f}\n")


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
            if arch == "auto":
                picks = sorted({r["picked"] for r in rows_b if r["arch"] == "auto" and r["score"] == kind})
                arch = f"auto (picked: {'; '.join(picks)})"
            print(f"| {arch} | {kind} | " + " | ".join(f"{a:.3f}" for a in aurocs) + f" | {np.mean(aurocs):.4f} |")
        own = {r["digit"]: r for r in rows_b if r["arch"] == "auto" and r["own"]}
        if len(own) == len(digits):  # every digit's picked score was among those reported
            picks = "; ".join(f"{d}: {own[d]['picked'].removeprefix('auto → ')}" for d in digits)
            aurocs = [own[d]["auroc"] for d in digits]
            print(f"| **defaults** (each digit's own pick) | {picks} | " + " | ".join(f"{a:.3f}" for a in aurocs)
                  + f" | **{np.mean(aurocs):.4f}** |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--data", type=Path, default=here.parent.parent / "shared" / "data")
    parser.add_argument("--archs", default="auto,dense,deep,conv,convsmall,pca",
                        help="comma-separated architectures; NAME:N sets the latent size of one (convsmall:16)")
    parser.add_argument("--part", default="abc", help="any of a, b, c (abc)")
    parser.add_argument("--epochs-c", type=int, default=20, help="most epochs per elpv type for (c)")
    parser.add_argument("--types", default="mono,poly", help="elpv module types for (c)")
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
    args.types = args.types.split(",")
    configure("console", "WARNING", stream=sys.stderr)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows_a = part_a(args, args.archs, Path(tmp)) if "a" in args.part else []
        rows_b = part_b(args, args.archs, Path(tmp)) if "b" in args.part else []
        rows_c = part_c(args, args.archs, Path(tmp)) if "c" in args.part else []
    cmd = " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])
    print(f"`{cmd}` ({time.perf_counter() - start:.0f} s)\n")
    _print_tables(rows_a, rows_b, args)
    if rows_c:
        _print_c(rows_c)
    if args.json:
        args.json.write_text(json.dumps({"a": rows_a, "b": rows_b, "c": rows_c}, indent=2))


if __name__ == "__main__":
    main()
