"""The autoencoder zoo: one small Keras 3 functional builder per architecture.

Every model takes and returns images of shape ``(H, W, 1)`` in [0, 1] and is made of two
named sub-models, ``encoder`` and ``decoder``, so that evaluation can read the latent codes.
The dense models flatten the image first and reshape at the end (no parameters), so the
layers are exactly the classic recipe's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
from keras import layers

from aemon.errors import UsageError

__all__ = ["ARCHS", "BUILDERS", "POOLED", "build", "check_fits", "fit_pca", "pca_reconstruct", "seeded_subset",
           "set_pca_weights"]

#: Architectures ``build`` knows, with a one-line description for ``--help``.
ARCHS: dict[str, str] = {
    "dense": "784→latent→784, relu then sigmoid (latent 32 by default)",
    "deep": "784→128→64→latent→64→128→784 (latent 32 by default)",
    "conv": "the lecture's: Conv2D 16, MaxPool, Conv2D 16, MaxPool, Conv2D 8, Conv2D 8 (7×7×8 code); mirrored "
            "with UpSampling2D, last Conv2D sigmoid",
    "convsmall": "Conv2D 32 stride 2, Conv2D 64 stride 2, Dense latent (32 by default); mirrored Conv2DTranspose",
    "pca": "linear baseline: projection on the top latent principal components, fitted by SVD (latent 32)",
}


def _dense_stack(
    input_shape: tuple[int, int, int], hidden: list[int], latent_dim: int
) -> tuple[keras.Model, keras.Model]:
    pixels = math.prod(input_shape)
    enc_in = keras.Input(shape=input_shape, name="image")
    x = layers.Flatten(name="flatten")(enc_in)
    for i, units in enumerate(hidden):
        x = layers.Dense(units, activation="relu", name=f"enc_dense_{i}")(x)
    code = layers.Dense(latent_dim, activation="relu", name="code")(x)
    encoder = keras.Model(enc_in, code, name="encoder")

    dec_in = keras.Input(shape=(latent_dim,), name="code_in")
    y = dec_in
    for i, units in enumerate(reversed(hidden)):
        y = layers.Dense(units, activation="relu", name=f"dec_dense_{i}")(y)
    y = layers.Dense(pixels, activation="sigmoid", name="pixels")(y)
    out = layers.Reshape(input_shape, name="unflatten")(y)
    decoder = keras.Model(dec_in, out, name="decoder")
    return encoder, decoder


#: Architectures with two 2×2 poolings (or strides): height and width must be divisible by 4.
POOLED = ("conv", "convsmall")
#: Architectures whose code size is ``--latent-dim``.
CODED = ("dense", "deep", "convsmall", "pca")


def check_fits(arch: str, input_shape: tuple[int, int, int], latent_dim: int | None = None,
               resizable: bool = True) -> None:
    """Refuse an input size (or a code size) that ``arch`` cannot take, before any data is loaded.

    ``resizable``: False for arrays, which are taken at their own size (no ``--size`` changes them).

    Raises:
        UsageError: naming the nearest size that fits, or the largest code.
    """
    height, width = input_shape[0], input_shape[1]
    values = math.prod(input_shape)
    if latent_dim is not None and arch in CODED and latent_dim > values:
        raise UsageError(f"--latent-dim {latent_dim} is more than the {values} values of a "
                         f"{height}x{width}x{input_shape[2]} input: a code that wide learns to copy; "
                         f"lower --latent-dim to at most {values}")
    if arch in POOLED and (height % 4 or width % 4):
        fit = "x".join(str(max(4, round(v / 4) * 4)) for v in (height, width))
        remedy = f"choose --size {fit}" if resizable else f"arrays are never resized: pad or crop its rows to {fit}"
        raise UsageError(f"--arch {arch} needs height and width divisible by 4 (two 2x2 poolings), not "
                         f"{height}x{width}; {remedy} or choose another --arch")


def _conv_stack(input_shape: tuple[int, int, int], latent_dim: int = 0) -> tuple[keras.Model, keras.Model]:
    # The lecture's network exactly, every convolution 3×3 'same' (latent_dim is not used).
    check_fits("conv", input_shape)
    enc_in = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(16, 3, activation="relu", padding="same", name="enc_conv_0")(enc_in)
    x = layers.MaxPooling2D(2, padding="same", name="enc_pool_0")(x)
    x = layers.Conv2D(16, 3, activation="relu", padding="same", name="enc_conv_1")(x)
    x = layers.MaxPooling2D(2, padding="same", name="enc_pool_1")(x)
    x = layers.Conv2D(8, 3, activation="relu", padding="same", name="enc_conv_2")(x)
    code = layers.Conv2D(8, 3, activation="relu", padding="same", name="code")(x)
    encoder = keras.Model(enc_in, code, name="encoder")

    dec_in = keras.Input(shape=tuple(code.shape[1:]), name="code_in")
    y = layers.Conv2D(8, 3, activation="relu", padding="same", name="dec_conv_0")(dec_in)
    y = layers.Conv2D(8, 3, activation="relu", padding="same", name="dec_conv_1")(y)
    y = layers.UpSampling2D(2, name="dec_up_0")(y)
    y = layers.Conv2D(16, 3, activation="relu", padding="same", name="dec_conv_2")(y)
    y = layers.Conv2D(16, 3, activation="relu", padding="same", name="dec_conv_3")(y)
    y = layers.UpSampling2D(2, name="dec_up_1")(y)
    out = layers.Conv2D(input_shape[2], 3, activation="sigmoid", padding="same", name="pixels")(y)
    decoder = keras.Model(dec_in, out, name="decoder")
    return encoder, decoder


def _convsmall_stack(input_shape: tuple[int, int, int], latent_dim: int) -> tuple[keras.Model, keras.Model]:
    # The seed conv keeps a 7×7×8 code (392 numbers for 784 pixels) and, being all 'same'-padded
    # convolutions, reconstructs ink anywhere. A dense bottleneck makes the code small and global.
    check_fits("convsmall", input_shape)
    grid = (input_shape[0] // 4, input_shape[1] // 4, 64)
    enc_in = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, 3, strides=2, activation="relu", padding="same", name="enc_conv_0")(enc_in)
    x = layers.Conv2D(64, 3, strides=2, activation="relu", padding="same", name="enc_conv_1")(x)
    x = layers.Flatten(name="flatten")(x)
    code = layers.Dense(latent_dim, name="code")(x)
    encoder = keras.Model(enc_in, code, name="encoder")

    dec_in = keras.Input(shape=(latent_dim,), name="code_in")
    y = layers.Dense(math.prod(grid), activation="relu", name="dec_dense")(dec_in)
    y = layers.Reshape(grid, name="unflatten")(y)
    y = layers.Conv2DTranspose(32, 3, strides=2, activation="relu", padding="same", name="dec_conv_0")(y)
    out = layers.Conv2DTranspose(input_shape[2], 3, strides=2, activation="sigmoid", padding="same",
                                 name="pixels")(y)
    decoder = keras.Model(dec_in, out, name="decoder")
    return encoder, decoder


def _pca_stack(input_shape: tuple[int, int, int], latent_dim: int) -> tuple[keras.Model, keras.Model]:
    # Fixed Dense weights (set by set_pca_weights), so the bundle is an ordinary Keras model that
    # score, evaluate and the daemon run unchanged. The output is clipped to the pixel range [0, 1].
    pixels = math.prod(input_shape)
    enc_in = keras.Input(shape=input_shape, name="image")
    x = layers.Flatten(name="flatten")(enc_in)
    code = layers.Dense(latent_dim, name="code", trainable=False)(x)
    encoder = keras.Model(enc_in, code, name="encoder")

    dec_in = keras.Input(shape=(latent_dim,), name="code_in")
    y = layers.Dense(pixels, name="pixels", trainable=False)(dec_in)
    y = layers.ReLU(max_value=1.0, name="clip")(y)
    out = layers.Reshape(input_shape, name="unflatten")(y)
    decoder = keras.Model(dec_in, out, name="decoder")
    return encoder, decoder


def set_pca_weights(model: keras.Model, mean, components) -> None:
    """Load a PCA fit into a ``pca`` model: code = (x - mean) @ Vᵀ, reconstruction = code @ V + mean.

    Args:
        model: A model built with ``build("pca", ...)``.
        mean: Per-pixel mean of the fitted data, shape ``(pixels,)``.
        components: Orthonormal principal directions ``V``, shape ``(latent_dim, pixels)``.
    """
    mean = np.asarray(mean, np.float32)
    comps = np.asarray(components, np.float32)
    encoder, decoder = model.get_layer("encoder"), model.get_layer("decoder")
    encoder.get_layer("code").set_weights([comps.T, -(mean @ comps.T)])
    decoder.get_layer("pixels").set_weights([comps, mean])


#: Most values (images × pixels) a PCA is fitted on; beyond, a seeded random subset of the images
#: (at least 1,000): a few hundred components are well estimated from it, and the SVD stays
#: within a minute and about 2 GB.
MAX_PCA_VALUES = 60_000_000


def seeded_subset(x: np.ndarray, most: int) -> np.ndarray:
    """``x`` itself, or ``most`` of its rows in their order, the same ones at every call (seed 0)."""
    if len(x) <= most:
        return x
    return x[np.sort(np.random.default_rng(0).choice(len(x), most, replace=False))]


def fit_pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Principal components of ``x`` by SVD of the centred data (of a subset, past :data:`MAX_PCA_VALUES`).

    Returns:
        The per-pixel mean ``(pixels,)``, the top ``n_components`` orthonormal directions
        ``(n_components, pixels)`` and the share of variance they explain.

    Raises:
        UsageError: more components than images or pixels.
    """
    pixels = x[0].size
    most = max(1000, MAX_PCA_VALUES // pixels)
    x = seeded_subset(x, most)
    flat = x.reshape(len(x), -1).astype(np.float64)
    if n_components > min(flat.shape):
        raise UsageError(f"--arch pca with {len(flat)} images of {flat.shape[1]} pixels keeps at most "
                         f"{min(flat.shape)} components; lower --latent-dim")
    mean = flat.mean(axis=0)
    _, sv, vt = np.linalg.svd(flat - mean, full_matrices=False)
    total = float(np.sum(sv**2))
    explained = float(np.sum(sv[:n_components] ** 2) / total) if total > 0 else 1.0
    return mean, vt[:n_components], explained


def pca_reconstruct(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """What a ``pca`` model outputs for ``x`` (numpy): the projection, clipped to [0, 1]."""
    flat = x.reshape(len(x), -1).astype(np.float32)
    mean = np.asarray(mean, np.float32)
    comps = np.asarray(components, np.float32)
    return np.clip((flat - mean) @ comps.T @ comps + mean, 0.0, 1.0).reshape(x.shape)


def _pca_checked(input_shape: tuple[int, int, int], latent_dim: int) -> tuple[keras.Model, keras.Model]:
    if latent_dim > math.prod(input_shape):
        raise ValueError(f"pca keeps at most {math.prod(input_shape)} components, got latent_dim {latent_dim}")
    return _pca_stack(input_shape, latent_dim)


#: Builders by architecture name: ``(input_shape, latent_dim) -> (encoder, decoder)``. To add an
#: architecture, write its builder and add a row here and in :data:`ARCHS`.
BUILDERS: dict[str, Callable[[tuple[int, int, int], int], tuple[keras.Model, keras.Model]]] = {
    "dense": lambda shape, latent: _dense_stack(shape, [], latent),
    "deep": lambda shape, latent: _dense_stack(shape, [128, 64], latent),
    "conv": _conv_stack,
    "convsmall": _convsmall_stack,
    "pca": _pca_checked,
}


def build(arch: str, input_shape: tuple[int, int, int] = (28, 28, 1), latent_dim: int = 32) -> keras.Model:
    """Build an untrained autoencoder.

    Args:
        arch: One of :data:`ARCHS`.
        input_shape: ``(H, W, 1)``.
        latent_dim: Size of the code for the dense architectures and ``pca`` (ignored by ``conv``).

    Raises:
        ValueError: unknown architecture.
        UsageError: a shape the architecture cannot take (:func:`check_fits`).
    """
    try:
        builder = BUILDERS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}") from None
    encoder, decoder = builder(input_shape, latent_dim)
    image = keras.Input(shape=input_shape, name="input")
    return keras.Model(image, decoder(encoder(image)), name=f"{arch}_autoencoder")
