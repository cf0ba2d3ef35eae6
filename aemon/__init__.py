"""aemon: an anomaly-detection monitoring daemon built on Keras autoencoders."""

__version__ = "0.1.0"

__all__ = ["__version__"]
