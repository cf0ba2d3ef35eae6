"""Foundation figures for the shipped default detection bundle (run on demand, not in tests).

Prints: AUROC of MNIST test (normal) vs Fashion-MNIST test (anomalous); observed FPR on MNIST
test at the shipped threshold; `aemon score` throughput on a 10,000-image .npy as a ratio to a
bare compiled model call on the same array, measured in the same run.

Usage: python benchmarks/foundation.py [--data ../shared/data] [--bundle models/mnist-detect]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from aemon.logs import quiet_tensorflow

quiet_tensorflow()

import tensorflow as tf  # noqa: E402

from aemon.bundle import default_bundle_path, load_bundle  # noqa: E402
from aemon.images import array_to_input  # noqa: E402
from aemon.pipeline import score_paths  # noqa: E402
from aemon.ranking import average_precision, roc_auc  # noqa: E402
from aemon.settings import Settings  # noqa: E402


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--data", type=Path, default=here.parent.parent / "shared" / "data")
    parser.add_argument("--bundle", type=Path, default=None)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle or default_bundle_path("detect"))
    with np.load(args.data / "mnist.npz") as m, np.load(args.data / "fashion_mnist.npz") as f:
        normal_raw, anomalous_raw = m["x_test"], f["x_test"]
    normal, anomalous = array_to_input(normal_raw), array_to_input(anomalous_raw)

    s_norm, s_anom = bundle.score(normal), bundle.score(anomalous)
    y = np.r_[np.zeros(len(s_norm)), np.ones(len(s_anom))]
    s = np.r_[s_norm, s_anom]
    print(f"bundle {bundle.path} ({bundle.meta.arch}, version {bundle.version}, threshold {bundle.threshold:.6g})")
    print(f"AUROC  MNIST test vs Fashion-MNIST test: {roc_auc(y, s):.4f}")
    print(f"AUPRC  MNIST test vs Fashion-MNIST test: {average_precision(y, s):.4f}")
    print(f"FPR on MNIST test at threshold: {np.mean(s_norm > bundle.threshold):.4f} "
          f"(target {bundle.meta.target_fpr}, n={len(s_norm)})")
    print(f"TPR on Fashion-MNIST test at threshold: {np.mean(s_anom > bundle.threshold):.4f}")

    # Throughput: bare compiled call vs aemon score on the same 10,000-image array.
    model = bundle.model
    call = tf.function(lambda x: model(x, training=False),
                       input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32)])
    call(normal[:256])

    def bare() -> None:
        for i in range(0, len(normal), 1024):
            call(normal[i : i + 1024]).numpy()

    t_bare = _best_of(bare)
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "mnist_test.npy"
        np.save(npy, normal_raw)
        t_inproc = _best_of(lambda: sum(1 for _ in score_paths(bundle, [npy], settings.limits)))
        env = {**os.environ, "AEMON_LOG_FORMAT": "json"}
        cmd = [sys.executable, "-m", "aemon", "score", str(bundle.path), str(npy)]

        def cli() -> None:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)

        t_cli = _best_of(cli, repeats=2)
        t_start = _best_of(lambda: subprocess.run([sys.executable, "-m", "aemon", "info", "--json"], check=True,
                                                  stdout=subprocess.DEVNULL, env=env), repeats=2)
    n = len(normal)
    print(f"bare compiled model call:          {n / t_bare:10.0f} images/s ({t_bare * 1000:.0f} ms)")
    print(f"score_paths (decode+score+records): {n / t_inproc:10.0f} images/s ({t_inproc * 1000:.0f} ms), "
          f"ratio {t_bare / t_inproc:.2f}x of bare")
    print(f"aemon score CLI (whole process):   {n / t_cli:10.0f} images/s ({t_cli * 1000:.0f} ms), "
          f"ratio {t_bare / t_cli:.2f}x of bare; process start without TF: {t_start * 1000:.0f} ms")


if __name__ == "__main__":
    main()
