"""Shared fixtures: quiet TensorFlow, no leaked threads, and tiny trained bundles."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import structlog

from aemon.logs import quiet_tensorflow

quiet_tensorflow()

#: Target FPR of the tiny bundles (needs 19 calibration samples; they hold out 150).
TINY_FPR = 0.05


@pytest.fixture(autouse=True)
def _quiet_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep TensorFlow quiet and on the TensorFlow backend in every test."""
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_tensorflow()


@pytest.fixture(autouse=True)
def _reset_logging(monkeypatch: pytest.MonkeyPatch):
    """No AEMON_* setting from the caller's shell, and each CLI call's structlog set-up (bound to
    captured streams) kept out of later tests."""
    for name in ("AEMON_CONFIG", "AEMON_MODEL", "AEMON_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _thawed_heap():
    """An in-process daemon freezes the heap once ready (one daemon per process in real use): thawed after
    each test, so this process's garbage is still collected."""
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _no_daemon_left():
    """A test that fails midway leaves no daemon running: its processes and inotify watches would disturb
    the tests after it (daemons of wider-scoped fixtures start before this and are left alone)."""
    from daemon_process import STARTED, stop_started_since

    count = len(STARTED)
    yield
    stop_started_since(count)


@pytest.fixture(autouse=True)
def _no_thread_leaks():
    """Fail a test that leaves Python threads running after it ends."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


def _train(out: Path, *, arch: str = "dense", denoise: bool = False, src: str = "sample:mnist?limit=1500",
           epochs: int = 2, score_fn: str = "mse", **cfg) -> Path:
    from aemon.sources import load_source
    from aemon.train import TrainConfig, train_bundle

    cfg["score_fn"] = score_fn
    config = TrainConfig(arch=arch, epochs=epochs, batch_size=64, denoise=denoise, target_fpr=TINY_FPR, **cfg)
    return train_bundle(load_source(src), config, out, verbose=False)


@pytest.fixture(scope="session")
def train_tiny():
    """Factory: train a small bundle with test-friendly defaults (dense, 2 epochs, 1,500 digits)."""
    return _train


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense detect bundle trained for 2 epochs on 1,500 sample:mnist digits."""
    return _train(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_denoise_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense denoise bundle trained for 2 epochs on 1,500 sample:mnist digits."""
    return _train(tmp_path_factory.mktemp("bundles") / "tiny-denoise", denoise=True)


@pytest.fixture(scope="session")
def tiny_pca_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pca detect bundle (16 components) fitted on the same 1,500 sample:mnist digits."""
    return _train(tmp_path_factory.mktemp("bundles") / "tiny-pca", arch="pca", latent_dim=16)


@pytest.fixture(scope="session")
def mnist_digits() -> np.ndarray:
    """All 5,000 sample:mnist digits as uint8 ``(N, 28, 28)``."""
    from aemon.sources import sample_mnist

    x, _ = sample_mnist()
    return x.reshape(-1, 28, 28).astype(np.uint8)


@pytest.fixture(scope="session")
def digits(mnist_digits: np.ndarray) -> np.ndarray:
    """The same 5,000 real digits, under the short name the daemon tests use."""
    return mnist_digits
