"""One compiled model call per batch, scoring included; the reconstruction error also in numpy.

``model.predict`` costs tens of milliseconds per call whatever the batch; a ``tf.function``
traced once over a ``(None, H, W, 1)`` signature costs about a millisecond, so one scorer
serves 1 image or 10,000 at full speed. Large inputs are cut into chunks of ``chunk``.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

__all__ = ["SCORE_FUNCTIONS", "TOPK_SHARE", "reconstruction_error", "Scorer"]

#: Per-image score functions, by the name stored in a bundle.
SCORE_FUNCTIONS = ("mse", "bce", "topk")
#: Share of pixels whose squared errors ``topk`` averages (the worst 5 %: 40 of 784).
TOPK_SHARE = 0.05


def reconstruction_error(x: np.ndarray, recon: np.ndarray, kind: str = "mse") -> np.ndarray:
    """Per-image reconstruction error.

    Args:
        x: Inputs, ``(N, H, W, 1)`` in [0, 1].
        recon: The model's reconstructions, same shape.
        kind: ``mse`` (mean squared pixel error, the default), ``bce`` (mean binary
            cross-entropy of the reconstruction against the input) or ``topk`` (mean squared
            error of the worst :data:`TOPK_SHARE` of the pixels: a small wrong stroke counts
            as much on a big image as on a small one).
    """
    x = x.reshape(len(x), -1).astype(np.float32, copy=False)
    recon = recon.reshape(len(recon), -1).astype(np.float32, copy=False)
    if kind == "mse":
        return np.mean(np.square(x - recon), axis=1, dtype=np.float64)
    if kind == "bce":
        r = np.clip(recon, 1e-7, 1 - 1e-7)
        return -np.mean(x * np.log(r) + (1 - x) * np.log1p(-r), axis=1, dtype=np.float64)
    if kind == "topk":
        pixels = x.shape[1]
        k = max(1, math.ceil(TOPK_SHARE * pixels))
        worst = np.partition(np.square(x - recon), pixels - k, axis=1)[:, pixels - k :]
        return np.mean(worst, axis=1, dtype=np.float64)
    raise ValueError(f"unknown score function {kind!r}; choose one of {', '.join(SCORE_FUNCTIONS)}")


def _tf_error(x, recon, kind: str):
    """:func:`reconstruction_error` in TensorFlow ops (float32), for use inside a compiled call."""
    pixels = math.prod(x.shape[1:])
    x = tf.reshape(x, (-1, pixels))
    recon = tf.reshape(recon, (-1, pixels))
    if kind == "mse":
        return tf.reduce_mean(tf.square(x - recon), axis=1)
    if kind == "bce":
        r = tf.clip_by_value(recon, 1e-7, 1 - 1e-7)
        return -tf.reduce_mean(x * tf.math.log(r) + (1 - x) * tf.math.log1p(-r), axis=1)
    if kind == "topk":
        k = max(1, math.ceil(TOPK_SHARE * pixels))
        return tf.reduce_mean(tf.math.top_k(tf.square(x - recon), k=k, sorted=False).values, axis=1)
    raise ValueError(f"unknown score function {kind!r}; choose one of {', '.join(SCORE_FUNCTIONS)}")


class Scorer:
    """Reconstructs and scores images with a compiled call of a Keras model.

    Args:
        model: A Keras autoencoder taking ``(N, H, W, 1)`` float32.
        score_fn: Name of the score function (see :data:`SCORE_FUNCTIONS`).
        chunk: Largest batch sent to the model in one call.
    """

    def __init__(self, model, score_fn: str = "mse", chunk: int = 1024) -> None:
        self.model = model
        self.score_fn = score_fn
        self.chunk = chunk
        shape = tuple(model.input_shape[1:])
        self.input_shape = shape
        spec = tf.TensorSpec(shape=(None, *shape), dtype=tf.float32)
        self._call = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        # The score is computed in the same compiled call: no reconstruction is copied back.
        self._score_call = tf.function(lambda x: _tf_error(x, model(x, training=False), score_fn),
                                       input_signature=[spec])
        # Trace now, so the first real item does not pay for it.
        self._call(tf.zeros((1, *shape), tf.float32))
        self._score_call(tf.zeros((1, *shape), tf.float32))
        self._encode = None

    def _chunks(self, fn, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) <= self.chunk:
            return fn(x).numpy()
        return np.concatenate([fn(x[i : i + self.chunk]).numpy() for i in range(0, len(x), self.chunk)])

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The model's reconstructions of ``x`` (float32, same shape)."""
        return self._chunks(self._call, x)

    @property
    def has_encoder(self) -> bool:
        """Whether the model has a named ``encoder`` sub-model (every aemon architecture does)."""
        return any(layer.name == "encoder" for layer in self.model.layers)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Latent codes of ``x`` from the ``encoder`` sub-model, flattened to ``(N, code size)``.

        Raises:
            ValueError: the model has no ``encoder`` sub-model.
        """
        if self._encode is None:
            if not self.has_encoder:
                raise ValueError("this model has no 'encoder' sub-model")
            encoder = self.model.get_layer("encoder")
            spec = tf.TensorSpec(shape=(None, *self.input_shape), dtype=tf.float32)
            self._encode = tf.function(lambda x: encoder(x, training=False), input_signature=[spec])
        codes = self._chunks(self._encode, x)
        return codes.reshape(len(codes), -1)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Per-image reconstruction error of ``x``."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        return self._chunks(self._score_call, x).astype(np.float64)
