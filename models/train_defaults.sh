#!/usr/bin/env bash
# Reproduces the default bundles shipped in models/ from the real MNIST training set.
# Usage: models/train_defaults.sh [path/to/mnist.npz]   (default: ../shared/data/mnist.npz)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${1:-$here/../../shared/data/mnist.npz}"
aemon train --data "$data?key=x_train" --arch conv --epochs 30 --patience 3 --seed 0 \
    --name mnist-detect --out "$here/mnist-detect" --force
aemon train --data "$data?key=x_train" --arch conv --denoise --noise-factor 0.5 --epochs 30 --patience 3 --seed 0 \
    --name mnist-denoise --out "$here/mnist-denoise" --force
