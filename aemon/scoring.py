"""One compiled model call per batch, scoring included; the reconstruction error also in numpy.

``model.predict`` costs tens of milliseconds per call whatever the batch; a ``tf.function``
traced once over a ``(None, H, W, 1)`` signature costs about a millisecond, so one scorer
serves 1 image or 10,000 at full speed. Large inputs are cut into chunks of ``chunk``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

__all__ = ["SCORE_FUNCTIONS", "ScoreFunction", "TOPK_SHARE", "reconstruction_error", "Scorer"]

#: Share of pixels whose squared errors ``topk`` averages (the worst 5 %: 40 of 784).
TOPK_SHARE = 0.05
_EPS = 1e-7


def _topk(pixels: int) -> int:
    return max(1, math.ceil(TOPK_SHARE * pixels))


# Each score function twice: numpy (reference, evaluation) and TensorFlow (inside the compiled
# call). Both take flattened (N, pixels) float32 inputs and reconstructions; a parity test
# checks every pair.
def _mse_np(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.mean(np.square(x - r), axis=1, dtype=np.float64)


def _mse_tf(x, r):
    return tf.reduce_mean(tf.square(x - r), axis=1)


def _bce_np(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    r = np.clip(r, _EPS, 1 - _EPS)
    return -np.mean(x * np.log(r) + (1 - x) * np.log1p(-r), axis=1, dtype=np.float64)


def _bce_tf(x, r):
    r = tf.clip_by_value(r, _EPS, 1 - _EPS)
    return -tf.reduce_mean(x * tf.math.log(r) + (1 - x) * tf.math.log1p(-r), axis=1)


def _topk_np(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    pixels = x.shape[1]
    k = _topk(pixels)
    return np.mean(np.partition(np.square(x - r), pixels - k, axis=1)[:, pixels - k:], axis=1, dtype=np.float64)


def _topk_tf(x, r):
    return tf.reduce_mean(tf.math.top_k(tf.square(x - r), k=_topk(x.shape[1]), sorted=False).values, axis=1)


@dataclass(frozen=True)
class ScoreFunction:
    """One per-image score: the same formula in numpy and in TensorFlow ops."""

    #: What it measures (shown by ``aemon train --help``).
    summary: str
    numpy: Callable[[np.ndarray, np.ndarray], np.ndarray]
    tf: Callable


#: Score functions by the name stored in a bundle. To add one, add a pair above and a row here.
SCORE_FUNCTIONS: dict[str, ScoreFunction] = {
    "mse": ScoreFunction("mean squared pixel error", _mse_np, _mse_tf),
    "bce": ScoreFunction("mean binary cross-entropy of the reconstruction against the input", _bce_np, _bce_tf),
    "topk": ScoreFunction(f"mean squared error of the worst {TOPK_SHARE:.0%} of the pixels (small defects count "
                          "as much on big images)", _topk_np, _topk_tf),
}


def _lookup(kind: str) -> ScoreFunction:
    try:
        return SCORE_FUNCTIONS[kind]
    except KeyError:
        raise ValueError(f"unknown score function {kind!r}; choose one of {', '.join(SCORE_FUNCTIONS)}") from None


def reconstruction_error(x: np.ndarray, recon: np.ndarray, kind: str = "mse") -> np.ndarray:
    """Per-image reconstruction error (numpy), ``kind`` naming a row of :data:`SCORE_FUNCTIONS`.

    Args:
        x: Inputs, ``(N, H, W, C)`` in [0, 1].
        recon: The model's reconstructions, same shape.
        kind: The score function's name.
    """
    fn = _lookup(kind)
    x = x.reshape(len(x), -1).astype(np.float32, copy=False)
    recon = recon.reshape(len(recon), -1).astype(np.float32, copy=False)
    return fn.numpy(x, recon)


def _tf_error(x, recon, kind: str):
    """:func:`reconstruction_error` in TensorFlow ops (float32), for use inside a compiled call."""
    fn = _lookup(kind)
    pixels = math.prod(x.shape[1:])
    return fn.tf(tf.reshape(x, (-1, pixels)), tf.reshape(recon, (-1, pixels)))


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
