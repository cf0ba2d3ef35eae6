"""Run every aemon verb once, and the daemon on one item, on tiny data.

The image build runs it in its trimmed environment (``python deploy/smoke.py``), so a trim that
breaks a verb fails the build, and Python's bytecode is written for exactly the modules the verbs
and the daemon import. Also usable on any install: exit 0 when everything worked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MNIST = "sample:mnist?limit=300"


QUIET = {**os.environ, "AEMON_LOG_LEVEL": "WARNING", "TF_CPP_MIN_LOG_LEVEL": "2"}


def aemon(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "aemon", *args], check=True, stdout=subprocess.DEVNULL, env=QUIET)


def verbs(tmp: Path) -> None:
    aemon("samples", str(tmp / "samples"))
    aemon("score", "mnist-detect", "sample:mnist?limit=20", "--maps", str(tmp / "maps"))
    aemon("denoise", "mnist-denoise", str(tmp / "samples"), "--out", str(tmp / "denoised"))
    aemon("train", "--data", MNIST, "--out", str(tmp / "auto"))
    aemon("train", "--data", MNIST, "--arch", "dense", "--epochs", "1", "--out", str(tmp / "dense"))
    aemon("calibrate", str(tmp / "dense"), "--data", "sample:mnist?limit=200", "--out", str(tmp / "recal"))
    aemon("evaluate", str(tmp / "auto"), "--normal", "sample:mnist?digits=1&limit=100",
          "--anomalous", "sample:mnist?digits=0&limit=100", "--report", str(tmp / "report"))
    aemon("info", str(tmp / "auto"))


def daemon(tmp: Path) -> None:
    """Start the daemon, route one sample image, stop it with SIGTERM (exit 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp / "root"
    (root / "inbox").mkdir(parents=True)
    env = {**QUIET, "AEMON_ROOT": str(root), "AEMON_METRICS_PORT": str(port), "AEMON_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aemon", "run"], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("smoke: the daemon did not become ready") from None
                time.sleep(0.2)
        sample = next((tmp / "samples").iterdir())
        os.link(sample, root / "inbox" / sample.name)
        while not any((root / f / f"{sample.name}.json").exists() for f in ("ok", "anomaly")):
            if time.monotonic() > deadline:
                raise SystemExit("smoke: the sample was not routed")
            time.sleep(0.1)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    if code != 0:
        raise SystemExit(f"smoke: the daemon exited {code}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        verbs(Path(tmp))
        daemon(Path(tmp))
    print("smoke: every verb and the daemon worked")


if __name__ == "__main__":
    main()
